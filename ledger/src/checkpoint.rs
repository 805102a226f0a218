//! Signed checkpoints: C2SP `tlog-checkpoint` bodies in C2SP `signed-note`
//! envelopes, signed with the log's Ed25519 key (ring).
//!
//! Guarantees: [`verify_checkpoint`] accepts a note only if it carries a
//! valid signature by the given verifier key and its body is a well-formed
//! checkpoint for that key's origin. The log key's seed lives in a
//! zeroize-on-drop buffer and never appears in `Debug` output.
//!
//! Not guaranteed: freshness or non-equivocation. A log could sign two
//! different trees of the same size; officers detect that by keeping old
//! checkpoints and asking for consistency proofs (or by witnesses, which
//! this module does not implement).

use std::fmt;
use std::io::Write;
use std::path::Path;

use base64::prelude::{Engine as _, BASE64_STANDARD};
use ring::signature::{Ed25519KeyPair, KeyPair};
use signed_note::{Note, Signer, StandardVerifier, VerifierList};
use zeroize::Zeroizing;

use crate::error::{LedgerError, Result};

/// Signature algorithm byte of Ed25519 in signed notes.
const ALG_ED25519: u8 = 0x01;

/// The log's signing key.
pub struct LogKey {
    name: String,
    id: u32,
    pair: Ed25519KeyPair,
    public: [u8; 33],
}

impl fmt::Debug for LogKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogKey({}+{:08x}, <redacted>)", self.name, self.id)
    }
}

fn check_origin(origin: &str) -> Result<()> {
    if !signed_note::is_key_name_valid(origin) || origin.len() > 200 {
        return Err(LedgerError::config(format!(
            "log origin `{origin:.60}` must be 1..=200 characters without spaces or `+`"
        )));
    }
    Ok(())
}

impl LogKey {
    /// A key for `origin` from a 32-byte Ed25519 seed.
    pub fn from_seed(origin: &str, seed: &[u8; 32]) -> Result<LogKey> {
        check_origin(origin)?;
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| LedgerError::config("the log key seed is not a valid Ed25519 seed"))?;
        let mut public = [0u8; 33];
        public[0] = ALG_ED25519;
        public[1..].copy_from_slice(pair.public_key().as_ref());
        Ok(LogKey {
            name: origin.to_owned(),
            id: signed_note::key_id(origin, &public),
            pair,
            public,
        })
    }

    /// Reads a key file (64 hex digits of seed). On Unix a file readable by
    /// group or others is refused.
    pub fn load_file(origin: &str, path: &Path) -> Result<LogKey> {
        let shown = path.display();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|e| {
                LedgerError::config(format!("{shown}: cannot read the log key: {e}"))
            })?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(LedgerError::config(format!(
                    "{shown}: log key file has mode {mode:o}; it must be 600 (chmod 600 it)"
                )));
            }
        }
        let text =
            Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                LedgerError::config(format!("{shown}: cannot read the log key: {e}"))
            })?);
        let mut seed = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), seed.as_mut()).map_err(|_| {
            LedgerError::config(format!(
                "{shown}: the log key file must hold exactly 64 hexadecimal digits"
            ))
        })?;
        Self::from_seed(origin, &seed)
    }

    /// Generates a fresh seed and writes it to `path` (which must not exist)
    /// with mode 0600.
    pub fn write_new(path: &Path) -> Result<()> {
        let shown = path.display();
        let mut seed = Zeroizing::new([0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), seed.as_mut())
            .map_err(|_| LedgerError::config("the system random generator failed"))?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(path)
            .map_err(|e| LedgerError::config(format!("{shown}: cannot create the log key: {e}")))?;
        let mut text = Zeroizing::new(hex::encode(seed.as_ref()));
        text.push('\n');
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| LedgerError::config(format!("{shown}: cannot write the log key: {e}")))
    }

    /// The log origin (also the key name).
    pub fn origin(&self) -> &str {
        &self.name
    }

    /// The key in the C2SP signed-note verifier-key format
    /// (`name+hash+base64(0x01 ‖ public key)`).
    pub fn verifier_key(&self) -> String {
        format!(
            "{}+{:08x}+{}",
            self.name,
            self.id,
            BASE64_STANDARD.encode(self.public)
        )
    }

    /// Signs a checkpoint of `size` leaves with `root`; returns the signed
    /// note.
    pub fn sign_checkpoint(&self, size: u64, root: &[u8; 32]) -> Result<SignedCheckpoint> {
        let cp = tlog_tiles::Checkpoint::new(&self.name, size, tlog_tiles::Hash(*root), "")
            .map_err(|_| LedgerError::config("cannot form a checkpoint for this origin"))?;
        let mut note = Note::new(&cp.to_bytes(), &[])
            .map_err(|e| LedgerError::config(format!("checkpoint note: {e}")))?;
        note.add_sigs(&[self])
            .map_err(|e| LedgerError::config(format!("cannot sign the checkpoint: {e}")))?;
        Ok(SignedCheckpoint {
            origin: self.name.clone(),
            size,
            root: *root,
            note: note.to_bytes(),
        })
    }
}

