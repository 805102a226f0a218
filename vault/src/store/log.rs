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
//! Does not guarantee: that sled holds nothing the log lacks. sled may
//! write its pages before the process dies and before the log's frame is
//! written: such a write was never acknowledged, and stays in the view.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use sled::transaction::{
    ConflictableTransactionResult, TransactionalTree, UnabortableTransactionError,
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

/// A tree inside a [`Writer::transact`] transaction: sled's transactional
/// tree, recording what it writes.
pub(crate) struct Tx<'a> {
    t: &'a TransactionalTree,
    tree: &'a Arc<str>,
    ops: &'a RefCell<Vec<Op>>,
}

impl Tx<'_> {
    /// The key's value, as this transaction sees it.
    pub(crate) fn get(
        &self,
        key: impl AsRef<[u8]>,
    ) -> std::result::Result<Option<IVec>, UnabortableTransactionError> {
        self.t.get(key)
    }

    /// Sets a key.
    pub(crate) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> std::result::Result<Option<IVec>, UnabortableTransactionError> {
        let (k, v) = (key.as_ref(), value.as_ref());
        self.ops.borrow_mut().push(Op {
            tree: self.tree.clone(),
            key: k.to_vec(),
            value: Some(v.to_vec()),
        });
        self.t.insert(k, v)
    }

    /// Removes a key.
    pub(crate) fn remove(
        &self,
        key: impl AsRef<[u8]>,
    ) -> std::result::Result<Option<IVec>, UnabortableTransactionError> {
        let k = key.as_ref();
        self.ops.borrow_mut().push(Op {
            tree: self.tree.clone(),
            key: k.to_vec(),
            value: None,
        });
        self.t.remove(k)
    }
}

struct Inner {
    db: sled::Db,
    wal: Arc<Wal>,
    lock: Mutex<()>,
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
        self.inner.wal.append(&[&encode(ops)])?;
        Ok(())
    }

    /// Runs `f` as one sled transaction over `trees` and logs its writes as
    /// one frame.
    pub(crate) fn transact<const N: usize, R>(
        &self,
        trees: [&sled::Tree; N],
        f: impl Fn(&[Tx<'_>; N]) -> ConflictableTransactionResult<R, VaultError>,
    ) -> Result<R> {
        use sled::Transactional;
        let names: [Arc<str>; N] = std::array::from_fn(|i| self.name(trees[i]));
        let ops = RefCell::new(Vec::new());
        let _held = self.held();
        let r = trees[..]
            .transaction(|views| {
                // A retried attempt starts from nothing.
                ops.borrow_mut().clear();
                let txs: [Tx<'_>; N] = std::array::from_fn(|i| Tx {
                    t: &views[i],
                    tree: &names[i],
                    ops: &ops,
                });
                f(&txs)
            })
            .map_err(tx_err)?;
        // INVARIANT: logged under the lock that ordered the apply.
        self.log(&ops.borrow())?;
        Ok(r)
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
        let name = self.name(tree);
        let old = if let [(k, v)] = writes {
            vec![match v {
                Some(v) => tree.insert(k, *v)?,
                None => tree.remove(k)?,
            }]
        } else {
            let mut old = Vec::with_capacity(writes.len());
            let mut batch = sled::Batch::default();
            for (k, v) in writes {
                old.push(tree.get(k)?);
                match v {
                    Some(v) => batch.insert(*k, *v),
                    None => batch.remove(*k),
                }
            }
            tree.apply_batch(batch)?;
            old
        };
        let ops: Vec<Op> = writes
            .iter()
            .map(|(k, v)| Op {
                tree: name.clone(),
                key: k.to_vec(),
                value: v.map(<[u8]>::to_vec),
            })
            .collect();
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

/// A transaction's own abort, or sled's failure as a storage error.
fn tx_err(e: sled::transaction::TransactionError<VaultError>) -> VaultError {
    match e {
        sled::transaction::TransactionError::Abort(e) => e,
        sled::transaction::TransactionError::Storage(e) => e.into(),
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
