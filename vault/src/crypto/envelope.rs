//! Field encryption: AES-256-GCM under the customer's data key, with a fresh
//! random 96-bit nonce per value and associated data that binds the
//! ciphertext to its place.
//!
//! Guarantees: a sealed value opens only with the same data key and the same
//! (tenant, customer, field, value version, data-key version) and, from
//! record format 2 on, the same provenance (channel, collector, consent
//! reference, collection time, index token). A ciphertext copied to another
//! customer, field or version, with its provenance changed, or with any
//! byte changed, fails with [`VaultError::Integrity`] and is never returned
//! as data.
//!
//! Does not guarantee: hiding the length of a value (AES-GCM preserves it), or
//! freshness against rollback of a whole record to an older sealed version
//! with its matching version number (the ledger anchors history for that).

use aes_gcm::aead::{Aead, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use crate::crypto::keys::encode_aad;
use crate::error::{Result, VaultError};

/// Where a value belongs; bound into its ciphertext as associated data.
#[derive(Debug, Clone, Copy)]
pub struct FieldContext<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The customer id.
    pub customer: &'a str,
    /// The field name.
    pub field: &'a str,
    /// The value version.
    pub version: u64,
    /// The generation of the data key that seals it.
    pub dek_version: u32,
    /// The value's provenance, bound too (record format 2); `None` only to
    /// open a value written before format 2, whose provenance is unbound.
    pub provenance: Option<Provenance<'a>>,
}

/// Where a value came from, as stored beside its ciphertext: bound into the
/// associated data so that none of it can be changed on disk unnoticed.
#[derive(Debug, Clone, Copy)]
pub struct Provenance<'a> {
    /// Collection channel.
    pub channel: &'a str,
    /// Collector.
    pub collector: &'a str,
    /// Consent reference.
    pub consent_ref: &'a str,
    /// When this version was written (ms since the epoch).
    pub collected_at_ms: i64,
    /// The value's blind-index token (empty if the field is not indexed).
    pub index_token: &'a [u8],
}

impl FieldContext<'_> {
    fn aad(&self) -> Vec<u8> {
        let place: [&[u8]; 5] = [
            self.tenant.as_bytes(),
            self.customer.as_bytes(),
            self.field.as_bytes(),
            &self.version.to_be_bytes(),
            &self.dek_version.to_be_bytes(),
        ];
        match &self.provenance {
            None => encode_aad(b"sovra/v1/field", &place),
            Some(p) => {
                let at = p.collected_at_ms.to_be_bytes();
                let mut parts = place.to_vec();
                parts.extend_from_slice(&[
                    p.channel.as_bytes(),
                    p.collector.as_bytes(),
                    p.consent_ref.as_bytes(),
                    &at,
                    p.index_token,
                ]);
                encode_aad(b"sovra/v2/field", &parts)
            }
        }
    }
}

/// A sealed value: nonce and ciphertext with its 16-byte tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The 96-bit nonce.
    pub nonce: [u8; 12],
    /// The ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

/// Encrypts `plaintext` for `ctx`.
pub fn seal(cipher: &Aes256Gcm, ctx: &FieldContext<'_>, plaintext: &[u8]) -> Result<Sealed> {
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let aad = ctx.aad();
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| VaultError::storage("field encryption failed"))?;
    let mut n = [0u8; 12];
    n.copy_from_slice(&nonce);
    Ok(Sealed {
        nonce: n,
        ciphertext,
    })
}

/// Decrypts a value sealed for `ctx`.
pub fn open(
    cipher: &Aes256Gcm,
    ctx: &FieldContext<'_>,
    nonce: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let what = || {
        format!(
            "field `{}` of customer `{}` (version {})",
            ctx.field, ctx.customer, ctx.version
        )
    };
    if nonce.len() != 12 {
        return Err(VaultError::integrity(what()));
    }
    let aad = ctx.aad();
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| VaultError::integrity(what()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::DataKey;
    use proptest::prelude::*;

    fn ctx<'a>(customer: &'a str, field: &'a str, version: u64) -> FieldContext<'a> {
        FieldContext {
            tenant: "t",
            customer,
            field,
            version,
            dek_version: 1,
            provenance: None,
        }
    }

    #[test]
    fn provenance_is_bound() {
        let c = DataKey::generate().cipher();
        let prov = Provenance {
            channel: "web",
            collector: "crm",
            consent_ref: "c-1",
            collected_at_ms: 1_700_000_000_000,
            index_token: b"tok",
        };
        let mut at = ctx("c1", "phone", 1);
        at.provenance = Some(prov);
        let s = seal(&c, &at, b"v").unwrap();
        assert!(open(&c, &at, &s.nonce, &s.ciphertext).is_ok());
        let changed = [
            Provenance {
                channel: "branch",
                ..prov
            },
            Provenance {
                collector: "evil",
                ..prov
            },
            Provenance {
                consent_ref: "c-2",
                ..prov
            },
            Provenance {
                collected_at_ms: 1,
                ..prov
            },
            Provenance {
                index_token: b"other",
                ..prov
            },
        ];
        for p in changed {
            let mut other = at;
            other.provenance = Some(p);
            assert!(open(&c, &other, &s.nonce, &s.ciphertext).is_err(), "{p:?}");
        }
        // Nor can it be opened as a format-1 value (a downgrade).
        assert!(open(&c, &ctx("c1", "phone", 1), &s.nonce, &s.ciphertext).is_err());
    }

    proptest! {
        #[test]
        fn roundtrip(plain in proptest::collection::vec(any::<u8>(), 0..300), version in 1u64..1000) {
            let c = DataKey::generate().cipher();
            let s = seal(&c, &ctx("c1", "phone", version), &plain).unwrap();
            let back = open(&c, &ctx("c1", "phone", version), &s.nonce, &s.ciphertext).unwrap();
            prop_assert_eq!(&back[..], &plain[..]);
        }

        #[test]
        fn any_flipped_bit_is_rejected(plain in proptest::collection::vec(any::<u8>(), 1..64), bit in 0usize..(8 * 80)) {
            let c = DataKey::generate().cipher();
            let s = seal(&c, &ctx("c1", "phone", 1), &plain).unwrap();
            let mut ct = s.ciphertext.clone();
            let mut nonce = s.nonce;
            let total = (ct.len() + 12) * 8;
            let bit = bit % total;
            if bit < 96 { nonce[bit / 8] ^= 1 << (bit % 8); } else { let b = bit - 96; ct[b / 8] ^= 1 << (b % 8); }
            prop_assert!(matches!(open(&c, &ctx("c1", "phone", 1), &nonce, &ct), Err(VaultError::Integrity(_))));
        }
    }

    #[test]
    fn bound_to_place() {
        let c = DataKey::generate().cipher();
        let s = seal(&c, &ctx("c1", "phone", 3), b"+8613800000000").unwrap();
        for other in [
            ctx("c2", "phone", 3),
            ctx("c1", "email", 3),
            ctx("c1", "phone", 4),
        ] {
            let e = open(&c, &other, &s.nonce, &s.ciphertext).unwrap_err();
            assert!(e.to_string().contains("integrity check failed"), "{e}");
        }
        let mut t = ctx("c1", "phone", 3);
        t.tenant = "t2";
        assert!(open(&c, &t, &s.nonce, &s.ciphertext).is_err());
        let mut d = ctx("c1", "phone", 3);
        d.dek_version = 2;
        assert!(open(&c, &d, &s.nonce, &s.ciphertext).is_err());
        assert!(open(&c, &ctx("c1", "phone", 3), &s.nonce[..11], &s.ciphertext).is_err());
    }
}
