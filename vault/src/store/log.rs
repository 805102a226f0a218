//! The vault's writes through the data directory's write-ahead log.
//!
//! Every write to the vault's trees goes through a [`Writer`]: it applies
//! the write to sled and appends the same writes, as one log frame, while
//! holding the writer's lock, so the log holds the writes in the order sled
//! applied them. A write is durable once its frame is ([`Writer::commit`]);
//! sled is a view of the log, flushed on its own schedule
//! ([`Store::flush_view`](super::Store::flush_view)), which records the log
//! position it holds (`meta` key `wal-applied`). At open, every logged
//! write from that position on is applied again, in order: each write sets
//! a key to a value or removes it, so applying a prefix of the log again
//! leaves the final state unchanged.
//!
//! Record format (after the log's tag byte `VAULT_WRITES`): a u32 count,
//! then per write: kind (1 insert, 2 remove), the tree's name length (u8)
//! and name, the key's length (u32) and bytes, and for an insert the
//! value's length (u32) and bytes. Integers are big-endian.
//!
//! Guarantees: a write returned by the writer is in the log; every write a
//! commit waited for is replayed after a crash; a record that does not
//! decode refuses the open, naming its LSN.
//!
//! Writes are applied key by key, not as sled batches or transactions
//! (the writer's lock orders them; see [`Writer::transact`]); a write that
//! fails before it is applied changes nothing, and one that sled fails in
//! the middle of stops the writer until a restart.
//!
//! Does not guarantee: that sled holds nothing the log lacks. sled writes
//! its I/O buffers when they fill, and may do so before the process dies
//! and before the log's frame is written: that write was never
//! acknowledged, and stays in the view, possibly in part.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, UnabortableTransactionError,
};
use sled::IVec;
use sovra_wal::Wal;

use crate::error::{Result, VaultError};

const INSERT: u8 = 1;
const REMOVE: u8 = 2;

/// One write.
struct Op {
    tree: Arc<str>,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

fn encode(ops: &[Op]) -> Vec<u8> {
    let size: usize = ops
        .iter()
        .map(|o| 10 + o.tree.len() + o.key.len() + o.value.as_ref().map_or(0, Vec::len))
        .sum();
    let mut out = Vec::with_capacity(5 + size);
    out.push(sovra_wal::tag::VAULT_WRITES);
    out.extend_from_slice(&(ops.len() as u32).to_be_bytes());
    for o in ops {
        out.push(if o.value.is_some() { INSERT } else { REMOVE });
        // INVARIANT: tree names are this crate's constants, all short.
        out.push(o.tree.len() as u8);
        out.extend_from_slice(o.tree.as_bytes());
        out.extend_from_slice(&(o.key.len() as u32).to_be_bytes());
        out.extend_from_slice(&o.key);
        if let Some(v) = &o.value {
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
    out
}

/// Decodes a record's writes (after the tag): (tree, key, value).
type Decoded<'a> = Vec<(&'a str, &'a [u8], Option<&'a [u8]>)>;

fn decode(b: &[u8]) -> std::result::Result<Decoded<'_>, String> {
    fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> std::result::Result<&'a [u8], String> {
        let s = b
            .get(*at..at.saturating_add(n))
            .ok_or_else(|| "it is cut short".to_owned())?;
        *at += n;
        Ok(s)
    }
    fn len(b: &[u8], at: &mut usize) -> std::result::Result<usize, String> {
        let s = take(b, at, 4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
    }
    let mut at = 0;
    let count = len(b, &mut at)?;
    // Each write takes at least 10 bytes: bounds the allocation.
    if count > b.len() / 10 {
        return Err(format!("it claims {count} writes in {} bytes", b.len()));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = take(b, &mut at, 1)?[0];
        let n = take(b, &mut at, 1)?[0] as usize;
        let tree = std::str::from_utf8(take(b, &mut at, n)?)
            .map_err(|_| "a tree name is not UTF-8".to_owned())?;
        let n = len(b, &mut at)?;
        let key = take(b, &mut at, n)?;
        let value = match kind {
            INSERT => {
                let n = len(b, &mut at)?;
                Some(take(b, &mut at, n)?)
            }
            REMOVE => None,
            k => return Err(format!("unknown write kind {k}")),
        };
        out.push((tree, key, value));
    }
    if at != b.len() {
        return Err(format!("{} bytes follow its writes", b.len() - at));
    }
    Ok(out)
}

/// What a [`Writer::transact`] call has written so far: the writes in
/// order, and each key's latest value (so the call reads its own writes).
#[derive(Default)]
struct Pending {
    ops: Vec<(usize, Op)>,
    latest: HashMap<(usize, Vec<u8>), Option<Vec<u8>>>,
}

/// A tree inside a [`Writer::transact`] call: reads see the tree as the
/// call has changed it; writes are buffered and applied, in order, only if
/// the call succeeds.
pub(crate) struct Tx<'a> {
    t: &'a sled::Tree,
    at: usize,
    tree: &'a Arc<str>,
    pending: &'a RefCell<Pending>,
}

