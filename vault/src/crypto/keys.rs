//! The key hierarchy: root key → versioned tenant key-encryption keys (KEKs)
//! and per-tenant blind-index keys → per-customer data keys (DEKs).
//!
//! Guarantees:
//! - The root key, every derived key and every data key live in
//!   zeroize-on-drop types, and their `Debug` output shows no key bytes.
//! - Tenant KEKs and index keys are derived from the root key with
//!   HKDF-SHA256 (ring), domain-separated by purpose, tenant and version, so
//!   they are never stored anywhere.
//! - A data key is stored only wrapped (AES-256-GCM) under a tenant KEK, with
//!   associated data binding tenant, customer id, shred slot and versions: a
//!   wrapped key copied to another customer or tenant fails to unwrap. What
//!   is wrapped is the data key XOR the customer's shred pad (`shred.rs`), so
//!   once the pad is destroyed no key can recover the data key.
//!
//! Not guaranteed: protection against an attacker who reads process memory
//! while the server runs, or who holds the root key and a copy of the data
//! directory taken before an erasure (see SECURITY.md).

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, RwLock};

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::crypto::blind_index::BlindIndexKey;
use crate::crypto::shred::{Pad, PAD_LEN};
use crate::error::{Result, VaultError};

/// Length of every symmetric key in the hierarchy.
pub const KEY_LEN: usize = 32;
/// Environment variable that may carry the root key as 64 hex digits.
pub const ROOT_KEY_ENV: &str = "SOVRA_ROOT_KEY";

/// The 256-bit root of the key hierarchy.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct RootKey([u8; KEY_LEN]);

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RootKey(<redacted>)")
    }
}

impl RootKey {
    /// A fresh random root key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut k = [0u8; KEY_LEN];
        OsRng.fill_bytes(&mut k);
        Self(k)
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self> {
        let text = Zeroizing::new(text.trim().to_owned());
        let mut k = [0u8; KEY_LEN];
        if text.len() != 2 * KEY_LEN || hex::decode_to_slice(text.as_bytes(), &mut k).is_err() {
            k.zeroize();
            return Err(VaultError::config(
                "root key",
                "expected exactly 64 hexadecimal digits (a 256-bit key)",
            ));
        }
        Ok(Self(k))
    }

    /// Reads a root key file written by [`RootKey::write_new`]. On Unix a file
    /// readable by group or others is refused: the root key protects
    /// everything.
    pub fn load_file(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path)
                .map_err(|e| VaultError::config(&shown, format!("cannot read root key: {e}")))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(VaultError::config(
                    &shown,
                    format!("root key file has mode {mode:o}; it must be 600 (chmod 600 it)"),
                ));
            }
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| VaultError::config(&shown, format!("cannot read root key: {e}")))?,
        );
        Self::from_hex(&text).map_err(|_| {
            VaultError::config(
                &shown,
                "root key file must hold exactly 64 hexadecimal digits",
            )
        })
    }

    /// Reads the root key from [`ROOT_KEY_ENV`] if set, else from `path`.
    pub fn load(path: &Path) -> Result<Self> {
        match std::env::var(ROOT_KEY_ENV) {
            Ok(v) => {
                let v = Zeroizing::new(v);
                Self::from_hex(&v).map_err(|_| {
                    VaultError::config(ROOT_KEY_ENV, "must hold exactly 64 hexadecimal digits")
                })
            }
            Err(_) => Self::load_file(path),
        }
    }

    /// Creates `path` (which must not exist) with mode 0600 and writes the key.
    pub fn write_new(&self, path: &Path) -> Result<()> {
        let shown = path.display().to_string();
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(path)
            .map_err(|e| VaultError::config(&shown, format!("cannot create root key: {e}")))?;
        let mut text = Zeroizing::new(hex::encode(self.0));
        text.push('\n');
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| VaultError::config(&shown, format!("cannot write root key: {e}")))
    }

    fn hkdf(&self, info: &[&[u8]]) -> Zeroizing<[u8; KEY_LEN]> {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"sovra/v1/hkdf-salt");
        let prk = salt.extract(&self.0);
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        // INVARIANT: 32 bytes is far below HKDF-SHA256's 255*32 output limit,
        // so expand and fill cannot fail.
        if let Ok(okm) = prk.expand(info, Len32) {
            let _ = okm.fill(out.as_mut());
        }
        out
    }
}

struct Len32;
impl ring::hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        KEY_LEN
    }
}

/// A tenant key-encryption key of one version.
pub struct Kek {
    version: u32,
    cipher: Aes256Gcm,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kek(v{}, <redacted>)", self.version)
    }
}

