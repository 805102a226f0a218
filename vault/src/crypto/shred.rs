//! Shred slots: the one file Sovra overwrites in place, so that erasure
//! destroys something that no copy of the database can bring back.
//!
//! sled is log-structured: a removed value lingers in old segments until they
//! are reused, so deleting a wrapped data key from sled does not destroy it.
//! Each customer therefore also gets a 32-byte random *pad* in a slot of
//! `shred.slots`, and what sled stores is `AES-GCM_KEK(data key XOR pad)`.
//! Erasure overwrites the pad with zeros and fsyncs: from then on the
//! wrapped key that may linger in sled is a one-time-pad encryption of the
//! data key whose pad no longer exists, so even the root key and every byte
//! of the data directory do not recover the customer's data.
//!
//! Guarantees: pads are written with positioned writes into fixed 32-byte
//! slots (never appended elsewhere or copied), the file is created 0600, and
//! [`ShredSlots::sync`] makes every pad written or zeroed before it durable.
//! A zero slot means "free or erased".
//!
//! With the log kept in PostgreSQL the pads are rows of the log's `pads`
//! table instead, held in memory (zeroized on drop) and written in the
//! same transaction as the group whose frames first depend on them; an
//! erasure deletes the row. PostgreSQL keeps a deleted row's old version
//! until vacuum, and in its own WAL, replicas and backups: SECURITY.md says
//! what an erasure guarantees on that backend. A missing row reads as a
//! zero pad, which start-up accepts only for an erasure the ledger holds.
//!
//! Does not guarantee: physical overwrite below the file system. A
//! copy-on-write file system (btrfs, ZFS), a snapshot, or an SSD's flash
//! translation layer may keep the old block; SECURITY.md says how to deploy
//! around that.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use aes_gcm::aead::OsRng;
use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Result, VaultError};

const MAGIC: &[u8; 16] = b"SOVRA-SHRED-v1\0\0";
const HEADER: u64 = 16;
/// Size of one pad.
pub const PAD_LEN: usize = 32;

/// A customer's pad (zeroized on drop, never printed).
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Pad(pub(crate) [u8; PAD_LEN]);

impl std::fmt::Debug for Pad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pad(<redacted>)")
    }
}

impl Pad {
    /// A 16-byte check of the pad in `slot`, stored with the wrapped data
    /// key so that start-up tells a damaged or swapped pad from a good one.
    /// It reveals nothing usable about the pad (a preimage of SHA-256 over
    /// 256 random bits), so it may outlive an erasure.
    pub fn check(&self, slot: u64) -> [u8; 16] {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(b"sovra/v1/pad-check\0");
        h.update(slot.to_be_bytes());
        h.update(self.0);
        let d = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&d[..16]);
        out
    }

    /// A pad from raw bytes, for tests that play an attacker reading disks.
    pub fn from_bytes_for_tests(bytes: [u8; PAD_LEN]) -> Pad {
        Pad(bytes)
    }
}

/// What a slot holds, for start-up's reconciliation.
#[derive(Debug)]
pub enum SlotState {
    /// The slot lies beyond the end of the file: the file was truncated,
    /// deleted or replaced by a shorter copy.
    Missing,
    /// All zeros: free, or erased.
    Zero,
    /// A pad.
    Pad(Pad),
}

struct Free {
    list: Vec<u64>,
    next: u64,
}

/// Every pad held in memory, by slot (a slot not there: free or erased).
type PadRows = Mutex<std::collections::BTreeMap<u64, Pad>>;

/// The slot file, or the pads of a log kept in PostgreSQL.
pub struct ShredSlots {
    file: Option<File>,
    /// PostgreSQL: the log that writes the rows, and every pad by slot.
    rows: Option<(std::sync::Arc<sovra_wal::Wal>, PadRows)>,
    free: Mutex<Free>,
    dirty: AtomicBool,
    /// The file or table was empty at open (cleared once a migration puts
    /// pads into it).
    created: AtomicBool,
    place: String,
}

impl std::fmt::Debug for ShredSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShredSlots")
    }
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, off)
}
#[cfg(unix)]
fn write_at(f: &File, buf: &[u8], off: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, buf, off)
}
#[cfg(windows)]
fn read_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let n = std::os::windows::fs::FileExt::seek_read(f, buf, off)?;
    if n == buf.len() {
        Ok(())
    } else {
        Err(std::io::ErrorKind::UnexpectedEof.into())
    }
}
#[cfg(windows)]
fn write_at(f: &File, buf: &[u8], off: u64) -> std::io::Result<()> {
    let n = std::os::windows::fs::FileExt::seek_write(f, buf, off)?;
    if n == buf.len() {
        Ok(())
    } else {
        Err(std::io::ErrorKind::WriteZero.into())
    }
}

fn offset(slot: u64) -> u64 {
    HEADER + slot * PAD_LEN as u64
}