impl Tx<'_> {
    /// The key's value, as this transaction sees it.
    pub(crate) fn get(
        &self,
        key: impl AsRef<[u8]>,
    ) -> std::result::Result<Option<IVec>, UnabortableTransactionError> {
        let k = key.as_ref();
        if let Some(v) = self.pending.borrow().latest.get(&(self.at, k.to_vec())) {
            return Ok(v.as_deref().map(IVec::from));
        }
        self.t.get(k).map_err(UnabortableTransactionError::Storage)
    }

    fn put(&self, k: &[u8], value: Option<&[u8]>) {
        let mut p = self.pending.borrow_mut();
        p.latest
            .insert((self.at, k.to_vec()), value.map(<[u8]>::to_vec));
        p.ops.push((
            self.at,
            Op {
                tree: self.tree.clone(),
                key: k.to_vec(),
                value: value.map(<[u8]>::to_vec),
            },
        ));
    }

    /// Sets a key (the value it held is not looked up: no caller needs it,
    /// and the lookup is a sled read per write).
    pub(crate) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> std::result::Result<(), UnabortableTransactionError> {
        self.put(key.as_ref(), Some(value.as_ref()));
        Ok(())
    }

    /// Removes a key.
    pub(crate) fn remove(
        &self,
        key: impl AsRef<[u8]>,
    ) -> std::result::Result<(), UnabortableTransactionError> {
        self.put(key.as_ref(), None);
        Ok(())
    }
}

struct Inner {
    db: sled::Db,
    wal: Arc<Wal>,
    lock: Mutex<()>,
    /// Set when sled failed in the middle of applying a write, or the log
    /// refused a write already applied: the view may hold (part of) a
    /// write the log does not, so no further write is accepted until a
    /// restart replays the log into it.
    broken: std::sync::atomic::AtomicBool,
    names: Mutex<HashMap<Vec<u8>, Arc<str>>>,
}

/// Applies and logs the vault's writes (see the module docs).
#[derive(Clone)]
pub(crate) struct Writer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

impl Writer {
    pub(crate) fn new(db: sled::Db, wal: Arc<Wal>) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                wal,
                lock: Mutex::new(()),
                broken: std::sync::atomic::AtomicBool::new(false),
                names: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub(crate) fn wal(&self) -> &Arc<Wal> {
        &self.inner.wal
    }

    fn held(&self) -> MutexGuard<'_, ()> {
        // The lock guards no data: a panic under it leaves nothing half-done
        // that the next writer could see.
        self.inner
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn name(&self, tree: &sled::Tree) -> Arc<str> {
        let n = tree.name();
        let mut names = self
            .inner
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        names
            .entry(n.to_vec())
            .or_insert_with(|| Arc::from(String::from_utf8_lossy(&n).as_ref()))
            .clone()
    }