impl Kek {
    /// The version of this KEK.
    pub fn version(&self) -> u32 {
        self.version
    }
}

/// A customer's 256-bit data key, in the clear: only ever in memory.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; KEY_LEN]);

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl DataKey {
    /// A fresh random data key.
    pub fn generate() -> Self {
        let mut k = [0u8; KEY_LEN];
        OsRng.fill_bytes(&mut k);
        Self(k)
    }

    /// The AES-256-GCM cipher keyed with this data key (zeroized on drop).
    pub fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&self.0))
    }

    /// The customer's ledger pseudonym: HMAC-SHA256 of tenant and customer
    /// id under a salt derived from this data key. The salt exists only
    /// while the data key does, so crypto-shredding the key at erasure makes
    /// the pseudonym impossible to recompute: ledger entries stay
    /// verifiable but can no longer be linked to the person.
    pub fn pseudonym(&self, tenant: &str, customer: &str) -> [u8; 32] {
        let salt = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0),
            b"sovra/v1/pseudonym-salt",
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, salt.as_ref());
        let tag = ring::hmac::sign(
            &key,
            &encode_aad(
                b"sovra/v1/pseudonym",
                &[tenant.as_bytes(), customer.as_bytes()],
            ),
        );
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// A keyed digest of a contract evaluation's input (HMAC-SHA256 under
    /// a key derived from this data key): the evidence shows what was
    /// decided on without letting anyone test a guess (a score, a customer
    /// kind) against it, and erasure (which destroys this key) makes it
    /// meaningless.
    pub fn input_digest(&self, digest: &[u8; 32]) -> [u8; 32] {
        let key = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0),
            b"sovra/v1/contract-input-key",
        );
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_ref()),
            digest,
        );
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// The raw bytes, for tests that scan storage for leaked keys.
    pub fn expose_for_tests(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

/// A data key as stored: encrypted under a tenant KEK.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WrappedKey {
    /// The tenant KEK version that wraps this key.
    #[prost(uint32, tag = "1")]
    pub kek_version: u32,
    /// The AES-GCM nonce.
    #[prost(bytes = "vec", tag = "2")]
    pub nonce: Vec<u8>,
    /// The encrypted data key with its tag.
    #[prost(bytes = "vec", tag = "3")]
    pub ciphertext: Vec<u8>,
    /// Generation of the data key itself (bound into field ciphertexts).
    #[prost(uint32, tag = "4")]
    pub dek_version: u32,
    /// When the data key was created (ms since the epoch).
    #[prost(int64, tag = "5")]
    pub created_at_ms: i64,
    /// The customer's shred slot, holding the pad the data key is masked with.
    #[prost(uint64, tag = "6")]
    pub slot: u64,
    /// The customer's ledger pseudonym (already in the ledger; not
    /// secret), so that start-up can ask the ledger whether a customer
    /// whose pad is zero was erased. Empty in keys wrapped before it
    /// existed.
    #[prost(bytes = "vec", tag = "7")]
    pub subject: Vec<u8>,
    /// [`Pad::check`] of the pad in `slot`: a damaged or swapped pad is
    /// refused at start-up, never taken for another key. Empty in keys
    /// wrapped before it existed.
    #[prost(bytes = "vec", tag = "8")]
    pub pad_check: Vec<u8>,
    /// The AES-GCM nonce of `sealed_id`.
    #[prost(bytes = "vec", tag = "9")]
    pub id_nonce: Vec<u8>,
    /// The customer id, sealed under a key derived from the tenant's
    /// id-seal key and the pad (see [`KeyRing::open_id`]): storage keys
    /// hold only the [`CustomerRef`], and the id goes with the pad.
    #[prost(bytes = "vec", tag = "10")]
    pub sealed_id: Vec<u8>,
}

/// Length of a [`CustomerRef`].
pub const CUSTOMER_REF_LEN: usize = 16;

/// A customer's reference at rest (see [`KeyRing::customer_ref`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct CustomerRef(pub [u8; CUSTOMER_REF_LEN]);

impl CustomerRef {
    /// The reference in `b`, if it is one.
    pub fn from_slice(b: &[u8]) -> Option<CustomerRef> {
        b.try_into().ok().map(CustomerRef)
    }
}

