//! Audit bundles: one JSON document holding everything an officer needs to
//! prove, offline, what the log says about one customer (docs/audit-bundle.md).
//!
//! Guarantees: [`verify_bundle`] accepts a bundle only if its checkpoint is
//! signed by the verifier key, every entry is included in that checkpoint's
//! tree at its stated index, adjacent entries chain by hash, every entry is
//! about the bundle's customer, the human-readable `decoded` part says
//! exactly what the entry bytes say, and (given an older checkpoint) the
//! bundle's tree extends it. Any failure names the entry or part.
//!
//! Not guaranteed: completeness. A bundle shows entries that are in the log;
//! a server could leave some of a customer's entries out. Officers who need
//! completeness fetch the full entry range (`GetEntries`) and check it
//! against the same checkpoint.

use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{verify_checkpoint, SignedCheckpoint};
use crate::entry::{Digest, Entry, Pseudonym};
use crate::error::{LedgerError, Result};
use crate::log::Ledger;
use crate::proof::{leaf_hash, verify_consistency, verify_inclusion};

/// The `format` value of a bundle.
pub const BUNDLE_FORMAT: &str = "sovra-audit-bundle";
/// The bundle version this crate writes and reads.
pub const BUNDLE_VERSION: u32 = 1;
/// The `format` value of a consistency-proof file.
pub const CONSISTENCY_FORMAT: &str = "sovra-consistency-proof";
/// Largest bundle [`verify_bundle`] reads.
pub const MAX_BUNDLE_BYTES: usize = 128 * 1024 * 1024;
/// Most entries one bundle holds; narrow the time range beyond that.
pub const MAX_BUNDLE_ENTRIES: usize = 100_000;

/// One entry of a bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleEntry {
    /// Index in the log.
    pub index: u64,
    /// The entry bytes, base64.
    pub entry: String,
    /// Inclusion proof against the bundle's checkpoint, base64 hashes.
    pub inclusion_proof: Vec<String>,
    /// The entry decoded, for reading; checked against `entry`.
    pub decoded: serde_json::Value,
}

/// A consistency proof between two tree sizes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyProof {
    /// Always [`CONSISTENCY_FORMAT`].
    pub format: String,
    /// The older size.
    pub from_size: u64,
    /// The newer size.
    pub to_size: u64,
    /// The proof, base64 hashes.
    pub proof: Vec<String>,
}

impl ConsistencyProof {
    /// Wraps raw hashes.
    pub fn new(from_size: u64, to_size: u64, hashes: &[[u8; 32]]) -> Self {
        Self {
            format: CONSISTENCY_FORMAT.into(),
            from_size,
            to_size,
            proof: hashes.iter().map(|h| BASE64_STANDARD.encode(h)).collect(),
        }
    }

    /// Parses a consistency-proof file.
    pub fn parse(json: &[u8]) -> Result<Self> {
        if json.len() > 1024 * 1024 {
            return Err(LedgerError::invalid(
                "consistency proof file: larger than 1 MiB",
            ));
        }
        let p: ConsistencyProof = serde_json::from_slice(json)
            .map_err(|e| LedgerError::invalid(format!("consistency proof file: {e}")))?;
        if p.format != CONSISTENCY_FORMAT {
            return Err(LedgerError::invalid(format!(
                "consistency proof file: format is `{:.40}`, expected `{CONSISTENCY_FORMAT}`",
                p.format
            )));
        }
        Ok(p)
    }
}

/// An audit bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditBundle {
    /// Always [`BUNDLE_FORMAT`].
    pub format: String,
    /// Always [`BUNDLE_VERSION`].
    pub version: u32,
    /// The log origin.
    pub origin: String,
    /// The log's verifier key (C2SP note format). A verifier should pin its
    /// own copy rather than trust this one.
    pub verifier_key: String,
    /// The signed checkpoint every proof is against (signed-note text).
    pub checkpoint: String,
    /// The tenant.
    pub tenant: String,
    /// The customer's pseudonym (hex).
    pub subject: String,
    /// Start of the time range (ms, inclusive), if one was asked for.
    pub from_ms: Option<u64>,
    /// End of the time range (ms, exclusive), if one was asked for.
    pub to_ms: Option<u64>,
    /// When the bundle was made (ms).
    pub generated_at_ms: u64,
    /// The customer's entries, in log order.
    pub entries: Vec<BundleEntry>,
    /// A consistency proof from an older checkpoint, if one was asked for.
    pub consistency: Option<ConsistencyProof>,
}

