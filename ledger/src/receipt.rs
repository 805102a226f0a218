//! Offline verification of a receipt: an entry plus its C2SP `tlog-proof@v1`.
//!
//! Guarantees: [`verify_receipt`] accepts only if the checkpoint in the proof
//! is signed by the verifier key and the entry is included at the stated
//! index in the tree that checkpoint signs. The tree size is trusted only as
//! part of the signed checkpoint: an RFC 9162 inclusion proof alone does not
//! pin the size (the same path can fit several sizes with the same root), so
//! a size never comes from anywhere but a signature.

use crate::checkpoint::{verify_checkpoint, SignedCheckpoint};
use crate::entry::Entry;
use crate::error::{LedgerError, Result};
use crate::proof::{leaf_hash, verify_inclusion, TlogProof};

/// Verifies `entry` against the receipt `proof` (tlog-proof text) and the
/// log's `verifier_key`; returns the decoded entry and the checkpoint.
pub fn verify_receipt(
    entry: &[u8],
    proof: &[u8],
    verifier_key: &str,
) -> Result<(Entry, SignedCheckpoint)> {
    let p = TlogProof::parse(proof)?;
    let cp = verify_checkpoint(&p.checkpoint, verifier_key)?;
    verify_inclusion(p.index, cp.size, &leaf_hash(entry), &p.hashes, &cp.root)?;
    let e = Entry::decode(entry)?;
    if e.seq != p.index {
        return Err(LedgerError::verification(format!(
            "the entry says it is entry {} but the proof is for index {}",
            e.seq, p.index
        )));
    }
    Ok((e, cp))
}