/// Length-prefixed concatenation, so that no two different tuples of parts
/// produce the same associated data.
pub(crate) fn encode_aad(label: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(label.len() + parts.iter().map(|p| p.len() + 4).sum::<usize>());
    out.extend_from_slice(label);
    for p in parts {
        // INVARIANT: every part is an id, name or fixed-width number bounded
        // far below 4 GiB by input validation.
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// Where a data key belongs; bound into its wrapping.
#[derive(Debug, Clone, Copy)]
pub struct KeyPlace<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The customer.
    pub customer: &'a str,
    /// The customer's shred slot.
    pub slot: u64,
    /// The data key's generation.
    pub dek_version: u32,
}

fn wrap_aad(place: &KeyPlace<'_>, kek_version: u32) -> Vec<u8> {
    encode_aad(
        b"sovra/v1/dek-wrap",
        &[
            place.tenant.as_bytes(),
            place.customer.as_bytes(),
            &place.slot.to_be_bytes(),
            &kek_version.to_be_bytes(),
            &place.dek_version.to_be_bytes(),
        ],
    )
}

fn masked(dek: &[u8; KEY_LEN], pad: &Pad) -> Zeroizing<[u8; KEY_LEN]> {
    // INVARIANT: KEY_LEN == PAD_LEN, checked at compile time below.
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    for (o, (d, p)) in out.iter_mut().zip(dek.iter().zip(pad.0.iter())) {
        *o = d ^ p;
    }
    out
}
const _: () = assert!(KEY_LEN == PAD_LEN);

/// Derives and caches tenant KEKs and index keys from the root key.
pub struct KeyRing {
    root: RootKey,
    keks: RwLock<HashMap<(String, u32), Arc<Kek>>>,
    index_keys: RwLock<HashMap<String, Arc<BlindIndexKey>>>,
    lineage_keys: RwLock<HashMap<String, Arc<BlindIndexKey>>>,
    ref_keys: RwLock<HashMap<String, Arc<BlindIndexKey>>>,
    id_seal_keys: RwLock<HashMap<String, Arc<BlindIndexKey>>>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyRing(<redacted>)")
    }
}

impl KeyRing {
    /// A key ring over `root`.
    pub fn new(root: RootKey) -> Self {
        Self {
            root,
            keks: RwLock::new(HashMap::new()),
            index_keys: RwLock::new(HashMap::new()),
            lineage_keys: RwLock::new(HashMap::new()),
            ref_keys: RwLock::new(HashMap::new()),
            id_seal_keys: RwLock::new(HashMap::new()),
        }
    }

    /// The customer's reference at rest: a keyed pseudonym under the
    /// tenant's reference key. Every storage key is built from it, so the
    /// data directory never holds a customer id.
    pub fn customer_ref(&self, tenant: &str, customer: &str) -> CustomerRef {
        let t = self
            .hmac_key(&self.ref_keys, b"customer-ref\0", tenant)
            .token("", customer.as_bytes());
        let mut out = [0u8; CUSTOMER_REF_LEN];
        out.copy_from_slice(&t[..CUSTOMER_REF_LEN]);
        CustomerRef(out)
    }

