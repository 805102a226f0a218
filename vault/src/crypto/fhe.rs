//! The tenant's TFHE secret key and everything that needs it: encrypting
//! feature blocks on write, decrypting job outputs in the release gate.
//!
//! Guarantees: the key is generated from tfhe's CSPRNG for the parameter
//! set of [`sovra_sandbox::params`]; at rest it exists only wrapped with
//! AES-256-GCM under a key derived from the root key, bound by associated
//! data to the tenant and the parameter set; in memory it lives in
//! [`FheSecret`], which is crate-private, has no Debug output of the key and
//! zeroes it on drop. Every block encryption is fresh (new seed, new mask,
//! new noise), never trivial, so rewriting a block after an update or an
//! erasure shows nothing about the old value, the new one or their
//! difference, and its noise is that of a fresh encryption.
//!
//! Bootstrapped jobs (trees, histograms) need a bootstrap key: a
//! key-switching key from this key to a small LWE key and a bootstrapping
//! key from the small key back to this one. [`FheSecret::bootstrap_key`]
//! makes both from a fresh small key that lives only while they are made
//! (it is zeroed on return and never stored: bootstrap outputs are under
//! this key, so nothing needs the small one later). The engine's feature
//! store keeps the result in memory, about 120 MB per tenant, made at a
//! tenant's first bootstrapped job in the process.
//!
//! Does not: store anything (the engine's feature store keeps the wrapped
//! key in its tree), or hand the key to anything outside the vault; the
//! sandbox crate never sees this type.

use crate::crypto::keys::{encode_aad, KeyRing};
use crate::error::{Result, VaultError};
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use sovra_sandbox::params::{self, SLOTS};
use sovra_sandbox::{BootstrapKey, FeatureBlock};
use tfhe::core_crypto::prelude::*;
use zeroize::{Zeroize, Zeroizing};

/// The tenant's GLWE secret key (binary, k·N = 2048 coefficients).
pub(crate) struct FheSecret {
    key: GlweSecretKeyOwned<u64>,
}

impl Drop for FheSecret {
    fn drop(&mut self) {
        self.key.as_mut().zeroize();
    }
}

impl std::fmt::Debug for FheSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FheSecret(<redacted>)")
    }
}

const PACKED_LEN: usize = SLOTS / 8;

fn aad(tenant: &str) -> Vec<u8> {
    encode_aad(
        b"sovra/v1/fhe-secret-key",
        &[tenant.as_bytes(), params::PARAMETER_SET_NAME.as_bytes()],
    )
}

impl FheSecret {
    /// A fresh key from tfhe's CSPRNG.
    pub(crate) fn generate() -> FheSecret {
        let mut seeder = new_seeder();
        let mut gen = SecretRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
        let key = allocate_and_generate_new_binary_glwe_secret_key(
            params::glwe_dimension(),
            params::polynomial_size(),
            &mut gen,
        );
        FheSecret { key }
    }

    /// The key's coefficients (0 or 1), one bit each.
    fn pack(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(vec![0u8; PACKED_LEN]);
        for (i, &c) in self.key.as_ref().iter().enumerate() {
            out[i / 8] |= ((c & 1) as u8) << (i % 8);
        }
        out
    }

    fn unpack(bytes: &[u8]) -> Option<FheSecret> {
        if bytes.len() != PACKED_LEN {
            return None;
        }
        let coeffs: Vec<u64> = (0..SLOTS)
            .map(|i| u64::from((bytes[i / 8] >> (i % 8)) & 1))
            .collect();
        Some(FheSecret {
            key: GlweSecretKey::from_container(coeffs, params::polynomial_size()),
        })
    }

