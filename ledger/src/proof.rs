//! RFC 9162 Merkle hashing, inclusion and consistency proof verification,
//! and the C2SP `tlog-proof@v1` text format.
//!
//! The proof algorithms are those of the `tlog_tiles` crate (a port of Go's
//! `sumdb/tlog`); this module is the boundary that takes untrusted bytes:
//! every hash must be exactly 32 bytes, sizes and indexes are range-checked
//! before the crate sees them (so its internal assertions cannot fire), and
//! a consistency proof from size 0 is always refused.
//!
//! Guarantees: a `verify_*` function returns `Ok` only if the proof proves the
//! claim under RFC 9162 §2.1.3.2 / §2.1.4.2; any other input is an error
//! naming what is wrong. Does not guarantee: that the root is one the log
//! signed; check the checkpoint (`checkpoint.rs`) for that.

use base64::prelude::{Engine as _, BASE64_STANDARD};
use tlog_tiles::Hash;

use crate::error::{LedgerError, Result};

/// Size of every hash.
pub const HASH_LEN: usize = 32;
/// Longest proof accepted (a tree of 2^64 leaves needs 64 hashes; the
/// consistency proof at most twice that).
pub const MAX_PROOF_HASHES: usize = 128;
/// First line of a `tlog-proof@v1` document.
pub const TLOG_PROOF_HEADER: &str = "c2sp.org/tlog-proof@v1";

/// The RFC 9162 leaf hash: SHA-256(0x00 ‖ entry).
pub fn leaf_hash(entry: &[u8]) -> [u8; 32] {
    tlog_tiles::record_hash(entry).0
}

/// The RFC 9162 interior node hash: SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    tlog_tiles::node_hash(Hash(*left), Hash(*right)).0
}

/// The root of the empty tree: SHA-256 of nothing.
pub const EMPTY_ROOT: [u8; 32] = tlog_tiles::EMPTY_HASH.0;

fn hash(what: &str, b: &[u8]) -> Result<Hash> {
    <[u8; HASH_LEN]>::try_from(b).map(Hash).map_err(|_| {
        LedgerError::invalid(format!(
            "{what}: a hash must be {HASH_LEN} bytes, got {}",
            b.len()
        ))
    })
}

fn hashes<B: AsRef<[u8]>>(what: &str, proof: &[B]) -> Result<Vec<Hash>> {
    if proof.len() > MAX_PROOF_HASHES {
        return Err(LedgerError::invalid(format!(
            "{what}: {} hashes; no valid proof has more than {MAX_PROOF_HASHES}",
            proof.len()
        )));
    }
    proof
        .iter()
        .enumerate()
        .map(|(i, h)| hash(&format!("{what}[{i}]"), h.as_ref()))
        .collect()
}

/// Verifies that `leaf_hash` is the leaf at `index` in the tree of
/// `tree_size` leaves whose root is `root`.
pub fn verify_inclusion<B: AsRef<[u8]>>(
    index: u64,
    tree_size: u64,
    leaf_hash: &[u8],
    proof: &[B],
    root: &[u8],
) -> Result<()> {
    let leaf = hash("leaf hash", leaf_hash)?;
    let root = hash("root", root)?;
    let proof = hashes("inclusion proof", proof)?;
    if index >= tree_size {
        return Err(LedgerError::verification(format!(
            "leaf index {index} is not below tree size {tree_size}"
        )));
    }
    tlog_tiles::check_record(&proof, tree_size, root, index, leaf).map_err(|_| {
        LedgerError::verification(format!(
            "inclusion proof of leaf {index} in tree size {tree_size} does not lead to the root"
        ))
    })
}

/// Verifies that the tree of `size2` leaves with root `root2` extends the
/// tree of `size1` leaves with root `root1`.
pub fn verify_consistency<B: AsRef<[u8]>>(
    size1: u64,
    size2: u64,
    proof: &[B],
    root1: &[u8],
    root2: &[u8],
) -> Result<()> {
    if size1 == 0 {
        return Err(LedgerError::verification(
            "a consistency proof from tree size 0 is undefined (RFC 9162 §2.1.4)",
        ));
    }
    if size1 == size2 {
        // RFC 9162 §2.1.4.2 step 1: equal sizes are consistent exactly when
        // the proof is empty and the roots are the same bytes. The
        // transparency-dev vectors require this comparison without a length
        // check; it proves nothing beyond equality either way.
        if !proof.is_empty() {
            return Err(LedgerError::verification(format!(
                "equal tree sizes ({size1}) need an empty consistency proof, got {} hashes",
                proof.len()
            )));
        }
        return if root1 == root2 {
            Ok(())
        } else {
            Err(LedgerError::verification(format!(
                "two different roots for the same tree size {size1}: the log forked"
            )))
        };
    }
    let root1 = hash("first root", root1)?;
    let root2 = hash("second root", root2)?;
    let proof = hashes("consistency proof", proof)?;
    if size1 > size2 {
        return Err(LedgerError::verification(format!(
            "tree size {size1} is larger than {size2}: a log never shrinks"
        )));
    }
    tlog_tiles::check_tree(&proof, size2, root2, size1, root1).map_err(|_| {
        LedgerError::verification(format!(
            "consistency proof from tree size {size1} to {size2} does not match the roots"
        ))
    })
}