fn b64_hashes(hs: &[[u8; 32]]) -> Vec<String> {
    hs.iter().map(|h| BASE64_STANDARD.encode(h)).collect()
}

fn decode_hashes(what: &str, hs: &[String]) -> Result<Vec<Vec<u8>>> {
    hs.iter()
        .enumerate()
        .map(|(i, h)| {
            BASE64_STANDARD
                .decode(h)
                .map_err(|_| LedgerError::verification(format!("{what}[{i}] is not base64")))
        })
        .collect()
}

impl Ledger {
    /// Builds the bundle of `subject`'s entries, optionally limited to
    /// `[from_ms, to_ms)`, against the latest checkpoint, with a consistency
    /// proof from `since_size` if given.
    pub fn export_bundle(
        &self,
        tenant: &str,
        subject: &Pseudonym,
        from_ms: Option<u64>,
        to_ms: Option<u64>,
        since_size: Option<u64>,
    ) -> Result<AuditBundle> {
        if let (Some(f), Some(t)) = (from_ms, to_ms) {
            if f >= t {
                return Err(LedgerError::invalid(format!(
                    "time range: from {f} is not before to {t}"
                )));
            }
        }
        let cp = self.checkpoint()?;
        let mut entries = Vec::new();
        for index in self.subject_entries(subject)? {
            if index >= cp.size {
                break;
            }
            let (bytes, e) = self.entry(index)?;
            if from_ms.is_some_and(|f| e.timestamp_ms < f)
                || to_ms.is_some_and(|t| e.timestamp_ms >= t)
            {
                continue;
            }
            if entries.len() == MAX_BUNDLE_ENTRIES {
                return Err(LedgerError::invalid(format!(
                    "time range: more than {MAX_BUNDLE_ENTRIES} entries; ask for a narrower range"
                )));
            }
            let proof = self.inclusion_proof(index, cp.size)?;
            entries.push(BundleEntry {
                index,
                entry: BASE64_STANDARD.encode(&bytes),
                inclusion_proof: b64_hashes(&proof),
                decoded: serde_json::to_value(&e)
                    .map_err(|e| LedgerError::storage(format!("cannot render an entry: {e}")))?,
            });
        }
        let consistency = match since_size {
            None => None,
            Some(old) => Some(ConsistencyProof::new(
                old,
                cp.size,
                &self.consistency_proof(old, cp.size)?,
            )),
        };
        Ok(AuditBundle {
            format: BUNDLE_FORMAT.into(),
            version: BUNDLE_VERSION,
            origin: self.origin().to_owned(),
            verifier_key: self.verifier_key(),
            checkpoint: String::from_utf8_lossy(&cp.note).into_owned(),
            tenant: tenant.to_owned(),
            subject: subject.to_hex(),
            from_ms,
            to_ms,
            generated_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            entries,
            consistency,
        })
    }
}

impl Ledger {
    /// The entries at `indexes` (increasing) with inclusion proofs against
    /// the latest checkpoint: the checkpoint's note and the entries (for
    /// reports other than the customer bundle, such as a contract
    /// instance's evidence). Indexes at or past the checkpoint's size are
    /// left out.
    pub fn prove_entries(&self, indexes: &[u64]) -> Result<(String, Vec<BundleEntry>)> {
        let cp = self.checkpoint()?;
        let mut out = Vec::with_capacity(indexes.len());
        for &index in indexes {
            if index >= cp.size {
                continue;
            }
            if out.len() == MAX_BUNDLE_ENTRIES {
                return Err(LedgerError::invalid(format!(
                    "more than {MAX_BUNDLE_ENTRIES} entries to prove"
                )));
            }
            let (bytes, e) = self.entry(index)?;
            let proof = self.inclusion_proof(index, cp.size)?;
            out.push(BundleEntry {
                index,
                entry: BASE64_STANDARD.encode(&bytes),
                inclusion_proof: b64_hashes(&proof),
                decoded: serde_json::to_value(&e)
                    .map_err(|e| LedgerError::storage(format!("cannot render an entry: {e}")))?,
            });
        }
        Ok((String::from_utf8_lossy(&cp.note).into_owned(), out))
    }
}