impl Signer for LogKey {
    fn name(&self) -> &str {
        &self.name
    }
    fn key_id(&self) -> u32 {
        self.id
    }
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
        Ok(self.pair.sign(msg).as_ref().to_vec())
    }
}

/// A checkpoint with its signed note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// The log origin.
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// Root hash at that size.
    pub root: [u8; 32],
    /// The signed note (checkpoint text, blank line, signature lines).
    pub note: Vec<u8>,
}

/// Verifies a signed checkpoint note against a verifier key and returns the
/// checkpoint it carries.
pub fn verify_checkpoint(note: &[u8], verifier_key: &str) -> Result<SignedCheckpoint> {
    let verifier = StandardVerifier::new(verifier_key.trim()).map_err(|e| {
        LedgerError::invalid(format!(
            "verifier key: {e} (expected `origin+hash+base64key`)"
        ))
    })?;
    let origin = signed_note::Verifier::name(&verifier).to_owned();
    let parsed = Note::from_bytes(note)
        .map_err(|e| LedgerError::verification(format!("checkpoint note: {e}")))?;
    parsed
        .verify(&VerifierList::new(vec![Box::new(verifier)]))
        .map_err(|e| {
            LedgerError::verification(format!(
                "checkpoint signature does not verify with the key of `{origin}`: {e}"
            ))
        })?;
    let cp = tlog_tiles::Checkpoint::from_bytes(parsed.text())
        .map_err(|_| LedgerError::verification("the signed note is not a C2SP checkpoint"))?;
    if cp.origin() != origin {
        return Err(LedgerError::verification(format!(
            "checkpoint origin `{:.80}` is not the key's origin `{origin}`",
            cp.origin()
        )));
    }
    Ok(SignedCheckpoint {
        origin,
        size: cp.size(),
        root: cp.hash().0,
        note: note.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies_with_the_standard_verifier() {
        let key = LogKey::from_seed("sovra.test/log", &[5; 32]).unwrap();
        let cp = key.sign_checkpoint(7, &[9; 32]).unwrap();
        let text = String::from_utf8(cp.note.clone()).unwrap();
        assert!(text.starts_with("sovra.test/log\n7\n"), "{text}");
        assert!(text.contains("\n\n\u{2014} sovra.test/log "), "{text}");
        let back = verify_checkpoint(&cp.note, &key.verifier_key()).unwrap();
        assert_eq!(back, cp);
        // Another key, a flipped byte, a wrong origin: all refused.
        let other = LogKey::from_seed("sovra.test/log", &[6; 32]).unwrap();
        assert!(verify_checkpoint(&cp.note, &other.verifier_key()).is_err());
        let mut bad = cp.note.clone();
        bad[16] ^= 1;
        assert!(verify_checkpoint(&bad, &key.verifier_key()).is_err());
        assert!(verify_checkpoint(&cp.note, "garbage").is_err());
        assert!(format!("{key:?}").contains("redacted"));
        assert!(LogKey::from_seed("has space", &[1; 32]).is_err());
    }
}