/// A C2SP `tlog-proof@v1` document: an entry index, its inclusion proof and
/// the signed checkpoint it is proven against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlogProof {
    /// Optional application data (the `extra` line).
    pub extra: Option<Vec<u8>>,
    /// The entry's index in the log.
    pub index: u64,
    /// The inclusion proof, leaf to root.
    pub hashes: Vec<[u8; 32]>,
    /// The signed checkpoint (a signed note).
    pub checkpoint: Vec<u8>,
}

impl TlogProof {
    /// The text form.
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(64 + 45 * self.hashes.len() + self.checkpoint.len());
        s.push_str(TLOG_PROOF_HEADER);
        s.push('\n');
        if let Some(extra) = &self.extra {
            s.push_str("extra ");
            s.push_str(&BASE64_STANDARD.encode(extra));
            s.push('\n');
        }
        s.push_str(&format!("index {}\n", self.index));
        for h in &self.hashes {
            s.push_str(&BASE64_STANDARD.encode(h));
            s.push('\n');
        }
        s.push('\n');
        s.push_str(&String::from_utf8_lossy(&self.checkpoint));
        s
    }

    /// Parses the text form.
    pub fn parse(text: &[u8]) -> Result<TlogProof> {
        let bad = |m: String| LedgerError::invalid(format!("tlog-proof: {m}"));
        if text.len() > 1_000_000 {
            return Err(bad("longer than 1 MB".into()));
        }
        let text = std::str::from_utf8(text).map_err(|_| bad("not UTF-8".into()))?;
        let (head, checkpoint) = text
            .split_once("\n\n")
            .ok_or_else(|| bad("no blank line before the checkpoint".into()))?;
        let mut lines = head.split('\n');
        if lines.next() != Some(TLOG_PROOF_HEADER) {
            return Err(bad(format!("first line must be `{TLOG_PROOF_HEADER}`")));
        }
        let mut line = lines.next();
        let mut extra = None;
        if let Some(e) = line.and_then(|l| l.strip_prefix("extra ")) {
            extra = Some(
                BASE64_STANDARD
                    .decode(e)
                    .map_err(|_| bad("`extra` is not base64".into()))?,
            );
            line = lines.next();
        }
        let index = line
            .and_then(|l| l.strip_prefix("index "))
            .ok_or_else(|| bad("missing `index` line".into()))?;
        if index.len() > 1 && index.starts_with('0') || index.starts_with('+') {
            return Err(bad("index has a leading zero or sign".into()));
        }
        let index = index
            .parse::<u64>()
            .map_err(|_| bad(format!("index `{index:.30}` is not a number")))?;
        let mut hashes = Vec::new();
        for (i, l) in lines.enumerate() {
            if i >= MAX_PROOF_HASHES {
                return Err(bad(format!("more than {MAX_PROOF_HASHES} hashes")));
            }
            let b = BASE64_STANDARD
                .decode(l)
                .map_err(|_| bad(format!("hash {i} is not base64")))?;
            hashes.push(
                <[u8; 32]>::try_from(b.as_slice())
                    .map_err(|_| bad(format!("hash {i} is {} bytes, not 32", b.len())))?,
            );
        }
        if checkpoint.is_empty() {
            return Err(bad("missing checkpoint".into()));
        }
        Ok(TlogProof {
            extra,
            index,
            hashes,
            checkpoint: checkpoint.as_bytes().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlog_proof_round_trips_and_rejects_garbage() {
        let p = TlogProof {
            extra: Some(b"x".to_vec()),
            index: 42,
            hashes: vec![[1; 32], [2; 32]],
            checkpoint: b"origin\n43\nAAAA\n\n\xe2\x80\x94 origin sig\n".to_vec(),
        };
        let text = p.to_text();
        assert_eq!(TlogProof::parse(text.as_bytes()).unwrap(), p);
        for bad in [
            "",
            "c2sp.org/tlog-proof@v2\nindex 1\n\ncp\n",
            "c2sp.org/tlog-proof@v1\nindex 01\n\ncp\n",
            "c2sp.org/tlog-proof@v1\nindex x\n\ncp\n",
            "c2sp.org/tlog-proof@v1\nindex 1\nAAAA\n\ncp\n",
            "c2sp.org/tlog-proof@v1\nindex 1\n\n",
        ] {
            assert!(TlogProof::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn consistency_from_zero_and_shrinking_are_refused() {
        let r = EMPTY_ROOT;
        assert!(verify_consistency::<&[u8]>(0, 0, &[], &r, &r).is_err());
        assert!(verify_consistency::<&[u8]>(2, 1, &[], &r, &r).is_err());
        assert!(verify_inclusion::<&[u8]>(0, 0, &r, &[], &r).is_err());
        assert!(verify_inclusion::<&[u8]>(0, 1, &r[..31], &[], &r).is_err());
    }
}