/// Verifies one proven entry against a verified checkpoint: its inclusion
/// proof, its decoding, its index and its `decoded` part. Returns the
/// entry.
pub fn verify_proven_entry(be: &BundleEntry, cp: &SignedCheckpoint) -> Result<Entry> {
    let bytes = BASE64_STANDARD
        .decode(&be.entry)
        .map_err(|_| LedgerError::verification("the entry is not base64"))?;
    let leaf = leaf_hash(&bytes);
    let proof = decode_hashes("inclusion_proof", &be.inclusion_proof)?;
    verify_inclusion(be.index, cp.size, &leaf, &proof, &cp.root)?;
    let e = Entry::decode(&bytes)?;
    if e.seq != be.index {
        return Err(LedgerError::verification(format!(
            "the entry says it is entry {}",
            e.seq
        )));
    }
    let decoded = serde_json::to_value(&e).map_err(|e| LedgerError::verification(e.to_string()))?;
    if decoded != be.decoded {
        return Err(LedgerError::verification(
            "the `decoded` part does not match the entry bytes",
        ));
    }
    Ok(e)
}

/// What to trust and check besides the bundle itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct VerifyOptions<'a> {
    /// The log's verifier key as the officer holds it. Without it the
    /// bundle's own key is used, which proves integrity but not origin.
    pub trusted_key: Option<&'a str>,
    /// An older signed checkpoint the officer kept.
    pub since: Option<&'a [u8]>,
    /// A consistency proof fetched separately (used if the bundle has none).
    pub consistency: Option<&'a ConsistencyProof>,
}

/// A successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The checkpoint the bundle is proven against.
    pub checkpoint: SignedCheckpoint,
    /// Entries verified.
    pub entries: usize,
    /// Adjacent pairs whose hash link was checked.
    pub chain_links: usize,
    /// Whether the key was the officer's own (`true`) or the bundle's.
    pub key_pinned: bool,
    /// The older checkpoint size proven consistent, if any.
    pub consistent_since: Option<u64>,
}