impl ShredSlots {
    /// Opens (or creates, 0600) the slot file at `path`.
    pub fn open(path: &Path) -> Result<ShredSlots> {
        let shown = path.display().to_string();
        let io = |e: std::io::Error| VaultError::config(&shown, format!("shred slots: {e}"));
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let created = len == 0;
        if len == 0 {
            write_at(&file, MAGIC, 0).map_err(io)?;
            file.sync_all().map_err(io)?;
        } else {
            let mut magic = [0u8; 16];
            read_at(&file, &mut magic, 0).map_err(|_| {
                VaultError::config(&shown, "not a Sovra shred-slot file (header too short)")
            })?;
            if &magic != MAGIC {
                return Err(VaultError::config(
                    &shown,
                    "not a Sovra shred-slot file (bad header)",
                ));
            }
        }
        // A torn trailing slot (crash mid-extension) was never referenced by
        // an acknowledged write; it is overwritten by the next allocation.
        let next = len.saturating_sub(HEADER) / PAD_LEN as u64;
        Ok(ShredSlots {
            file: Some(file),
            rows: None,
            free: Mutex::new(Free {
                list: Vec::new(),
                next,
            }),
            dirty: AtomicBool::new(false),
            created: AtomicBool::new(created),
            place: shown,
        })
    }

    /// The pads of a log kept in PostgreSQL: every row read now, and kept
    /// in memory; changes go out with the log's next group.
    pub fn in_postgres(wal: std::sync::Arc<sovra_wal::Wal>) -> Result<ShredSlots> {
        let loaded = wal.load_pads()?;
        // As many slots as a slot file of 128 GiB holds: beyond is damage.
        if let Some((slot, _)) = loaded.iter().find(|(s, _)| *s >= 1 << 32) {
            return Err(VaultError::integrity(format!(
                "pads row {slot} of {} (slot numbers stay below 2^32)",
                wal.place()
            )));
        }
        let next = loaded.last().map_or(0, |(s, _)| s.saturating_add(1));
        // A map, not a vector indexed by slot: a row with a huge slot
        // number costs one entry, not memory up to it.
        let pads: std::collections::BTreeMap<u64, Pad> = loaded
            .into_iter()
            .filter(|(_, pad)| pad.iter().any(|&b| b != 0))
            .map(|(slot, pad)| (slot, Pad(*pad)))
            .collect();
        let place = format!("the pads table of {}", wal.place());
        Ok(ShredSlots {
            file: None,
            created: AtomicBool::new(pads.is_empty()),
            rows: Some((wal, Mutex::new(pads))),
            free: Mutex::new(Free {
                list: Vec::new(),
                next,
            }),
            dirty: AtomicBool::new(false),
            place,
        })
    }

    /// Where the pads are, for messages: the slot file, or the table.
    pub fn place(&self) -> &str {
        &self.place
    }

    /// Whether the pads are rows in PostgreSQL.
    pub fn in_database(&self) -> bool {
        self.rows.is_some()
    }

    fn file(&self) -> Result<&File> {
        self.file
            .as_ref()
            .ok_or_else(|| VaultError::internal("shred slots: no slot file"))
    }

    /// Sets a slot's pad in memory and stages its row (PostgreSQL).
    fn set_row(&self, slot: u64, pad: Option<Pad>) -> Result<()> {
        let Some((wal, rows)) = &self.rows else {
            return Err(VaultError::internal("shred slots: no pads table"));
        };
        wal.stage_pad(slot, pad.as_ref().map(|p| zeroize::Zeroizing::new(p.0)))?;
        let mut rows = rows.lock().unwrap_or_else(|p| p.into_inner());
        match pad {
            Some(p) => rows.insert(slot, p),
            None => rows.remove(&slot),
        };
        Ok(())
    }

    /// A copy of a slot's pad held in memory (PostgreSQL).
    fn row(&self, slot: u64) -> Option<Pad> {
        let (_, rows) = self.rows.as_ref()?;
        let rows = rows.lock().unwrap_or_else(|p| p.into_inner());
        rows.get(&slot).map(|p| Pad(p.0))
    }

    /// Whether this open found the file empty or absent (and so wrote its
    /// header), or the pads table empty: with data keys beside it, the pads
    /// were lost.
    pub fn was_created(&self) -> bool {
        self.created.load(Ordering::Acquire)
    }

