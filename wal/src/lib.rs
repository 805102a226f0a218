#![doc = include_str!("../README.md")]
//! Sovra's write-ahead log: the one durability point of a data directory.
//!
//! Records are appended in frames (one frame per caller's append, so a
//! request's records are all durable or none is) to CRC32C-framed segment
//! files. One thread writes every frame pending since its last write and
//! calls `fdatasync` once for the group, then wakes every waiter: durable
//! throughput is clients / fsync latency, not 1 / fsync latency. The format
//! is in [`frame`].
//!
//! Guarantees:
//! - [`Wal::wait_durable`] returns only once every record up to the LSN it
//!   was given is on disk.
//! - At [`Wal::open`], a torn tail (the bytes of a group whose sync never
//!   finished) is cut off and reported in [`Opened::torn`]; damage anywhere
//!   else refuses to open, naming the segment file and byte offset. Damage
//!   counts as a tail only when nothing proves it was synced: no later
//!   frame records a durable LSN beyond it, and it lies beyond the
//!   `floor` the caller says its views already applied.
//! - After a failed write or sync nothing more is accepted (a kernel may
//!   drop dirty pages after reporting an `fdatasync` error, so retrying it
//!   could report success for lost data).
//!
//! Not guaranteed: secrecy. Records are stored as given; callers put only
//! sealed values, wrapped keys, keyed tokens and ledger entries in them.
//! Retired segments are deleted, not overwritten.

#![forbid(unsafe_code)]

pub mod error;
pub mod frame;
mod log;
pub mod postgres;

pub use error::{CorruptError, InvalidArgumentError, IoError, Result, WalError};
pub use log::{
    Intent, Opened, TornTail, Wal, WalOptions, DEFAULT_MAX_COMMIT_DELAY, MAX_COMMIT_DELAY,
};
pub use postgres::PgTarget;

/// The first byte of every record names its owner, so one log serves every
/// view of a data directory.
pub mod tag {
    /// A ledger entry: the tag, then the entry's bytes exactly as the
    /// ledger stores and hashes them.
    pub const LEDGER_ENTRY: u8 = 1;
    /// A batch of writes to the vault's trees (see the vault's `store`).
    pub const VAULT_WRITES: u8 = 2;
}