    /// The key wrapped for storage: AES-256-GCM under the tenant's wrap key,
    /// bound to the tenant and the parameter set.
    pub(crate) fn wrap(&self, keyring: &KeyRing, tenant: &str) -> Result<Vec<u8>> {
        let k = keyring.fhe_wrap_key(tenant);
        let cipher = Aes256Gcm::new_from_slice(k.as_ref())
            .map_err(|_| VaultError::storage("TFHE key wrapping failed"))?;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let packed = self.pack();
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: packed.as_ref(),
                    aad: &aad(tenant),
                },
            )
            .map_err(|_| VaultError::storage("TFHE key wrapping failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// The key [`FheSecret::wrap`] wrapped; DATA_LOSS if it fails
    /// authentication (another tenant's, another parameter set's, altered).
    pub(crate) fn unwrap(keyring: &KeyRing, tenant: &str, wrapped: &[u8]) -> Result<FheSecret> {
        let what = || format!("the TFHE secret key of tenant `{tenant}`");
        if wrapped.len() < 12 {
            return Err(VaultError::integrity(what()));
        }
        let k = keyring.fhe_wrap_key(tenant);
        let cipher =
            Aes256Gcm::new_from_slice(k.as_ref()).map_err(|_| VaultError::integrity(what()))?;
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    Nonce::from_slice(&wrapped[..12]),
                    Payload {
                        msg: &wrapped[12..],
                        aad: &aad(tenant),
                    },
                )
                .map_err(|_| VaultError::integrity(what()))?,
        );
        FheSecret::unpack(&plain).ok_or_else(|| VaultError::integrity(what()))
    }

    /// Encrypts [`SLOTS`] quantised values (missing slots 0) as a fresh
    /// block: new mask, new noise.
    pub(crate) fn encrypt_block(&self, values: &[i64]) -> Result<FeatureBlock> {
        let mut plain = PlaintextList::new(0u64, PlaintextCount(SLOTS));
        for (p, &v) in plain.iter_mut().zip(values) {
            *p.0 = params::encode(v);
        }
        let mut seeder = new_seeder();
        let mut gen = EncryptionRandomGenerator::<DefaultRandomGenerator>::new(
            seeder.seed(),
            seeder.as_mut(),
        );
        let mut ct = GlweCiphertext::new(
            0u64,
            params::glwe_dimension().to_glwe_size(),
            params::polynomial_size(),
            params::ciphertext_modulus(),
        );
        encrypt_glwe_ciphertext(&self.key, &mut ct, &plain, params::glwe_noise(), &mut gen);
        plain.as_mut().zeroize();
        FeatureBlock::from_glwe(ct).map_err(|e| VaultError::storage(e.to_string()))
    }

    /// Decrypts and decodes every slot of a GLWE ciphertext.
    pub(crate) fn decrypt_glwe(&self, ct: &GlweCiphertextOwned<u64>) -> Zeroizing<Vec<i64>> {
        let mut plain = PlaintextList::new(0u64, PlaintextCount(SLOTS));
        // INVARIANT: `ct` conforms to the parameter set (a FeatureBlock, or
        // an evaluation's output built from FeatureBlocks).
        decrypt_glwe_ciphertext(&self.key, ct, &mut plain);
        let out = Zeroizing::new(plain.iter().map(|p| params::decode(*p.0)).collect());
        plain.as_mut().zeroize();
        out
    }

    /// Decrypts and decodes a stored block.
    pub(crate) fn decrypt_block(&self, block: &FeatureBlock) -> Zeroizing<Vec<i64>> {
        self.decrypt_glwe(block.glwe())
    }

    /// Decrypts and decodes an LWE ciphertext extracted from a block.
    pub(crate) fn decrypt_lwe(&self, ct: &LweCiphertextOwned<u64>) -> i64 {
        self.decrypt_lwe_at(ct, params::DELTA_LOG)
    }

    /// Decrypts an LWE ciphertext encoded at scale 2^`log`.
    pub(crate) fn decrypt_lwe_at(&self, ct: &LweCiphertextOwned<u64>, log: u32) -> i64 {
        let lwe_key = self.key.as_lwe_secret_key();
        let mut phase = decrypt_lwe_ciphertext(&lwe_key, ct).0;
        let v = params::decode_at(phase, log);
        phase.zeroize();
        v
    }

    /// A bootstrap key for this key, from a fresh small LWE key that is
    /// zeroed before returning. Takes a few seconds (parallel).
    pub(crate) fn bootstrap_key(&self) -> Result<BootstrapKey> {
        let mut seeder = new_seeder();
        let mut secret_gen = SecretRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
        let mut enc_gen = EncryptionRandomGenerator::<DefaultRandomGenerator>::new(
            seeder.seed(),
            seeder.as_mut(),
        );
        let mut small = allocate_and_generate_new_binary_lwe_secret_key(
            params::lwe_dimension(),
            &mut secret_gen,
        );
        let (ks_base, ks_level) = params::ks_decomposition();
        let ksk = allocate_and_generate_new_lwe_keyswitch_key(
            &self.key.as_lwe_secret_key(),
            &small,
            ks_base,
            ks_level,
            params::lwe_noise(),
            params::ciphertext_modulus(),
            &mut enc_gen,
        );
        let (pbs_base, pbs_level) = params::pbs_decomposition();
        let bsk = par_allocate_and_generate_new_lwe_bootstrap_key(
            &small,
            &self.key,
            pbs_base,
            pbs_level,
            params::glwe_noise(),
            params::ciphertext_modulus(),
            &mut enc_gen,
        );
        small.as_mut().zeroize();
        let mut fourier = FourierLweBootstrapKey::new(
            bsk.input_lwe_dimension(),
            bsk.glwe_size(),
            bsk.polynomial_size(),
            bsk.decomposition_base_log(),
            bsk.decomposition_level_count(),
        );
        par_convert_standard_lwe_bootstrap_key_to_fourier(&bsk, &mut fourier);
        BootstrapKey::new(ksk, fourier).map_err(|e| VaultError::storage(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::RootKey;

    #[test]
    fn wrap_round_trip_and_binding() {
        let ring = KeyRing::new(RootKey::generate());
        let k = FheSecret::generate();
        let w = k.wrap(&ring, "t1").unwrap();
        let back = FheSecret::unwrap(&ring, "t1", &w).unwrap();
        assert_eq!(back.key.as_ref(), k.key.as_ref());
        assert!(FheSecret::unwrap(&ring, "t2", &w).is_err());
        let mut bad = w.clone();
        bad[20] ^= 1;
        assert!(FheSecret::unwrap(&ring, "t1", &bad).is_err());
        assert!(FheSecret::unwrap(&ring, "t1", &w[..5]).is_err());
        assert_eq!(format!("{k:?}"), "FheSecret(<redacted>)");
    }

    #[test]
    fn fresh_encryptions_decrypt_and_differ() {
        let k = FheSecret::generate();
        let mut v = vec![0i64; SLOTS];
        v[7] = 1023;
        v[2047] = 5;
        let a = k.encrypt_block(&v).unwrap();
        let b = k.encrypt_block(&v).unwrap();
        assert_eq!(&k.decrypt_block(&a)[..], &v[..]);
        assert_ne!(a.to_bytes().unwrap(), b.to_bytes().unwrap());
    }
}
