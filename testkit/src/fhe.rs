//! The sandbox tests' and benches' stand-in for the vault's key handling:
//! a GLWE secret key, block encryption, decryption, and bootstrap-key
//! generation with tfhe's core_crypto, as `vault/src/crypto/fhe.rs` does
//! it. It lives in the test kit on purpose: the sandbox crate itself never
//! holds a secret key (`sandbox/tests/no_secret_key.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sovra_sandbox::params::{self, SLOTS};
use sovra_sandbox::{BootstrapKey, FeatureBlock};
use tfhe::core_crypto::prelude::*;

/// A tenant's GLWE secret key.
pub struct Key(pub GlweSecretKeyOwned<u64>);

impl Default for Key {
    fn default() -> Self {
        Key::new()
    }
}

impl Key {
    /// A fresh key.
    pub fn new() -> Key {
        let mut seeder = new_seeder();
        let mut g = SecretRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
        Key(allocate_and_generate_new_binary_glwe_secret_key(
            params::glwe_dimension(),
            params::polynomial_size(),
            &mut g,
        ))
    }

    /// A fresh encryption of up to SLOTS values, through the stored form
    /// (as the vault reads blocks back).
    pub fn encrypt(&self, values: &[i64]) -> FeatureBlock {
        let bytes = self.encrypt_fresh(values).to_bytes().unwrap();
        FeatureBlock::from_bytes(&bytes, "test").unwrap()
    }

    /// A fresh encryption of up to SLOTS values (the write path's cost).
    pub fn encrypt_fresh(&self, values: &[i64]) -> FeatureBlock {
        let mut pl = PlaintextList::new(0u64, PlaintextCount(SLOTS));
        for (p, v) in pl.iter_mut().zip(values) {
            *p.0 = params::encode(*v);
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
        encrypt_glwe_ciphertext(&self.0, &mut ct, &pl, params::glwe_noise(), &mut gen);
        FeatureBlock::from_glwe(ct).unwrap()
    }

    /// Every slot of a GLWE ciphertext, decoded.
    pub fn decrypt(&self, ct: &GlweCiphertextOwned<u64>) -> Vec<i64> {
        let mut pl = PlaintextList::new(0u64, PlaintextCount(SLOTS));
        decrypt_glwe_ciphertext(&self.0, ct, &mut pl);
        pl.iter().map(|p| params::decode(*p.0)).collect()
    }

    /// The raw phase of an LWE ciphertext.
    pub fn phase(&self, ct: &LweCiphertextOwned<u64>) -> u64 {
        decrypt_lwe_ciphertext(&self.0.as_lwe_secret_key(), ct).0
    }

    /// An LWE ciphertext decoded at the sandbox's 2^32 scale.
    pub fn decrypt_lwe(&self, ct: &LweCiphertextOwned<u64>) -> i64 {
        params::decode(self.phase(ct))
    }

    /// The bootstrapping material, from a fresh small LWE key.
    pub fn bootstrap_key(&self) -> BootstrapKey {
        let mut seeder = new_seeder();
        let mut secret = SecretRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
        let mut enc = EncryptionRandomGenerator::<DefaultRandomGenerator>::new(
            seeder.seed(),
            seeder.as_mut(),
        );
        let small =
            allocate_and_generate_new_binary_lwe_secret_key(params::lwe_dimension(), &mut secret);
        let (kb, kl) = params::ks_decomposition();
        let ksk = allocate_and_generate_new_lwe_keyswitch_key(
            &self.0.as_lwe_secret_key(),
            &small,
            kb,
            kl,
            params::lwe_noise(),
            params::ciphertext_modulus(),
            &mut enc,
        );
        let (pb, pl) = params::pbs_decomposition();
        let bsk = par_allocate_and_generate_new_lwe_bootstrap_key(
            &small,
            &self.0,
            pb,
            pl,
            params::glwe_noise(),
            params::ciphertext_modulus(),
            &mut enc,
        );
        let mut fourier = FourierLweBootstrapKey::new(
            bsk.input_lwe_dimension(),
            bsk.glwe_size(),
            bsk.polynomial_size(),
            bsk.decomposition_base_log(),
            bsk.decomposition_level_count(),
        );
        par_convert_standard_lwe_bootstrap_key_to_fourier(&bsk, &mut fourier);
        BootstrapKey::new(ksk, fourier).unwrap()
    }
}
