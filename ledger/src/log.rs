//! The persistent log: entries, their Merkle tree and signed checkpoints on
//! sled, with group commit.
//!
//! Layout of the `log` tree (one tree, so that one `apply_batch` makes an
//! append atomic):
//! - `e` ‖ seq (u64 BE) → entry bytes
//! - `s` ‖ pseudonym ‖ seq → empty (the entries about one customer)
//! - `c` ‖ pseudonym ‖ purpose → consent view (action, seq, timestamp)
//! - `m/size` → number of entries (u64 BE)
//!
//! The `checkpoints` tree maps tree size (u64 BE) → signed note. Beside the
//! database, `hashes.dat` holds the Merkle tree's stored hashes (the `tlog`
//! stored-hash order of Crosby and Wallach: every complete subtree's hash,
//! written once, so proofs read O(log n) hashes and appends hash two nodes
//! on average; see `hashes.rs`).
//!
//! Guarantees:
//! - Appends are serialised: sequence numbers are dense, every entry's
//!   `prev_hash` is the leaf hash of the one before, and an append is
//!   applied atomically with its hashes and view updates.
//! - [`Ledger::commit`] returns once every append made before it is on disk;
//!   concurrent callers share one flush.
//! - INVARIANT: a checkpoint is signed only over entries that are durable,
//!   so a crash can never leave a signed tree the log no longer contains.
//! - [`Ledger::open`] re-derives every stored hash from the entries, checks
//!   the hash chain and the latest checkpoint, and refuses a log that
//!   disagrees with itself, naming the first index that does. Proofs re-check
//!   the entry they prove.
//!
//! Not guaranteed: that an attacker with write access to the data directory
//! and the log key cannot rewrite history; checkpoints held by officers (and
//! consistency proofs against them) are what exposes that.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use tlog_tiles::{Hash, HashReader};
use tokio::sync::oneshot;

use crate::checkpoint::{LogKey, SignedCheckpoint};
use crate::entry::{Body, ConsentAction, Digest, Entry, Pseudonym};
use crate::error::{LedgerError, Result};
use crate::hashes::HashFile;
use crate::proof::{leaf_hash, TlogProof};

const META_SIZE: &[u8] = b"m/size";
/// With a write-ahead log: (LSN, size) at the last view flush. Every ledger
/// record below the LSN, and so every entry below the size, was in the view
/// when it was flushed.
const META_WAL: &[u8] = b"m/wal";

fn entry_key(seq: u64) -> [u8; 9] {
    let mut k = [b'e'; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}
fn subject_prefix(s: &Pseudonym) -> Vec<u8> {
    let mut k = Vec::with_capacity(41);
    k.push(b's');
    k.extend_from_slice(&s.0);
    k
}
fn subject_key(s: &Pseudonym, seq: u64) -> Vec<u8> {
    let mut k = subject_prefix(s);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}
fn consent_prefix(s: &Pseudonym) -> Vec<u8> {
    let mut k = Vec::with_capacity(33 + 32);
    k.push(b'c');
    k.extend_from_slice(&s.0);
    k
}
fn consent_key(s: &Pseudonym, purpose: &str) -> Vec<u8> {
    let mut k = consent_prefix(s);
    k.extend_from_slice(purpose.as_bytes());
    k
}

/// Options for opening a ledger.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// How often a new checkpoint is signed while entries arrive.
    pub checkpoint_interval: Duration,
    /// Re-derive and check every stored hash at open (recommended; linear
    /// in the log size).
    pub verify_on_open: bool,
    /// The data directory's write-ahead log. With one, an append is durable
    /// once its entries' log frame is, and the ledger's own files are a
    /// view flushed by [`Ledger::flush_view`]; without one, every commit
    /// flushes the ledger's files.
    pub wal: Option<Arc<sovra_wal::Wal>>,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        Self {
            checkpoint_interval: Duration::from_secs(1),
            verify_on_open: true,
            wal: None,
        }
    }
}

impl From<sovra_wal::WalError> for LedgerError {
    fn from(e: sovra_wal::WalError) -> Self {
        match e {
            sovra_wal::WalError::Corrupt(c) => LedgerError::integrity(c.to_string()),
            e => LedgerError::storage(e.to_string()),
        }
    }
}

/// An appended entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Its index (sequence number).
    pub index: u64,
    /// Its RFC 9162 leaf hash.
    pub leaf_hash: [u8; 32],
    /// Its encoded bytes.
    pub bytes: Vec<u8>,
}

/// The current consent of a customer for one purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentStatus {
    /// The purpose.
    pub purpose: String,
    /// The latest action.
    pub action: ConsentAction,
    /// Index of the entry that set it.
    pub index: u64,
    /// When.
    pub timestamp_ms: u64,
}

impl ConsentStatus {
    fn encode(&self) -> [u8; 17] {
        let mut v = [0u8; 17];
        v[0] = match self.action {
            ConsentAction::Grant => 1,
            ConsentAction::Withdraw => 2,
        };
        v[1..9].copy_from_slice(&self.index.to_be_bytes());
        v[9..].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        v
    }
    fn decode(purpose: String, v: &[u8]) -> Result<Self> {
        let bad = || {
            LedgerError::integrity(format!(
                "consent view entry for `{purpose}` is damaged; rebuild the view"
            ))
        };
        if v.len() != 17 {
            return Err(bad());
        }
        let action = match v[0] {
            1 => ConsentAction::Grant,
            2 => ConsentAction::Withdraw,
            _ => return Err(bad()),
        };
        let mut a = [0u8; 8];
        a.copy_from_slice(&v[1..9]);
        let index = u64::from_be_bytes(a);
        a.copy_from_slice(&v[9..]);
        Ok(ConsentStatus {
            purpose,
            action,
            index,
            timestamp_ms: u64::from_be_bytes(a),
        })
    }
}

/// The consent view: (customer, purpose) → status.
pub type ConsentView = BTreeMap<(Pseudonym, String), ConsentStatus>;

/// A receipt: the entry with a `tlog-proof@v1` against a signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The entry bytes.
    pub entry: Vec<u8>,
    /// The proof document.
    pub proof: TlogProof,
}

/// The right edge of the tree: the hashes of the complete subtrees that
/// make up `[0, size)`, largest first, with their stored-hash indexes.
#[derive(Debug, Clone, Default)]
struct Frontier(Vec<(u64, Hash)>);

