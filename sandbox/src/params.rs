//! The TFHE parameter set and the plaintext encoding of packed features.
//!
//! Guarantees: every ciphertext the sandbox accepts or produces uses the GLWE
//! part (k = 1, N = 2048, TUniform(2^17) noise, native 2^64 modulus) of
//! tfhe's published 128-bit-secure parameter set
//! [`V1_8_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128`](PARAMETER_SET_NAME);
//! nothing here picks its own lattice parameters. Values are encoded with a
//! scale of 2^32, so a decrypted slot is exact while its accumulated noise
//! stays below 2^31; TUniform noise is bounded (|e| ≤ 2^17 per fresh
//! encryption), so [`noise_bound`] is a worst case, not an estimate.
//!
//! Programmable bootstrapping uses the same published set whole: its LWE
//! dimension (918), LWE noise (TUniform 2^45), bootstrapping decomposition
//! (base 2^23, 1 level) and key-switching decomposition (base 2^4, 4
//! levels), with tfhe's centred modulus switch, as tfhe's own shortint
//! pipeline does for this set. What a bootstrap may read is set by the
//! margins of [`crate::bootstrap`], never finer than the set's own.
//!
//! Does not: pick any parameter of its own.

use tfhe::core_crypto::prelude::{
    CiphertextModulus, DecompositionBaseLog, DecompositionLevelCount, DynamicDistribution,
    GlweCiphertextConformanceParams, GlweDimension, LweDimension, PolynomialSize,
};
use tfhe::shortint::parameters::v1_8::V1_8_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128 as PUBLISHED;

/// The name of the published tfhe parameter set the GLWE parameters come
/// from.
pub const PARAMETER_SET_NAME: &str = "V1_8_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128";

/// Customers per packed block: one per coefficient of the GLWE polynomial.
pub const SLOTS: usize = 2048;

/// log2 of the encoding scale: a value v is stored as v·2^32 mod 2^64.
pub const DELTA_LOG: u32 = 32;

/// log2 of the bound on a fresh encryption's noise (TUniform(17)).
pub const FRESH_NOISE_LOG: u32 = 17;

/// The largest magnitude a decrypted result may have (signed 32 bits).
pub const MAX_RESULT: u64 = (1 << (64 - DELTA_LOG - 1)) - 1;

/// Decryption is exact while the accumulated noise stays strictly below
/// this (half the encoding scale).
pub const NOISE_CEILING: u64 = 1 << (DELTA_LOG - 1);

/// The GLWE dimension k.
pub fn glwe_dimension() -> GlweDimension {
    PUBLISHED.glwe_dimension
}

/// The polynomial size N.
pub fn polynomial_size() -> PolynomialSize {
    PUBLISHED.polynomial_size
}

/// The noise distribution of fresh GLWE encryptions.
pub fn glwe_noise() -> DynamicDistribution<u64> {
    PUBLISHED.glwe_noise_distribution
}

/// The ciphertext modulus (native 2^64).
pub fn ciphertext_modulus() -> CiphertextModulus<u64> {
    PUBLISHED.ciphertext_modulus
}

/// The dimension of the small LWE key bootstraps start from.
pub fn lwe_dimension() -> LweDimension {
    PUBLISHED.lwe_dimension
}

/// The noise distribution of the key-switching key's encryptions.
pub fn lwe_noise() -> DynamicDistribution<u64> {
    PUBLISHED.lwe_noise_distribution
}

/// The bootstrapping key's gadget decomposition (base log, levels).
pub fn pbs_decomposition() -> (DecompositionBaseLog, DecompositionLevelCount) {
    (PUBLISHED.pbs_base_log, PUBLISHED.pbs_level)
}

/// The key-switching key's gadget decomposition (base log, levels).
pub fn ks_decomposition() -> (DecompositionBaseLog, DecompositionLevelCount) {
    (PUBLISHED.ks_base_log, PUBLISHED.ks_level)
}

/// What a stored or received GLWE ciphertext must conform to.
pub fn glwe_conformance() -> GlweCiphertextConformanceParams<u64> {
    GlweCiphertextConformanceParams {
        glwe_dim: glwe_dimension(),
        polynomial_size: polynomial_size(),
        ct_modulus: ciphertext_modulus(),
    }
}

/// Encodes a signed value as a plaintext (v·2^32 mod 2^64).
pub fn encode(v: i64) -> u64 {
    (v as u64).wrapping_shl(DELTA_LOG)
}

/// Decodes a decrypted phase: rounds to the nearest multiple of 2^32 and
/// reads it as a signed 32-bit value.
pub fn decode(phase: u64) -> i64 {
    let rounded = phase.wrapping_add(1 << (DELTA_LOG - 1)) >> DELTA_LOG;
    i64::from(rounded as u32 as i32)
}

/// Decodes a phase encoded at scale 2^`log` (log in 33..=63): rounds to
/// the nearest multiple and reads it as a signed (64 − log)-bit value.
pub fn decode_at(phase: u64, log: u32) -> i64 {
    (phase.wrapping_add(1 << (log - 1)) as i64) >> log
}

/// The worst-case noise of a linear combination of fresh ciphertexts with
/// coefficients of total magnitude `l1` (Σ|w|): l1 · 2^17.
pub fn noise_bound(l1: u128) -> u128 {
    l1 << FRESH_NOISE_LOG
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfhe::core_crypto::prelude::{DynamicDistribution, TUniform};

    #[test]
    fn parameters_are_the_published_ones() {
        assert_eq!(glwe_dimension().0, 1);
        assert_eq!(polynomial_size().0, SLOTS);
        assert!(ciphertext_modulus().is_native_modulus());
        assert_eq!(lwe_dimension().0, 918);
        assert_eq!(pbs_decomposition().0 .0, 23);
        assert_eq!(pbs_decomposition().1 .0, 1);
        assert_eq!(ks_decomposition().0 .0, 4);
        assert_eq!(ks_decomposition().1 .0, 4);
        match glwe_noise() {
            DynamicDistribution::TUniform(t) => {
                assert_eq!(t, TUniform::new(FRESH_NOISE_LOG));
            }
            other => panic!("unexpected noise distribution {other:?}"),
        }
    }

    #[test]
    fn encoding_round_trips_with_noise_below_the_ceiling() {
        for v in [
            0i64,
            1,
            -1,
            1023,
            -1023,
            MAX_RESULT as i64,
            -(MAX_RESULT as i64),
        ] {
            let p = encode(v);
            assert_eq!(decode(p), v);
            assert_eq!(decode(p.wrapping_add(NOISE_CEILING - 1)), v);
            assert_eq!(decode(p.wrapping_sub(NOISE_CEILING - 1)), v);
        }
        for v in [-64i64, -1, 0, 1, 63] {
            let p = (v as u64).wrapping_shl(57);
            assert_eq!(decode_at(p, 57), v);
            assert_eq!(decode_at(p.wrapping_add((1 << 56) - 1), 57), v);
            assert_eq!(decode_at(p.wrapping_sub(1 << 56), 57), v);
        }
    }
}