    fn log(&self, ops: &[Op]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.inner.wal.append(&[&encode(ops)]) {
            // INVARIANT: called after `ops` were applied, so the view now
            // holds a write the log does not: refuse writes until a
            // restart replays the log into the view (as a half-applied
            // write does), so nothing builds on it.
            self.inner
                .broken
                .store(true, std::sync::atomic::Ordering::Release);
            return Err(e.into());
        }
        Ok(())
    }

    /// Runs `f` over `trees` and, if it succeeds, applies its writes in
    /// order and logs them as one frame; if it fails, nothing is written.
    ///
    /// Not a sled transaction: every vault write holds the writer's lock,
    /// so no other write can interleave, and sled's batches and
    /// transactions each seal and write one of its I/O buffers (half of the
    /// server's CPU under load). A reader may see a write half applied,
    /// as it may see one write applied and the next not; what is durable
    /// is the log's frame.
    pub(crate) fn transact<const N: usize, R>(
        &self,
        trees: [&sled::Tree; N],
        f: impl Fn(&[Tx<'_>; N]) -> ConflictableTransactionResult<R, VaultError>,
    ) -> Result<R> {
        let names: [Arc<str>; N] = std::array::from_fn(|i| self.name(trees[i]));
        let pending = RefCell::new(Pending::default());
        let _held = self.held();
        self.usable()?;
        let txs: [Tx<'_>; N] = std::array::from_fn(|i| Tx {
            t: trees[i],
            at: i,
            tree: &names[i],
            pending: &pending,
        });
        let r = f(&txs).map_err(|e| match e {
            ConflictableTransactionError::Abort(e) => e,
            ConflictableTransactionError::Storage(e) => e.into(),
            // INVARIANT: `Tx` never reports a conflict.
            _ => VaultError::internal("a write reported a conflict under the writer's lock"),
        })?;
        let ops = pending.into_inner().ops;
        self.apply(
            &ops.iter()
                .map(|(at, op)| (trees[*at], op))
                .collect::<Vec<_>>(),
        )?;
        let ops: Vec<Op> = ops.into_iter().map(|(_, op)| op).collect();
        // INVARIANT: logged under the lock that ordered the apply.
        self.log(&ops)?;
        Ok(r)
    }

    /// Refuses writes once an apply failed half-way (see `Inner::broken`).
    fn usable(&self) -> Result<()> {
        if self.inner.broken.load(std::sync::atomic::Ordering::Acquire) {
            return Err(VaultError::storage(
                "an earlier write failed half-applied in the vault's database; restart the server to replay the log",
            ));
        }
        Ok(())
    }

    /// Applies `ops` to sled in order; returns each key's previous value.
    fn apply(&self, ops: &[(&sled::Tree, &Op)]) -> Result<Vec<Option<IVec>>> {
        let mut old = Vec::with_capacity(ops.len());
        for (tree, op) in ops {
            let r = match &op.value {
                Some(v) => tree.insert(&op.key, v.as_slice()),
                None => tree.remove(&op.key),
            };
            match r {
                Ok(o) => old.push(o),
                Err(e) => {
                    if !old.is_empty() {
                        self.inner
                            .broken
                            .store(true, std::sync::atomic::Ordering::Release);
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(old)
    }

    /// Sets a key.
    pub(crate) fn insert(
        &self,
        tree: &sled::Tree,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Option<IVec>> {
        self.write(tree, &[(key.as_ref(), Some(value.as_ref()))])
            .map(|mut old| old.pop().flatten())
    }

    /// Removes a key.
    pub(crate) fn remove(&self, tree: &sled::Tree, key: impl AsRef<[u8]>) -> Result<Option<IVec>> {
        self.write(tree, &[(key.as_ref(), None)])
            .map(|mut old| old.pop().flatten())
    }

    /// Sets `key` unless it holds a value; returns the value it holds.
    pub(crate) fn insert_if_absent(
        &self,
        tree: &sled::Tree,
        key: &[u8],
        value: &[u8],
    ) -> Result<Option<IVec>> {
        let _held = self.held();
        if let Some(v) = tree.get(key)? {
            return Ok(Some(v));
        }
        self.apply_held(tree, &[(key, Some(value))])?;
        Ok(None)
    }

    /// Applies `writes` to `tree` atomically; returns the old values.
    pub(crate) fn write(
        &self,
        tree: &sled::Tree,
        writes: &[(&[u8], Option<&[u8]>)],
    ) -> Result<Vec<Option<IVec>>> {
        let _held = self.held();
        self.apply_held(tree, writes)
    }

    fn apply_held(
        &self,
        tree: &sled::Tree,
        writes: &[(&[u8], Option<&[u8]>)],
    ) -> Result<Vec<Option<IVec>>> {
        self.usable()?;
        let name = self.name(tree);
        let ops: Vec<Op> = writes
            .iter()
            .map(|(k, v)| Op {
                tree: name.clone(),
                key: k.to_vec(),
                value: v.map(<[u8]>::to_vec),
            })
            .collect();
        let old = self.apply(&ops.iter().map(|op| (tree, op)).collect::<Vec<_>>())?;
        self.log(&ops)?;
        Ok(old)
    }

    /// The log position every applied write lies below: taken under the
    /// lock, so no write is applied and not yet logged.
    pub(crate) fn position(&self) -> u64 {
        let _held = self.held();
        self.inner.wal.next_lsn()
    }

    /// Waits until every write made before the call is durable.
    pub(crate) async fn commit(&self) -> Result<()> {
        let lsn = self.inner.wal.next_lsn();
        Ok(self.inner.wal.wait_durable(lsn).await?)
    }

    /// Applies every logged vault write from `from` on; returns the log's
    /// durable end and how many writes were applied.
    pub(crate) fn replay(&self, from: u64) -> Result<(u64, u64)> {
        let db = &self.inner.db;
        let mut trees: HashMap<String, sled::Tree> = HashMap::new();
        let mut applied = 0u64;
        let mut failed: Option<VaultError> = None;
        let end = self.inner.wal.replay(from, |lsn, rec| {
            if failed.is_some() || rec.first() != Some(&sovra_wal::tag::VAULT_WRITES) {
                return Ok(());
            }
            let r = (|| -> Result<()> {
                let writes = decode(&rec[1..]).map_err(|why| {
                    VaultError::integrity(format!(
                        "the write-ahead log's record at LSN {lsn} (a vault write batch: {why})"
                    ))
                })?;
                for (name, key, value) in writes {
                    let tree = match trees.get(name) {
                        Some(t) => t.clone(),
                        None => {
                            let t = db.open_tree(name)?;
                            trees.insert(name.to_owned(), t.clone());
                            t
                        }
                    };
                    match value {
                        Some(v) => tree.insert(key, v)?,
                        None => tree.remove(key)?,
                    };
                    applied += 1;
                }
                Ok(())
            })();
            if let Err(e) = r {
                failed = Some(e);
            }
            Ok(())
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok((end, applied)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn writes_round_trip() {
        let ops = vec![
            Op {
                tree: Arc::from("records"),
                key: b"k".to_vec(),
                value: Some(b"v".to_vec()),
            },
            Op {
                tree: Arc::from("blind_index"),
                key: Vec::new(),
                value: None,
            },
        ];
        let b = encode(&ops);
        assert_eq!(b[0], sovra_wal::tag::VAULT_WRITES);
        let d = decode(&b[1..]).unwrap();
        assert_eq!(
            d,
            vec![
                ("records", &b"k"[..], Some(&b"v"[..])),
                ("blind_index", &b""[..], None)
            ]
        );
    }

    proptest! {
        /// The decoder takes any bytes without panicking.
        #[test]
        fn decode_takes_any_bytes(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&b);
        }
    }
}