    /// What `slot` holds, telling a slot beyond the end of the file (lost)
    /// from a zero one (free or erased).
    /// In PostgreSQL a slot is never missing: a row that is not there
    /// reads as zero, which start-up accepts only for a recorded erasure.
    pub fn state(&self, slot: u64) -> Result<SlotState> {
        if self.rows.is_some() {
            return Ok(self.row(slot).map_or(SlotState::Zero, SlotState::Pad));
        }
        if slot >= self.len() {
            return Ok(SlotState::Missing);
        }
        let mut pad = Pad([0u8; PAD_LEN]);
        match read_at(self.file()?, &mut pad.0, offset(slot)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(SlotState::Missing)
            }
            Err(e) => return Err(Self::io_err(e)),
        }
        Ok(if pad.0.iter().all(|&b| b == 0) {
            SlotState::Zero
        } else {
            SlotState::Pad(pad)
        })
    }

    fn io_err(e: std::io::Error) -> VaultError {
        VaultError::storage(format!("shred slots: {e}"))
    }

    /// Number of slots in the file.
    pub fn len(&self) -> u64 {
        self.free.lock().map(|f| f.next).unwrap_or(0)
    }

    /// Whether the file has no slots.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a free slot and writes a fresh random pad into it. Durable after
    /// the next [`ShredSlots::sync`].
    pub fn allocate(&self) -> Result<(u64, Pad)> {
        let slot = {
            let mut f = self.free.lock().unwrap_or_else(|p| p.into_inner());
            match f.list.pop() {
                Some(s) => s,
                None => {
                    f.next += 1;
                    f.next - 1
                }
            }
        };
        let mut pad = Pad([0u8; PAD_LEN]);
        OsRng.fill_bytes(&mut pad.0);
        if self.rows.is_some() {
            self.set_row(slot, Some(Pad(pad.0)))?;
            return Ok((slot, pad));
        }
        write_at(self.file()?, &pad.0, offset(slot)).map_err(Self::io_err)?;
        self.dirty.store(true, Ordering::Release);
        Ok((slot, pad))
    }

    /// The pad in `slot`, or `None` if the slot is zero (erased or free) or
    /// beyond the end of the file.
    pub fn read(&self, slot: u64) -> Result<Option<Pad>> {
        if self.rows.is_some() {
            return Ok(self.row(slot));
        }
        if slot >= self.len() {
            return Ok(None);
        }
        let mut pad = Pad([0u8; PAD_LEN]);
        match read_at(self.file()?, &mut pad.0, offset(slot)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(Self::io_err(e)),
        }
        Ok(if pad.0.iter().all(|&b| b == 0) {
            None
        } else {
            Some(pad)
        })
    }

    /// Overwrites `slot` with zeros. Durable after the next sync. The slot is
    /// not reusable until [`ShredSlots::release`].
    /// PostgreSQL: the row is deleted with the log's next group.
    pub fn shred(&self, slot: u64) -> Result<()> {
        if self.rows.is_some() {
            return self.set_row(slot, None);
        }
        if slot >= self.len() {
            return Ok(());
        }
        write_at(self.file()?, &[0u8; PAD_LEN], offset(slot)).map_err(Self::io_err)?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes `pad` into `slot` (a copy of another vault's slot, by
    /// `sovra migrate`: wrapped keys name their slot). Durable after the
    /// next sync (PostgreSQL: with the log's next group).
    pub fn put(&self, slot: u64, pad: &Pad) -> Result<()> {
        self.created.store(false, Ordering::Release);
        {
            let mut f = self.free.lock().unwrap_or_else(|p| p.into_inner());
            f.next = f.next.max(slot.saturating_add(1));
        }
        if self.rows.is_some() {
            return self.set_row(slot, Some(Pad(pad.0)));
        }
        write_at(self.file()?, &pad.0, offset(slot)).map_err(Self::io_err)?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes `slots` (already zeroed, no longer referenced) reusable.
    pub fn release(&self, slots: impl IntoIterator<Item = u64>) {
        let mut f = self.free.lock().unwrap_or_else(|p| p.into_inner());
        f.list.extend(slots);
    }

    /// fsyncs the file if anything was written since the last sync.
    pub fn sync(&self) -> Result<()> {
        let Some(file) = &self.file else {
            // PostgreSQL: the rows are written with the log's groups.
            return Ok(());
        };
        if self.dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = file.sync_data() {
                self.dirty.store(true, Ordering::Release);
                return Err(Self::io_err(e));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_read_shred_release_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shred.slots");
        let s = ShredSlots::open(&p).unwrap();
        let (a, pa) = s.allocate().unwrap();
        let (b, _) = s.allocate().unwrap();
        assert_ne!(a, b);
        assert_eq!(s.read(a).unwrap().unwrap().0, pa.0);
        s.shred(a).unwrap();
        assert!(s.read(a).unwrap().is_none());
        assert!(s.read(99).unwrap().is_none());
        s.release([a]);
        let (c, _) = s.allocate().unwrap();
        assert_eq!(c, a, "released slots are reused");
        s.sync().unwrap();
        drop(s);
        let s = ShredSlots::open(&p).unwrap();
        assert_eq!(s.len(), 2);
        assert!(s.read(b).unwrap().is_some());
        let bytes = std::fs::read(&p).unwrap();
        assert!(
            !bytes.windows(PAD_LEN).any(|w| w == pa.0),
            "the shredded pad is gone from the file"
        );
    }

    #[test]
    fn rejects_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"hello").unwrap();
        assert!(ShredSlots::open(&p)
            .unwrap_err()
            .to_string()
            .contains("not a Sovra"));
        std::fs::write(&p, [7u8; 64]).unwrap();
        assert!(ShredSlots::open(&p)
            .unwrap_err()
            .to_string()
            .contains("bad header"));
    }
}
