//! The Merkle tree's stored hashes in a flat file: hash `i` (in the `tlog`
//! stored-hash order) lives at byte `32 * i` of `hashes.dat`.
//!
//! The stored-hash index is dense and every hash is written exactly once, in
//! index order, so the file is append-only and a proof's O(log n) hashes are
//! O(log n) positioned reads from the page cache. The hashes are derived
//! data: the entries (in sled) are the record, and [`Ledger::open`]
//! re-derives every hash from them, so a tail lost in a crash is rebuilt and
//! a changed hash is reported.
//!
//! Guarantees: a hash is readable only once the append that wrote it was
//! accepted (`len` moves after the write). Not guaranteed: durability before
//! [`HashFile::sync`].
//!
//! [`Ledger::open`]: crate::Ledger::open

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use tlog_tiles::Hash;

use crate::error::{LedgerError, Result};

pub(crate) struct HashFile {
    file: File,
    len: AtomicU64,
}

fn io(what: &str, e: std::io::Error) -> LedgerError {
    LedgerError::storage(format!("hash file: {what}: {e}"))
}

impl HashFile {
    pub(crate) fn open(path: &Path) -> Result<HashFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io("open", e))?;
        let bytes = file.metadata().map_err(|e| io("stat", e))?.len();
        Ok(HashFile {
            file,
            len: AtomicU64::new(bytes / 32),
        })
    }

    /// Hashes stored.
    pub(crate) fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Writes `hashes` from index `at` on and makes them readable.
    pub(crate) fn write(&self, at: u64, hashes: &[Hash]) -> Result<()> {
        let mut buf = Vec::with_capacity(hashes.len() * 32);
        for h in hashes {
            buf.extend_from_slice(&h.0);
        }
        self.file
            .write_all_at(&buf, at * 32)
            .map_err(|e| io("write", e))?;
        self.len.store(at + hashes.len() as u64, Ordering::Release);
        Ok(())
    }

    /// Drops everything from index `n` on (hashes of appends that never
    /// reached the entries).
    pub(crate) fn truncate(&self, n: u64) -> Result<()> {
        self.file.set_len(n * 32).map_err(|e| io("truncate", e))?;
        self.len.store(n, Ordering::Release);
        Ok(())
    }

    pub(crate) fn read(&self, i: u64) -> Result<Hash> {
        if i >= self.len() {
            return Err(LedgerError::integrity(format!(
                "stored Merkle hash {i} is missing"
            )));
        }
        let mut h = [0u8; 32];
        self.file
            .read_exact_at(&mut h, i * 32)
            .map_err(|e| io("read", e))?;
        Ok(Hash(h))
    }

    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}