    /// The key that seals the customer's id beside its data key: derived
    /// from the tenant's id-seal key and the customer's pad, so the id is
    /// shredded with the pad, even for someone holding the root key.
    fn id_seal_cipher(&self, tenant: &str, pad: &Pad) -> Aes256Gcm {
        let k = Zeroizing::new(
            self.hmac_key(&self.id_seal_keys, b"customer-id-seal\0", tenant)
                .token("", &pad.0),
        );
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(k.as_ref()))
    }

    /// Seals `customer` for its wrapped key.
    fn seal_id(&self, tenant: &str, customer: &str, pad: &Pad) -> Result<(Vec<u8>, Vec<u8>)> {
        let r = self.customer_ref(tenant, customer);
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = encode_aad(b"sovra/v1/customer-id", &[tenant.as_bytes(), &r.0]);
        let ct = self
            .id_seal_cipher(tenant, pad)
            .encrypt(
                &nonce,
                Payload {
                    msg: customer.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| VaultError::storage("customer id sealing failed"))?;
        Ok((nonce.to_vec(), ct))
    }

    /// The customer id sealed in `w`, the wrapped key stored under `r`,
    /// opened with its pad; checked to be the id `r` was derived from.
    pub fn open_id(
        &self,
        tenant: &str,
        r: &CustomerRef,
        w: &WrappedKey,
        pad: &Pad,
    ) -> Result<String> {
        let bad = || {
            VaultError::integrity(format!(
                "the sealed customer id of reference {}",
                hex::encode(r.0)
            ))
        };
        if w.id_nonce.len() != 12 {
            return Err(bad());
        }
        let aad = encode_aad(b"sovra/v1/customer-id", &[tenant.as_bytes(), &r.0]);
        let id = self
            .id_seal_cipher(tenant, pad)
            .decrypt(
                Nonce::from_slice(&w.id_nonce),
                Payload {
                    msg: &w.sealed_id,
                    aad: &aad,
                },
            )
            .map_err(|_| bad())?;
        let id = String::from_utf8(id).map_err(|_| bad())?;
        if self.customer_ref(tenant, &id) != *r {
            return Err(bad());
        }
        Ok(id)
    }

    /// The tenant's KEK of `version` (derived on first use, then cached).
    pub fn kek(&self, tenant: &str, version: u32) -> Arc<Kek> {
        let id = (tenant.to_owned(), version);
        if let Some(k) = self.keks.read().ok().and_then(|m| m.get(&id).cloned()) {
            return k;
        }
        let raw = self.root.hkdf(&[
            b"tenant-kek\0",
            tenant.as_bytes(),
            b"\0",
            &version.to_be_bytes(),
        ]);
        let kek = Arc::new(Kek {
            version,
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(raw.as_ref())),
        });
        if let Ok(mut m) = self.keks.write() {
            m.insert(id, kek.clone());
        }
        kek
    }

    /// The tenant's blind-index key. It does not rotate with the KEK: rotating
    /// it would require re-indexing every value (see SECURITY.md).
    pub fn index_key(&self, tenant: &str) -> Arc<BlindIndexKey> {
        self.hmac_key(&self.index_keys, b"blind-index\0", tenant)
    }

    /// The tenant's lineage key: value hashes in lineage records are keyed
    /// hashes under it, so they can be compared within the tenant but not
    /// tested by anyone without the root key. Separate from the blind-index
    /// key, so lineage hashes and index tokens of one value differ.
    pub fn lineage_key(&self, tenant: &str) -> Arc<BlindIndexKey> {
        self.hmac_key(&self.lineage_keys, b"lineage-value\0", tenant)
    }

    /// A tenant's HMAC key derived under `label`, cached in `cache`.
    fn hmac_key(
        &self,
        cache: &RwLock<HashMap<String, Arc<BlindIndexKey>>>,
        label: &[u8],
        tenant: &str,
    ) -> Arc<BlindIndexKey> {
        if let Some(k) = cache.read().ok().and_then(|m| m.get(tenant).cloned()) {
            return k;
        }
        let raw = self.root.hkdf(&[label, tenant.as_bytes()]);
        let key = Arc::new(BlindIndexKey::new(raw.as_ref()));
        if let Ok(mut m) = cache.write() {
            m.insert(tenant.to_owned(), key.clone());
        }
        key
    }

    /// The root key's check value: an HKDF output under its own label, so it
    /// identifies the root key without revealing it or any key derived
    /// from it. Stored at init; a start with another root key is refused.
    pub(crate) fn check_value(&self) -> Zeroizing<[u8; KEY_LEN]> {
        self.root.hkdf(&[b"root-key-check\0"])
    }

    /// The tenant's idempotency key: record keys and request digests of
    /// idempotent writes are HMACs under it, so neither the client's keys
    /// nor the requests (which hold personal data) are stored in the clear.
    pub(crate) fn idempotency_key(&self, tenant: &str) -> ring::hmac::Key {
        let raw = self.root.hkdf(&[b"idempotency\0", tenant.as_bytes()]);
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, raw.as_ref())
    }

    /// The key that wraps the tenant's TFHE secret key at rest.
    pub(crate) fn fhe_wrap_key(&self, tenant: &str) -> Zeroizing<[u8; KEY_LEN]> {
        self.root.hkdf(&[b"fhe-secret-wrap\0", tenant.as_bytes()])
    }

    /// Wraps `dek` for `place` under `kek`, masked with the customer's pad.
    pub fn wrap(
        &self,
        kek: &Kek,
        place: &KeyPlace<'_>,
        dek: &DataKey,
        pad: &Pad,
        created_at_ms: i64,
    ) -> Result<WrappedKey> {
        let (id_nonce, sealed_id) = self.seal_id(place.tenant, place.customer, pad)?;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = wrap_aad(place, kek.version);
        let m = masked(&dek.0, pad);
        let ciphertext = kek
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: m.as_ref(),
                    aad: &aad,
                },
            )
            .map_err(|_| VaultError::storage("data key wrapping failed"))?;
        Ok(WrappedKey {
            kek_version: kek.version,
            nonce: nonce.to_vec(),
            ciphertext,
            dek_version: place.dek_version,
            created_at_ms,
            slot: place.slot,
            subject: dek.pseudonym(place.tenant, place.customer).to_vec(),
            pad_check: pad.check(place.slot).to_vec(),
            id_nonce,
            sealed_id,
        })
    }

    /// Unwraps a stored data key with the customer's pad. The caller checks
    /// the KEK version is not retired before calling.
    pub fn unwrap(
        &self,
        tenant: &str,
        customer: &str,
        wrapped: &WrappedKey,
        pad: &Pad,
    ) -> Result<DataKey> {
        let what = || format!("the data key of customer `{customer}`");
        let kek = self.kek(tenant, wrapped.kek_version);
        if wrapped.nonce.len() != 12 {
            return Err(VaultError::integrity(what()));
        }
        let place = KeyPlace {
            tenant,
            customer,
            slot: wrapped.slot,
            dek_version: wrapped.dek_version,
        };
        let aad = wrap_aad(&place, wrapped.kek_version);
        let plain = Zeroizing::new(
            kek.cipher
                .decrypt(
                    Nonce::from_slice(&wrapped.nonce),
                    Payload {
                        msg: &wrapped.ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| VaultError::integrity(what()))?,
        );
        let mut m = Zeroizing::new([0u8; KEY_LEN]);
        if plain.len() != KEY_LEN {
            return Err(VaultError::integrity(what()));
        }
        m.copy_from_slice(&plain);
        let k = masked(&m, pad);
        Ok(DataKey(*k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place<'a>(tenant: &'a str, customer: &'a str) -> KeyPlace<'a> {
        KeyPlace {
            tenant,
            customer,
            slot: 3,
            dek_version: 1,
        }
    }

    #[test]
    fn wrap_roundtrip_and_binding() {
        let ring = KeyRing::new(RootKey::generate());
        let kek = ring.kek("t1", 1);
        let dek = DataKey::generate();
        let pad = Pad([9u8; PAD_LEN]);
        let w = ring.wrap(&kek, &place("t1", "c1"), &dek, &pad, 0).unwrap();
        let back = ring.unwrap("t1", "c1", &w, &pad).unwrap();
        assert_eq!(back.expose_for_tests(), dek.expose_for_tests());
        // Moved to another customer or tenant: refused.
        assert!(matches!(
            ring.unwrap("t1", "c2", &w, &pad),
            Err(VaultError::Integrity(_))
        ));
        assert!(matches!(
            ring.unwrap("t2", "c1", &w, &pad),
            Err(VaultError::Integrity(_))
        ));
        // Claimed under another KEK version or slot: refused.
        let mut w2 = w.clone();
        w2.kek_version = 2;
        assert!(ring.unwrap("t1", "c1", &w2, &pad).is_err());
        let mut w4 = w.clone();
        w4.slot = 4;
        assert!(ring.unwrap("t1", "c1", &w4, &pad).is_err());
        // Without the pad, the root key alone yields a different key.
        let other = ring.unwrap("t1", "c1", &w, &Pad([0u8; PAD_LEN])).unwrap();
        assert_ne!(other.expose_for_tests(), dek.expose_for_tests());
        let mut w3 = w;
        w3.ciphertext[0] ^= 1;
        assert!(ring.unwrap("t1", "c1", &w3, &pad).is_err());
    }

    #[test]
    fn kek_versions_and_tenants_differ() {
        let ring = KeyRing::new(RootKey::from_hex(&"11".repeat(32)).unwrap());
        let dek = DataKey::generate();
        let pad = Pad([1u8; PAD_LEN]);
        let w = ring
            .wrap(&ring.kek("t", 1), &place("t", "c"), &dek, &pad, 0)
            .unwrap();
        let other = KeyRing::new(RootKey::from_hex(&"12".repeat(32)).unwrap());
        assert!(other.unwrap("t", "c", &w, &pad).is_err());
    }

    #[test]
    fn root_key_parsing_rejects_bad_input() {
        for bad in ["", "zz", &"1".repeat(63), &"1".repeat(65), &"g".repeat(64)] {
            let e = RootKey::from_hex(bad).unwrap_err();
            assert!(!e.to_string().contains(bad) || bad.is_empty());
        }
        assert!(format!("{:?}", RootKey::generate()).contains("redacted"));
        assert!(format!("{:?}", DataKey::generate()).contains("redacted"));
    }

    #[cfg(unix)]
    #[test]
    fn root_key_file_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root.key");
        let k = RootKey::generate();
        k.write_new(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(RootKey::load_file(&p).is_ok());
        assert!(k.write_new(&p).is_err(), "never overwrites a key");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(RootKey::load_file(&p)
            .unwrap_err()
            .to_string()
            .contains("600"));
    }
}