impl HashReader for Frontier {
    fn read_hashes(&self, indexes: &[u64]) -> std::result::Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|i| {
                self.0
                    .iter()
                    .find(|(j, _)| j == i)
                    .map(|(_, h)| *h)
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)
            })
            .collect()
    }
}

impl Frontier {
    /// The hashes to store for leaf `n` (stored_hash_index(0, n) onwards),
    /// updating the frontier.
    fn push(&mut self, n: u64, leaf: Hash) -> Result<Vec<Hash>> {
        let hashes = tlog_tiles::stored_hashes_for_record_hash(n, leaf, self).map_err(|e| {
            LedgerError::integrity(format!("the tree edge before entry {n} is incomplete: {e}"))
        })?;
        let merged = hashes.len() - 1;
        self.0.truncate(self.0.len().saturating_sub(merged));
        // INVARIANT: merged < 64, the number of trailing ones of a u64.
        let top = tlog_tiles::stored_hash_index(merged as u8, n >> merged);
        self.0.push((top, hashes[merged]));
        Ok(hashes)
    }

    #[cfg(test)]
    fn root(&self) -> [u8; 32] {
        let mut it = self.0.iter().rev();
        let Some((_, last)) = it.next() else {
            return crate::proof::EMPTY_ROOT;
        };
        let mut h = *last;
        for (_, left) in it {
            h = tlog_tiles::node_hash(*left, h);
        }
        h.0
    }

    fn load(tree: &HashFile, size: u64) -> Result<Frontier> {
        let mut f = Vec::new();
        let mut lo = 0u64;
        for level in (0..64u8).rev() {
            if size & (1 << level) != 0 {
                let idx = tlog_tiles::stored_hash_index(level, lo >> level);
                f.push((idx, tree.read(idx)?));
                lo += 1 << level;
            }
        }
        Ok(Frontier(f))
    }
}

/// Reads stored hashes, for proofs over any size up to the log's.
struct Stored<'a>(&'a HashFile);

impl HashReader for Stored<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> std::result::Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|&i| {
                self.0
                    .read(i)
                    .map_err(|e| tlog_tiles::Error::InvalidInput(e.to_string()))
            })
            .collect()
    }
}

struct Head {
    size: u64,
    last_leaf: [u8; 32],
    last_ts: u64,
    frontier: Frontier,
    /// The write-ahead log's LSN after this ledger's last frame.
    lsn: u64,
}

struct Inner {
    db: sled::Db,
    log: sled::Tree,
    checkpoints: sled::Tree,
    hashes: HashFile,
    key: LogKey,
    applied: AtomicU64,
    durable: AtomicU64,
    latest: Mutex<Option<SignedCheckpoint>>,
    wal: Option<Arc<sovra_wal::Wal>>,
    /// With a write-ahead log: (LSN after the last frame, size after it).
    logged: Mutex<(u64, u64)>,
}

type Waiter = oneshot::Sender<std::result::Result<u64, String>>;