/// Verifies an audit bundle offline.
pub fn verify_bundle(json: &[u8], opts: VerifyOptions<'_>) -> Result<Verdict> {
    if json.len() > MAX_BUNDLE_BYTES {
        return Err(LedgerError::invalid(format!(
            "bundle: {} bytes; at most {MAX_BUNDLE_BYTES}",
            json.len()
        )));
    }
    let b: AuditBundle = serde_json::from_slice(json)
        .map_err(|e| LedgerError::invalid(format!("bundle: not a valid audit bundle: {e}")))?;
    if b.format != BUNDLE_FORMAT || b.version != BUNDLE_VERSION {
        return Err(LedgerError::invalid(format!(
            "bundle: format `{:.40}` version {}; this verifier reads `{BUNDLE_FORMAT}` version {BUNDLE_VERSION}",
            b.format, b.version
        )));
    }
    if b.entries.len() > MAX_BUNDLE_ENTRIES {
        return Err(LedgerError::invalid(format!(
            "bundle: {} entries; at most {MAX_BUNDLE_ENTRIES}",
            b.entries.len()
        )));
    }
    let key = opts
        .trusted_key
        .map(str::trim)
        .unwrap_or(b.verifier_key.as_str());
    if opts.trusted_key.is_some() && key != b.verifier_key.trim() {
        return Err(LedgerError::verification(
            "the bundle names a different verifier key than the one given: it is not from the log you trust",
        ));
    }
    let cp = verify_checkpoint(b.checkpoint.as_bytes(), key)
        .map_err(|e| LedgerError::verification(format!("checkpoint: {e}")))?;
    if cp.origin != b.origin {
        return Err(LedgerError::verification(format!(
            "checkpoint: origin `{}` differs from the bundle's `{:.80}`",
            cp.origin, b.origin
        )));
    }
    let subject = Digest::from_hex(&b.subject)
        .map_err(|e| LedgerError::verification(format!("subject: {e}")))?;
    let mut prev: Option<(u64, [u8; 32])> = None;
    let mut links = 0;
    for (pos, be) in b.entries.iter().enumerate() {
        let at = |m: String| {
            LedgerError::verification(format!("entry {} (bundle position {pos}): {m}", be.index))
        };
        if let Some((pi, _)) = prev {
            if be.index <= pi {
                return Err(at(format!("indexes must increase; it follows entry {pi}")));
            }
        }
        let bytes = BASE64_STANDARD
            .decode(&be.entry)
            .map_err(|_| at("the entry is not base64".into()))?;
        let leaf = leaf_hash(&bytes);
        let proof =
            decode_hashes("inclusion_proof", &be.inclusion_proof).map_err(|e| at(e.to_string()))?;
        verify_inclusion(be.index, cp.size, &leaf, &proof, &cp.root)
            .map_err(|e| at(e.to_string()))?;
        let e = Entry::decode(&bytes).map_err(|e| at(e.to_string()))?;
        if e.seq != be.index {
            return Err(at(format!("the entry says it is entry {}", e.seq)));
        }
        if e.body.subject() != Some(&subject) {
            return Err(at("the entry is not about the bundle's customer".into()));
        }
        let decoded = serde_json::to_value(&e).map_err(|e| at(e.to_string()))?;
        if decoded != be.decoded {
            return Err(at(
                "the `decoded` part does not match the entry bytes".into()
            ));
        }
        if let Some((pi, pl)) = prev {
            if pi + 1 == be.index {
                if e.prev_hash.0 != pl {
                    return Err(at(format!("the hash chain to entry {pi} is broken")));
                }
                links += 1;
            }
        }
        prev = Some((be.index, leaf));
    }
    let consistent_since = match opts.since {
        None => None,
        Some(old_note) => {
            let old = verify_checkpoint(old_note, key)
                .map_err(|e| LedgerError::verification(format!("older checkpoint: {e}")))?;
            // A proof the officer fetched for this very checkpoint wins over
            // whatever the bundle carries.
            check_consistency(&old, &cp, opts.consistency.or(b.consistency.as_ref()))?;
            Some(old.size)
        }
    };
    Ok(Verdict {
        checkpoint: cp,
        entries: b.entries.len(),
        chain_links: links,
        key_pinned: opts.trusted_key.is_some(),
        consistent_since,
    })
}

/// Checks that `new` extends `old` with `proof`.
pub fn check_consistency(
    old: &SignedCheckpoint,
    new: &SignedCheckpoint,
    proof: Option<&ConsistencyProof>,
) -> Result<()> {
    if old.origin != new.origin {
        return Err(LedgerError::verification(format!(
            "the older checkpoint is from `{}`, not `{}`",
            old.origin, new.origin
        )));
    }
    if old.size > new.size {
        return Err(LedgerError::verification(format!(
            "the older checkpoint (size {}) is larger than the bundle's (size {}): the log shrank or forked",
            old.size, new.size
        )));
    }
    // A proof given for other sizes is wrong even where none is needed.
    if let Some(p) = proof {
        if p.format != CONSISTENCY_FORMAT {
            return Err(LedgerError::verification(format!(
                "the consistency proof's format is `{:.40}`, expected `{CONSISTENCY_FORMAT}`",
                p.format
            )));
        }
        if p.from_size != old.size || p.to_size != new.size {
            return Err(LedgerError::verification(format!(
                "the consistency proof is from size {} to {}, but the checkpoints are {} and {}",
                p.from_size, p.to_size, old.size, new.size
            )));
        }
    }
    if old.size == 0 {
        return if old.root == crate::proof::EMPTY_ROOT {
            Ok(())
        } else {
            Err(LedgerError::verification(
                "the older checkpoint claims an empty tree with a root that is not the empty-tree root",
            ))
        };
    }
    if old.size == new.size {
        return if old.root == new.root {
            Ok(())
        } else {
            Err(LedgerError::verification(format!(
                "two different trees were signed at size {}: the log forked",
                old.size
            )))
        };
    }
    let p = proof.ok_or_else(|| {
        LedgerError::verification(format!(
            "no consistency proof from size {} to {}; fetch one with `sovra audit consistency`",
            old.size, new.size
        ))
    })?;
    let hashes = decode_hashes("consistency proof", &p.proof)?;
    verify_consistency(old.size, new.size, &hashes, &old.root, &new.root)
}