/// The ledger.
pub struct Ledger {
    inner: Arc<Inner>,
    head: Mutex<Head>,
    committer: Option<mpsc::Sender<Waiter>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ledger({})", self.inner.key.origin())
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.committer.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn be_u64(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

impl Inner {
    /// With a write-ahead log: counts as durable every entry whose frame
    /// the log has synced.
    fn note_durable(&self, wal: &sovra_wal::Wal) -> Result<()> {
        let (lsn, size) = *self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if wal.durable_lsn()? >= lsn {
            self.durable.fetch_max(size, Ordering::AcqRel);
        }
        Ok(())
    }

    fn tree_hash(&self, size: u64) -> Result<[u8; 32]> {
        tlog_tiles::tree_hash(size, &Stored(&self.hashes))
            .map(|h| h.0)
            .map_err(|e| {
                LedgerError::integrity(format!("cannot compute the root at size {size}: {e}"))
            })
    }

    /// The latest checkpoint, signing a new one if entries became durable
    /// since.
    fn checkpoint(&self) -> Result<SignedCheckpoint> {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let durable = self.durable.load(Ordering::Acquire);
        if let Some(cp) = latest.as_ref().filter(|cp| cp.size >= durable) {
            return Ok(cp.clone());
        }
        // INVARIANT: `durable` only counts flushed entries (see the commit
        // thread), so this signs nothing a crash could take back.
        let cp = self
            .key
            .sign_checkpoint(durable, &self.tree_hash(durable)?)?;
        self.checkpoints
            .insert(durable.to_be_bytes(), cp.note.as_slice())?;
        *latest = Some(cp.clone());
        Ok(cp)
    }

    /// Without a write-ahead log: makes every applied entry durable by
    /// flushing the ledger's own files.
    fn flush(&self) -> std::result::Result<u64, String> {
        let target = self.applied.load(Ordering::Acquire);
        // Hashes first: a durable entry should find its hashes durable too
        // (and if not, open rebuilds them from the entries).
        self.hashes.sync().map_err(|e| e.to_string())?;
        self.db.flush().map_err(|e| e.to_string())?;
        self.durable.fetch_max(target, Ordering::AcqRel);
        Ok(target)
    }
}

/// Opens the ledger's sled database in `dir`; with `logged`, sled's own
/// flusher is off.
fn open_db(dir: &Path, logged: bool) -> Result<sled::Db> {
    let mut config = sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        .cache_capacity(128 * 1024 * 1024);
    if logged {
        // sled writes on its own only when a buffer fills: the log, not
        // sled's flusher, is what makes an entry durable.
        config = config.flush_every_ms(None);
    }
    open_sled(&config).map_err(|e| match e {
            SledOpenError::Damaged => LedgerError::integrity(format!(
                "{}: the ledger database is damaged (truncated or altered) and cannot be opened; restore it from a backup",
                dir.display()
            )),
            e => LedgerError::config(format!(
                "{}: cannot open the ledger database: {e}",
                dir.display()
            )),
        })
}

/// The head of `size` stored entries, trusting the stored hashes.
fn stored_head(inner: &Inner, size: u64) -> Result<Head> {
    let (last_leaf, last_ts) = match size.checked_sub(1) {
        None => ([0; 32], 0),
        Some(i) => {
            let b = inner.log.get(entry_key(i))?.ok_or_else(|| {
                LedgerError::integrity(format!("entry {i} (the last) is missing"))
            })?;
            let e = Entry::decode(&b).map_err(|e| {
                LedgerError::integrity(format!("entry {i} (the last) does not decode: {e}"))
            })?;
            (leaf_hash(&b), e.timestamp_ms)
        }
    };
    Ok(Head {
        size,
        last_leaf,
        last_ts,
        frontier: Frontier::load(&inner.hashes, size)?,
        lsn: 0,
    })
}

/// With the log, sled gets an append's records key by key (entry, subject
/// record, consent record, then the size), so a crash can leave entries
/// beyond the recorded size: removes them with their subject records and
/// returns how many. None was acknowledged as stored by the view; the log
/// applies again those it holds.
fn drop_unfinished(log: &sled::Tree, size: u64) -> Result<u64> {
    let mut dropped = 0;
    let tail: Vec<(sled::IVec, sled::IVec)> = log
        .range(entry_key(size)..=entry_key(u64::MAX))
        .collect::<std::result::Result<_, _>>()?;
    for (k, v) in tail {
        let seq =
            be_u64(&k[1..]).ok_or_else(|| LedgerError::integrity("an entry key is damaged"))?;
        if let Ok(e) = Entry::decode(&v) {
            if let Some(s) = e.body.subject() {
                log.remove(subject_key(s, seq))?;
            }
        }
        log.remove(k)?;
        dropped += 1;
    }
    Ok(dropped)
}

/// Checks the log against the latest checkpoint it signed, and keeps it.
fn check_latest_checkpoint(inner: &Inner, size: u64) -> Result<()> {
    if let Some(item) = inner.checkpoints.iter().next_back() {
        let (_, note) = item?;
        let cp = crate::checkpoint::verify_checkpoint(&note, &inner.key.verifier_key())
            .map_err(|e| LedgerError::integrity(format!("the latest stored checkpoint: {e}")))?;
        if cp.size > size {
            return Err(LedgerError::integrity(format!(
                    "the log holds {size} entries but signed a checkpoint at size {}: entries {size}..{} were removed",
                    cp.size, cp.size
                )));
        }
        if cp.root != inner.tree_hash(cp.size)? {
            return Err(LedgerError::integrity(format!(
                "the entries do not match the checkpoint signed at size {}: history was rewritten",
                cp.size
            )));
        }
        *inner.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(cp);
    }
    Ok(())
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir`, signing with `key`.
    pub fn open(dir: &Path, key: LogKey, opts: LedgerOptions) -> Result<Ledger> {
        std::fs::create_dir_all(dir).map_err(|e| {
            LedgerError::config(format!(
                "{}: cannot create the ledger directory: {e}",
                dir.display()
            ))
        })?;
        let db = open_db(dir, opts.wal.is_some())?;
        let log = db.open_tree("log")?;
        let checkpoints = db.open_tree("checkpoints")?;
        let size = match log.get(META_SIZE)? {
            None => 0,
            Some(v) => be_u64(&v)
                .ok_or_else(|| LedgerError::integrity("the stored log size is damaged"))?,
        };
        let dropped = match opts.wal {
            Some(_) => drop_unfinished(&log, size)?,
            None => 0,
        };
        if dropped > 0 {
            tracing::warn!(
                entries = dropped,
                from = size,
                "the ledger's files hold entries beyond their recorded size (an append a crash cut short); removed them"
            );
        }
        let hashes = HashFile::open(&dir.join("hashes.dat"))?;
        let flushed = match log.get(META_WAL)? {
            None => None,
            Some(v) => Some(
                <[u8; 16]>::try_from(&v[..])
                    .map(|b| (be_u64(&b[..8]).unwrap_or(0), be_u64(&b[8..]).unwrap_or(0)))
                    .map_err(|_| LedgerError::integrity("the stored log position is damaged"))?,
            ),
        };
        let mut needed = tlog_tiles::stored_hash_count(size);
        if let (Some(_), Some((_, at))) = (&opts.wal, flushed) {
            // Beyond the last view flush the hash file may hold pages a
            // crash left unwritten: rebuild that part from the entries.
            needed = needed.min(tlog_tiles::stored_hash_count(at.min(size)));
        }
        if hashes.len() > needed {
            // Hashes of appends whose entries never reached sled.
            hashes.truncate(needed)?;
        }
        let inner = Arc::new(Inner {
            db,
            log,
            checkpoints,
            hashes,
            key,
            applied: AtomicU64::new(size),
            durable: AtomicU64::new(size),
            latest: Mutex::new(None),
            wal: opts.wal.clone(),
            logged: Mutex::new((0, 0)),
        });
        let head = if opts.verify_on_open {
            verify_stored(&inner, size)?
        } else {
            stored_head(&inner, size)?
        };
        let head = match &opts.wal {
            None => head,
            Some(wal) => replay_wal(&inner, head, wal, flushed)?.0,
        };
        check_latest_checkpoint(&inner, size)?;
        let (tx, rx) = mpsc::channel::<Waiter>();
        let t_inner = inner.clone();
        let interval = opts.checkpoint_interval.max(Duration::from_millis(10));
        let thread = thread::Builder::new()
            .name("sovra-ledger".into())
            .spawn(move || commit_loop(&t_inner, &rx, interval))
            .map_err(|e| {
                LedgerError::storage(format!("cannot start the ledger commit thread: {e}"))
            })?;
        let ledger = Ledger {
            inner,
            head: Mutex::new(head),
            committer: Some(tx),
            thread: Some(thread),
        };
        if dropped > 0 {
            // Their consent records, if any reached the file, are derived
            // again from the entries.
            ledger.rebuild_consent_view()?;
        }
        if ledger.inner.wal.is_some() {
            // Records where the view now stands, so that a crash before
            // the next flush replays from here.
            ledger.flush_view()?;
        }
        Ok(ledger)
    }

    fn head(&self) -> MutexGuard<'_, Head> {
        // A poisoned head means an append panicked before touching it: the
        // state it guards is only changed after sled accepted the batch.
        self.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The log origin.
    pub fn origin(&self) -> &str {
        self.inner.key.origin()
    }

    /// The log's verifier key (C2SP note format).
    pub fn verifier_key(&self) -> String {
        self.inner.key.verifier_key()
    }

    /// Entries appended (durable or not).
    pub fn size(&self) -> u64 {
        self.inner.applied.load(Ordering::Acquire)
    }

    /// Entries known to be on disk.
    pub fn durable_size(&self) -> u64 {
        self.inner.durable.load(Ordering::Acquire)
    }

    /// Appends `bodies` in order, atomically. Not durable until
    /// [`Ledger::commit`].
    pub fn append(&self, bodies: &[Body]) -> Result<Vec<Appended>> {
        let mut head = self.head();
        let ts = now_ms().max(head.last_ts);
        let mut items: Vec<(Entry, Vec<u8>)> = Vec::with_capacity(bodies.len());
        for (i, body) in (head.size..).zip(bodies) {
            let prev = match items.last() {
                Some((_, bytes)) => leaf_hash(bytes),
                None => head.last_leaf,
            };
            let entry = Entry {
                format: crate::entry::FORMAT_VERSION,
                seq: i,
                timestamp_ms: ts,
                prev_hash: Digest(prev),
                body: body.clone(),
            };
            let bytes = entry.encode()?;
            items.push((entry, bytes));
        }
        let out = apply_entries(&self.inner, &mut head, items)?;
        self.log_appended(&mut head, &out)?;
        Ok(out)
    }

    /// Appends entries made by another copy of this log (`sovra migrate`),
    /// byte for byte: each must decode and continue the log (its index and
    /// the previous entry's leaf hash), or nothing of the call is applied.
    /// Not durable until [`Ledger::commit`].
    pub fn import(&self, entries: &[Vec<u8>]) -> Result<()> {
        let mut head = self.head();
        let mut items = Vec::with_capacity(entries.len());
        for bytes in entries {
            let e = Entry::decode(bytes).map_err(|e| {
                LedgerError::integrity(format!(
                    "an entry to import at {}: {e}",
                    head.size + items.len() as u64
                ))
            })?;
            items.push((e, bytes.clone()));
        }
        let out = apply_entries(&self.inner, &mut head, items)?;
        self.log_appended(&mut head, &out)
    }

    /// Logs appended entries in the write-ahead log, if there is one.
    fn log_appended(&self, head: &mut Head, out: &[Appended]) -> Result<()> {
        if let Some(wal) = &self.inner.wal {
            // INVARIANT: logged under the head lock, so the log holds the
            // ledger's entries in sequence order.
            let records: Vec<Vec<u8>> = out
                .iter()
                .map(|a| {
                    let mut r = Vec::with_capacity(1 + a.bytes.len());
                    r.push(sovra_wal::tag::LEDGER_ENTRY);
                    r.extend_from_slice(&a.bytes);
                    r
                })
                .collect();
            let refs: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
            head.lsn = wal.append(&refs)?;
            *self.inner.logged.lock().unwrap_or_else(|p| p.into_inner()) = (head.lsn, head.size);
        }
        Ok(())
    }

    /// Makes the ledger's own files current and records the log position
    /// they hold (with a write-ahead log; without one, the same as
    /// [`Ledger::flush`]). Returns the LSN below which the log's ledger
    /// records are no longer needed.
    pub fn flush_view(&self) -> Result<u64> {
        let Some(wal) = &self.inner.wal else {
            return self.inner.flush().map(|_| 0).map_err(LedgerError::storage);
        };
        // INVARIANT: taken under the head lock, so every ledger record
        // below `lsn` was appended, and so applied, already: the view needs
        // nothing below it, even when other owners' records come after the
        // ledger's last.
        let (lsn, size) = {
            let h = self.head();
            (wal.next_lsn(), h.size)
        };
        wal.wait_durable_blocking(lsn)?;
        self.inner.durable.fetch_max(size, Ordering::AcqRel);
        // INVARIANT: the view is on disk before the position that lets
        // start-up skip the records it holds.
        self.inner
            .hashes
            .sync()
            .map_err(|e| LedgerError::storage(format!("hash file: sync: {e}")))?;
        self.inner.db.flush()?;
        let mut pos = [0u8; 16];
        pos[..8].copy_from_slice(&lsn.to_be_bytes());
        pos[8..].copy_from_slice(&size.to_be_bytes());
        self.inner.log.insert(META_WAL, &pos[..])?;
        self.inner.db.flush()?;
        Ok(lsn)
    }

    /// Waits until every append made before the call is on disk; returns the
    /// durable size.
    pub async fn commit(&self) -> Result<u64> {
        if let Some(wal) = &self.inner.wal {
            // INVARIANT: the size is the one logged with `lsn`: once that
            // frame is durable, so is every entry below the size.
            let (lsn, size) = *self.inner.logged.lock().unwrap_or_else(|p| p.into_inner());
            wal.wait_durable(lsn).await?;
            self.inner.durable.fetch_max(size, Ordering::AcqRel);
            return Ok(self.durable_size());
        }
        let (tx, rx) = oneshot::channel();
        self.committer
            .as_ref()
            .ok_or_else(|| LedgerError::storage("the ledger is closing"))?
            .send(tx)
            .map_err(|_| LedgerError::storage("the ledger commit thread has stopped"))?;
        match rx.await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(LedgerError::storage(format!("flush failed: {e}"))),
            Err(_) => Err(LedgerError::storage("the ledger commit thread has stopped")),
        }
    }

    /// Flushes synchronously (for callers without a runtime): every append
    /// is durable and, with a write-ahead log, the view is flushed too.
    pub fn flush(&self) -> Result<u64> {
        if self.inner.wal.is_some() {
            self.flush_view()?;
            return Ok(self.durable_size());
        }
        self.inner.flush().map_err(LedgerError::storage)
    }

    /// Appends and waits until durable.
    pub async fn append_durable(&self, bodies: &[Body]) -> Result<Vec<Appended>> {
        let a = self.append(bodies)?;
        self.commit().await?;
        Ok(a)
    }

    /// The latest signed checkpoint; signs a fresh one if entries became
    /// durable since the last.
    pub fn checkpoint(&self) -> Result<SignedCheckpoint> {
        self.inner.checkpoint()
    }

    /// The root of the tree of `size` leaves (at most the durable size).
    pub fn tree_root(&self, size: u64) -> Result<[u8; 32]> {
        let durable = self.durable_size();
        if size > durable {
            return Err(LedgerError::out_of_range(format!(
                "tree size {size} is beyond the log, which holds {durable} committed entries"
            )));
        }
        self.inner.tree_hash(size)
    }

    /// A stored checkpoint of exactly `size`, if one was issued.
    pub fn checkpoint_at(&self, size: u64) -> Result<Option<SignedCheckpoint>> {
        match self.inner.checkpoints.get(size.to_be_bytes())? {
            None => Ok(None),
            Some(note) => crate::checkpoint::verify_checkpoint(&note, &self.verifier_key())
                .map(Some)
                .map_err(|e| {
                    LedgerError::integrity(format!("stored checkpoint at size {size}: {e}"))
                }),
        }
    }

    /// The entry at `index`, checked against its stored leaf hash and its
    /// position.
    pub fn entry(&self, index: u64) -> Result<(Vec<u8>, Entry)> {
        let size = self.size();
        if index >= size {
            return Err(LedgerError::out_of_range(format!(
                "entry {index} does not exist; the log holds {size} entries"
            )));
        }
        let bytes = self
            .inner
            .log
            .get(entry_key(index))?
            .ok_or_else(|| {
                LedgerError::integrity(format!("entry {index} is missing from storage"))
            })?
            .to_vec();
        let stored = self
            .inner
            .hashes
            .read(tlog_tiles::stored_hash_index(0, index))?;
        if stored.0 != leaf_hash(&bytes) {
            return Err(LedgerError::integrity(format!(
                "entry {index} does not match its Merkle leaf hash: it was altered or replaced"
            )));
        }
        let e = Entry::decode(&bytes)
            .map_err(|e| LedgerError::integrity(format!("entry {index} does not decode: {e}")))?;
        if e.seq != index {
            return Err(LedgerError::integrity(format!(
                "entry stored at index {index} carries sequence number {}: entries were moved",
                e.seq
            )));
        }
        Ok((bytes, e))
    }

    fn check_sizes(&self, index_or_size: u64, tree_size: u64) -> Result<()> {
        let durable = self.durable_size();
        if tree_size > durable {
            return Err(LedgerError::out_of_range(format!(
                "tree size {tree_size} is beyond the log, which holds {durable} committed entries"
            )));
        }
        if index_or_size >= tree_size {
            return Err(LedgerError::out_of_range(format!(
                "index {index_or_size} is not below tree size {tree_size}"
            )));
        }
        Ok(())
    }

    /// The inclusion proof of entry `index` in the tree of `tree_size`.
    pub fn inclusion_proof(&self, index: u64, tree_size: u64) -> Result<Vec<[u8; 32]>> {
        self.check_sizes(index, tree_size)?;
        self.entry(index)?;
        tlog_tiles::prove_record(tree_size, index, &Stored(&self.inner.hashes))
            .map(|p| p.into_iter().map(|h| h.0).collect())
            .map_err(|e| LedgerError::integrity(format!("proof of entry {index}: {e}")))
    }

    /// The consistency proof from `size1` to `size2`.
    pub fn consistency_proof(&self, size1: u64, size2: u64) -> Result<Vec<[u8; 32]>> {
        if size1 == 0 {
            return Err(LedgerError::invalid(
                "first tree size: a consistency proof from size 0 is undefined; every tree extends the empty tree",
            ));
        }
        if size1 > size2 {
            return Err(LedgerError::invalid(format!(
                "tree sizes: {size1} is larger than {size2}"
            )));
        }
        self.check_sizes(size1 - 1, size2)?;
        tlog_tiles::prove_tree(size2, size1, &Stored(&self.inner.hashes))
            .map(|p| p.into_iter().map(|h| h.0).collect())
            .map_err(|e| LedgerError::integrity(format!("consistency proof {size1}→{size2}: {e}")))
    }

    /// A receipt for entry `index` against the latest checkpoint (which
    /// must cover it: commit first).
    pub fn receipt(&self, index: u64) -> Result<Receipt> {
        let cp = self.checkpoint()?;
        let hashes = self.inclusion_proof(index, cp.size)?;
        let (entry, _) = self.entry(index)?;
        Ok(Receipt {
            entry,
            proof: TlogProof {
                extra: None,
                index,
                hashes,
                checkpoint: cp.note,
            },
        })
    }

    /// Indexes of the entries about `subject`, in order.
    pub fn subject_entries(&self, subject: &Pseudonym) -> Result<Vec<u64>> {
        let prefix = subject_prefix(subject);
        let mut out = Vec::new();
        for item in self.inner.log.scan_prefix(&prefix) {
            let (k, _) = item?;
            let seq = be_u64(&k[prefix.len()..])
                .ok_or_else(|| LedgerError::integrity("a subject index key is damaged"))?;
            out.push(seq);
        }
        Ok(out)
    }

    /// The current consent of `subject` for `purpose`.
    pub fn consent(&self, subject: &Pseudonym, purpose: &str) -> Result<Option<ConsentStatus>> {
        match self.inner.log.get(consent_key(subject, purpose))? {
            None => Ok(None),
            Some(v) => ConsentStatus::decode(purpose.to_owned(), &v).map(Some),
        }
    }

    /// Every purpose `subject` has a consent record for.
    pub fn consent_state(&self, subject: &Pseudonym) -> Result<Vec<ConsentStatus>> {
        let prefix = consent_prefix(subject);
        let mut out = Vec::new();
        for item in self.inner.log.scan_prefix(&prefix) {
            let (k, v) = item?;
            let purpose = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push(ConsentStatus::decode(purpose, &v)?);
        }
        Ok(out)
    }

    /// The consent view as stored.
    pub fn stored_consent_view(&self) -> Result<ConsentView> {
        let mut view = ConsentView::new();
        for item in self.inner.log.scan_prefix(b"c") {
            let (k, v) = item?;
            if k.len() < 33 {
                return Err(LedgerError::integrity("a consent view key is damaged"));
            }
            let subject = Digest::from_slice("consent key", &k[1..33])?;
            let purpose = String::from_utf8_lossy(&k[33..]).into_owned();
            let st = ConsentStatus::decode(purpose.clone(), &v)?;
            view.insert((subject, purpose), st);
        }
        Ok(view)
    }

    /// The consent view derived from the entries alone.
    pub fn derive_consent_view(&self) -> Result<ConsentView> {
        Ok(self.derive_consent_view_of(None)?.0)
    }

    /// The consent view derived from `tenant`'s entries (every entry for
    /// `None`), and every customer any entry names, with whether one of the
    /// entries naming it is `tenant`'s.
    fn derive_consent_view_of(
        &self,
        tenant: Option<&str>,
    ) -> Result<(ConsentView, std::collections::HashMap<Pseudonym, bool>)> {
        let mut view = ConsentView::new();
        let mut named = std::collections::HashMap::new();
        for i in 0..self.size() {
            let (_, e) = self.entry(i)?;
            let ours = tenant.is_none_or(|t| e.body.tenant() == Some(t));
            if let Some(s) = e.body.subject() {
                *named.entry(*s).or_insert(false) |= ours;
            }
            if let (Some((c, action)), true) = (e.body.consent(), ours) {
                view.insert(
                    (c.subject, c.purpose.clone()),
                    ConsentStatus {
                        purpose: c.purpose.clone(),
                        action,
                        index: i,
                        timestamp_ms: e.timestamp_ms,
                    },
                );
            }
        }
        Ok((view, named))
    }

    /// Replaces the stored consent view with one derived from the entries;
    /// returns how many records were added, changed or removed.
    pub fn rebuild_consent_view(&self) -> Result<usize> {
        self.rebuild_consent_view_for(None)
    }

    /// [`Ledger::rebuild_consent_view`] limited to one tenant: only the
    /// records of customers that this tenant's entries name are derived
    /// and corrected, and records of customers that no entry names at all
    /// (no tenant's state, only damage) are removed. Records of customers
    /// that only other tenants' entries name are left as they are.
    pub fn rebuild_consent_view_for(&self, tenant: Option<&str>) -> Result<usize> {
        // Appends are held off so the view matches the entries exactly.
        let _head = self.head();
        let (derived, named) = self.derive_consent_view_of(tenant)?;
        let in_scope = |s: &Pseudonym| named.get(s).copied().unwrap_or(true);
        let mut stored = self.stored_consent_view()?;
        stored.retain(|k, _| in_scope(&k.0));
        let mut batch = sled::Batch::default();
        let mut changed = 0;
        for (k, st) in &stored {
            if derived.get(k) != Some(st) {
                batch.remove(consent_key(&k.0, &k.1));
                changed += 1;
            }
        }
        for (k, st) in &derived {
            if stored.get(k) != Some(st) {
                batch.insert(consent_key(&k.0, &k.1), &st.encode()[..]);
                if !stored.contains_key(k) {
                    changed += 1;
                }
            }
        }
        self.inner.log.apply_batch(batch)?;
        self.inner.db.flush()?;
        Ok(changed)
    }
}

/// Why a sled database did not open.
#[derive(Debug)]
pub enum SledOpenError {
    /// sled panicked reading it: a file is truncated or altered.
    Damaged,
    /// Another process holds its lock.
    Locked(sled::Error),
    /// Anything else (I/O, a corruption sled reports itself).
    Other(sled::Error),
}

impl std::fmt::Display for SledOpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SledOpenError::Damaged => f.write_str("the database is damaged (truncated or altered)"),
            SledOpenError::Locked(e) => {
                write!(f, "{e} (is another `sovra serve` using it?)")
            }
            SledOpenError::Other(e) => write!(f, "{e}"),
        }
    }
}

/// Opens a sled database, telling damage and a held lock from other
/// failures. sled panics on some damaged files (a truncated segment)
/// instead of returning an error; that panic is caught here, so a damaged
/// database is refused with a message rather than ending the process.
pub fn open_sled(config: &sled::Config) -> std::result::Result<sled::Db, SledOpenError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())) {
        Err(_) => Err(SledOpenError::Damaged),
        Ok(Ok(db)) => Ok(db),
        // sled 0.34 reports a held lock as an I/O error whose text names
        // the lock.
        Ok(Err(sled::Error::Io(io)))
            if io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock") =>
        {
            Err(SledOpenError::Locked(sled::Error::Io(io)))
        }
        Ok(Err(e)) => Err(SledOpenError::Other(e)),
    }
}

/// Stores entries whose sequence numbers continue `head`, with their
/// hashes and index records (one sled batch without the log, key by key
/// with it); moves the head.
fn apply_entries(
    inner: &Inner,
    head: &mut Head,
    items: Vec<(Entry, Vec<u8>)>,
) -> Result<Vec<Appended>> {
    let mut frontier = head.frontier.clone();
    let mut size = head.size;
    let mut prev = head.last_leaf;
    let mut last_ts = head.last_ts;
    // In order: each entry, then its index records, then the size. With
    // the log, sled gets them key by key (a sled batch seals and writes one
    // of its I/O buffers, most of an append's cost); a crash can then leave
    // a prefix of them, and open drops entries beyond the size with their
    // subject records (`drop_unfinished`). Without the log, one batch.
    let mut ops: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(items.len() * 3 + 1);
    let mut out = Vec::with_capacity(items.len());
    let first_hash = tlog_tiles::stored_hash_index(0, size);
    let mut new_hashes = Vec::with_capacity(items.len() * 2 + 1);
    for (entry, bytes) in items {
        // INVARIANT: callers build (append) or check (replay) both.
        if entry.seq != size || entry.prev_hash.0 != prev {
            return Err(LedgerError::integrity(format!(
                "entry {} does not continue the log at {size}",
                entry.seq
            )));
        }
        let leaf = leaf_hash(&bytes);
        new_hashes.extend(frontier.push(size, Hash(leaf))?);
        ops.push((entry_key(size).to_vec(), bytes.clone()));
        if let Some(s) = entry.body.subject() {
            ops.push((subject_key(s, size), Vec::new()));
        }
        if let Some((c, action)) = entry.body.consent() {
            let st = ConsentStatus {
                purpose: c.purpose.clone(),
                action,
                index: size,
                timestamp_ms: entry.timestamp_ms,
            };
            ops.push((consent_key(&c.subject, &c.purpose), st.encode().to_vec()));
        }
        out.push(Appended {
            index: size,
            leaf_hash: leaf,
            bytes,
        });
        prev = leaf;
        last_ts = last_ts.max(entry.timestamp_ms);
        size += 1;
    }
    ops.push((META_SIZE.to_vec(), size.to_be_bytes().to_vec()));
    // INVARIANT: stored hashes are dense and written in index order, so
    // this batch's hashes start where the file ends.
    inner.hashes.write(first_hash, &new_hashes)?;
    if inner.wal.is_some() {
        for (k, v) in ops {
            inner.log.insert(k, v)?;
        }
    } else {
        let mut batch = sled::Batch::default();
        for (k, v) in ops {
            batch.insert(k, v);
        }
        inner.log.apply_batch(batch)?;
    }
    // INVARIANT: the head moves only after sled accepted the batch, so a
    // failed append leaves no gap and no half-built tree.
    head.frontier = frontier;
    head.size = size;
    head.last_leaf = prev;
    head.last_ts = last_ts;
    inner.applied.store(size, Ordering::Release);
    Ok(out)
}

/// Brings the view up to the write-ahead log: entries the view holds are
/// checked byte for byte against their records and entries it lacks are
/// applied. Returns the head and how many entries the view holds beyond
/// the log (see the end of the function).
fn replay_wal(
    inner: &Inner,
    mut head: Head,
    wal: &sovra_wal::Wal,
    flushed: Option<(u64, u64)>,
) -> Result<(Head, u64)> {
    // Without a recorded position the ledger is new, or from before the
    // log (its files were flushed at every commit): it starts the log here,
    // and the log must hold none of its entries, or the ledger's files were
    // deleted or replaced under it.
    // A log kept in PostgreSQL holds every record from LSN 0: an empty
    // ledger view beside it (a new server, or a cache that was cleared) is
    // built again from the log, and every entry is checked as it is.
    let rebuild = flushed.is_none() && wal.is_postgres() && head.size == 0;
    let legacy = flushed.is_none() && !rebuild;
    let (from, flushed_size) = flushed.unwrap_or((wal.first_lsn(), head.size));
    let log_end = wal.durable_lsn()?;
    if from > log_end {
        return Err(LedgerError::integrity(format!(
            "the ledger's files were flushed at LSN {from} of the write-ahead log, which ends at LSN {log_end}: the log in {} was deleted or restored from an older copy",
            wal.place()
        )));
    }
    let mut logged_end = flushed_size;
    let mut failed: Option<LedgerError> = None;
    let end = wal.replay(from, |lsn, rec| {
        if failed.is_some() || rec.first() != Some(&sovra_wal::tag::LEDGER_ENTRY) {
            return Ok(());
        }
        let bytes = &rec[1..];
        let r = (|| -> Result<u64> {
            if legacy {
                return Err(LedgerError::integrity(format!(
                    "the ledger's files record no position in the write-ahead log, which holds ledger entries (the first at LSN {lsn}): \
                     the ledger folder was deleted, replaced or restored from a copy made before the log"
                )));
            }
            let e = Entry::decode(bytes).map_err(|e| {
                LedgerError::integrity(format!(
                    "the write-ahead log's record at LSN {lsn} is not a ledger entry: {e}"
                ))
            })?;
            let seq = e.seq;
            if seq < head.size {
                let stored = inner.log.get(entry_key(seq))?;
                if stored.as_deref() != Some(bytes) {
                    return Err(LedgerError::integrity(format!(
                        "entry {seq} in the ledger's files differs from the write-ahead log (LSN {lsn}): the ledger's files were altered"
                    )));
                }
            } else if seq == head.size {
                apply_entries(inner, &mut head, vec![(e, bytes.to_vec())])?;
            } else {
                return Err(LedgerError::integrity(format!(
                    "the write-ahead log holds entry {seq} (LSN {lsn}) but the ledger ends at {}: entries {}..{seq} are missing from both",
                    head.size, head.size
                )));
            }
            Ok(seq)
        })();
        match r {
            Ok(seq) => logged_end = logged_end.max(seq + 1),
            Err(e) => failed = Some(e),
        }
        Ok(())
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    head.lsn = end;
    *inner.logged.lock().unwrap_or_else(|p| p.into_inner()) = (end, logged_end.min(head.size));
    if head.size <= logged_end {
        inner.durable.store(head.size, Ordering::Release);
        return Ok((head, 0));
    }
    // The view is ahead of the log: sled wrote entries whose frame the
    // process did not live to write. They are whole, chained entries the
    // ledger built itself, each describing an attempt that may not have
    // been acknowledged; keeping them over-reports (a reveal that may not
    // have reached its caller), cutting them could hide an acknowledged
    // one if the log itself was damaged. They are kept, and made durable by
    // the view flush that ends the open.
    tracing::warn!(
        entries = head.size - logged_end,
        from = logged_end,
        "the ledger's files hold entries whose log frame never reached disk; they are kept"
    );
    inner.durable.store(head.size, Ordering::Release);
    *inner.logged.lock().unwrap_or_else(|p| p.into_inner()) = (end, head.size);
    let ahead = head.size - logged_end;
    Ok((head, ahead))
}

/// Re-derives every stored hash from the entries and checks the chain.
fn verify_stored(inner: &Inner, size: u64) -> Result<Head> {
    if let Some(item) = inner.log.scan_prefix(b"e").next_back() {
        let (k, _) = item?;
        let last =
            be_u64(&k[1..]).ok_or_else(|| LedgerError::integrity("an entry key is damaged"))?;
        if last >= size {
            return Err(LedgerError::integrity(format!(
                "entry {last} is stored beyond the recorded log size {size}"
            )));
        }
    }
    let mut frontier = Frontier::default();
    let mut prev = [0u8; 32];
    let mut last_ts = 0;
    let mut continue_rebuild = false;
    for seq in 0..size {
        let bytes = inner.log.get(entry_key(seq))?.ok_or_else(|| {
            LedgerError::integrity(format!("entry {seq} is missing: entries were deleted"))
        })?;
        let e = Entry::decode(&bytes).map_err(|e| {
            LedgerError::integrity(format!("entry {seq} does not decode ({e}): it was altered"))
        })?;
        if e.seq != seq {
            return Err(LedgerError::integrity(format!(
                "entry stored at index {seq} carries sequence number {}: entries were moved or reordered",
                e.seq
            )));
        }
        if e.prev_hash.0 != prev {
            return Err(LedgerError::integrity(format!(
                "entry {seq} does not chain to entry {}: the hash chain is broken there",
                seq.saturating_sub(1)
            )));
        }
        let leaf = leaf_hash(&bytes);
        let hashes = frontier.push(seq, Hash(leaf))?;
        let base = tlog_tiles::stored_hash_index(0, seq);
        if inner.hashes.len() <= base {
            // A tail lost in a crash (the entries reached disk, the hash
            // file did not): the hashes are derived data, so rebuild it.
            inner.hashes.write(base, &hashes)?;
            continue_rebuild = true;
        } else {
            for (i, h) in (base..).zip(hashes.iter()) {
                if inner.hashes.read(i)? != *h {
                    return Err(LedgerError::integrity(format!(
                        "stored Merkle hash {i} disagrees with entry {seq}: the entry or the tree was altered"
                    )));
                }
            }
        }
        prev = leaf;
        last_ts = e.timestamp_ms;
    }
    if continue_rebuild {
        tracing::warn!("rebuilt the tail of the Merkle hash file from the entries");
        inner
            .hashes
            .sync()
            .map_err(|e| LedgerError::storage(format!("hash file: sync: {e}")))?;
    }
    Ok(Head {
        size,
        last_leaf: prev,
        last_ts,
        frontier,
        lsn: 0,
    })
}

/// The group-commit thread: flushes once for every batch of waiters, and
/// signs a checkpoint at least every `interval` while the log grows.
fn commit_loop(inner: &Inner, rx: &mpsc::Receiver<Waiter>, interval: Duration) {
    let mut last_sign = Instant::now();
    loop {
        match rx.recv_timeout(interval) {
            Ok(first) => {
                let mut waiters = vec![first];
                while let Ok(w) = rx.try_recv() {
                    waiters.push(w);
                }
                let r = inner.flush();
                for w in waiters {
                    let _ = w.send(r.clone());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(wal) = &inner.wal {
                    if let Err(e) = inner.note_durable(wal) {
                        tracing::error!(error = %e, "the ledger's write-ahead log failed");
                    }
                } else if inner.applied.load(Ordering::Acquire)
                    > inner.durable.load(Ordering::Acquire)
                {
                    if let Err(e) = inner.flush() {
                        tracing::error!(error = %e, "ledger flush failed");
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if last_sign.elapsed() >= interval {
            last_sign = Instant::now();
            if let Err(e) = inner.checkpoint() {
                tracing::error!(error = %e, "cannot sign a checkpoint");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Consent;

    pub(crate) fn consent(subject: u8, purpose: &str, grant: bool) -> Body {
        let c = Consent {
            tenant: "t".into(),
            subject: Digest([subject; 32]),
            purpose: purpose.into(),
            channel: "web".into(),
            legal_basis: "consent".into(),
            notice_version: "v1".into(),
            evidence_sha256: Digest([0; 32]),
            actor: "svc".into(),
        };
        if grant {
            Body::ConsentGranted(c)
        } else {
            Body::ConsentWithdrawn(c)
        }
    }

    fn key() -> LogKey {
        LogKey::from_seed("sovra.test/log", &[1; 32]).unwrap()
    }

    #[tokio::test]
    async fn appends_prove_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path(), key(), LedgerOptions::default()).unwrap();
        for i in 0..37u8 {
            l.append(&[consent(i % 5, "marketing", i % 3 != 0)])
                .unwrap();
        }
        l.commit().await.unwrap();
        let cp = l.checkpoint().unwrap();
        assert_eq!(cp.size, 37);
        for i in 0..37 {
            let (bytes, _) = l.entry(i).unwrap();
            let p = l.inclusion_proof(i, 37).unwrap();
            crate::proof::verify_inclusion(i, 37, &leaf_hash(&bytes), &p, &cp.root).unwrap();
        }
        let old = l.tree_root(10).unwrap();
        let p = l.consistency_proof(10, 37).unwrap();
        crate::proof::verify_consistency(10, 37, &p, &old, &cp.root).unwrap();
        assert!(l.inclusion_proof(37, 37).is_err());
        assert!(l.inclusion_proof(0, 38).is_err());
        assert!(l.consistency_proof(0, 5).is_err());
        assert_eq!(
            l.derive_consent_view().unwrap(),
            l.stored_consent_view().unwrap()
        );
        drop(l);
        let l = Ledger::open(dir.path(), key(), LedgerOptions::default()).unwrap();
        assert_eq!(l.size(), 37);
        l.append(&[consent(9, "x", true)]).unwrap();
        l.commit().await.unwrap();
        let cp2 = l.checkpoint().unwrap();
        let p = l.consistency_proof(37, 38).unwrap();
        crate::proof::verify_consistency(37, 38, &p, &cp.root, &cp2.root).unwrap();
        // The frontier root always equals the stored-tree root.
        assert_eq!(l.head().frontier.root(), cp2.root);
    }

    #[test]
    fn lost_hash_tail_is_rebuilt_and_altered_hashes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path(), key(), LedgerOptions::default()).unwrap();
        let bodies: Vec<Body> = (0..20u8).map(|i| consent(i, "a", true)).collect();
        l.append(&bodies).unwrap();
        l.flush().unwrap();
        let root = l.checkpoint().unwrap().root;
        drop(l);
        let path = dir.path().join("hashes.dat");
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(10 * 32).unwrap();
        drop(f);
        let l = Ledger::open(dir.path(), key(), LedgerOptions::default()).unwrap();
        assert_eq!(l.tree_root(20).unwrap(), root);
        drop(l);
        let mut b = std::fs::read(&path).unwrap();
        b[5 * 32] ^= 1;
        std::fs::write(&path, b).unwrap();
        let e = Ledger::open(dir.path(), key(), LedgerOptions::default()).unwrap_err();
        assert!(e.to_string().contains("stored Merkle hash 5"), "{e}");
    }

    #[test]
    fn rebuild_repairs_a_damaged_view() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path(), key(), LedgerOptions::default()).unwrap();
        l.append(&[
            consent(1, "a", true),
            consent(1, "a", false),
            consent(2, "b", true),
        ])
        .unwrap();
        let derived = l.derive_consent_view().unwrap();
        assert_eq!(derived, l.stored_consent_view().unwrap());
        l.inner
            .log
            .remove(consent_key(&Digest([2; 32]), "b"))
            .unwrap();
        l.inner
            .log
            .insert(consent_key(&Digest([3; 32]), "z"), &[1u8; 17][..])
            .unwrap();
        assert_ne!(derived, l.stored_consent_view().unwrap());
        assert_eq!(l.rebuild_consent_view().unwrap(), 2);
        assert_eq!(derived, l.stored_consent_view().unwrap());
        assert_eq!(
            l.consent(&Digest([1; 32]), "a").unwrap().unwrap().action,
            ConsentAction::Withdraw
        );
    }

    #[test]
    fn proof_time_detects_tampering_when_open_skipped_checks() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path(), key(), LedgerOptions::default()).unwrap();
        l.append(&[
            consent(1, "a", true),
            consent(2, "a", true),
            consent(3, "a", true),
        ])
        .unwrap();
        l.flush().unwrap();
        let mut b = l.inner.log.get(entry_key(1)).unwrap().unwrap().to_vec();
        let n = b.len();
        b[n - 1] ^= 1;
        l.inner.log.insert(entry_key(1), b).unwrap();
        let e = l.inclusion_proof(1, 3).unwrap_err().to_string();
        assert!(e.contains("entry 1"), "{e}");
        l.flush().unwrap();
        drop(l);
        let e = Ledger::open(dir.path(), key(), LedgerOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("entry 1"), "{e}");
    }
}
