//! Packed feature blocks: one feature of up to [`SLOTS`] customers in the
//! coefficients of one GLWE ciphertext (k = 1, N = 2048).
//!
//! Guarantees: a block at rest is the whole GLWE ciphertext, mask and body
//! (2 × N × 8 bytes), so a stored feature value costs 16 bytes plus
//! framing. The mask is stored rather than regenerated from a seed (which
//! would halve the bytes) because regenerating it took over 90 % of a job's
//! evaluation time (benches/README.md). Bytes read back are accepted only through tfhe's
//! `safe_deserialize_conformant`, with a size limit and the expected
//! parameters, so a corrupted or hostile block is refused before it reaches
//! an evaluation.
//!
//! Does not: encrypt or decrypt (that needs the secret key, which only the
//! vault holds); a block is created from a ciphertext the vault encrypted.

use crate::error::{BadCiphertextError, Result};
use crate::params::{self, SLOTS};
use serde::{Deserialize, Serialize};
use tfhe::conformance::ParameterSetConformant;
use tfhe::core_crypto::prelude::{GlweCiphertextConformanceParams, GlweCiphertextOwned};
use tfhe::named::Named;
use tfhe::safe_serialization::{safe_deserialize_conformant, safe_serialize};
use tfhe_versionable::{Unversionize, UnversionizeError, Versionize, VersionizeOwned};

type Glwe = GlweCiphertextOwned<u64>;

/// The stored form: tfhe's GLWE ciphertext under a name of our own,
/// so it goes through tfhe's safe serialisation (tfhe 1.8 names only its
/// high-level types; the versioning and conformance are the ciphertext's
/// own).
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct Stored(Glwe);

impl Named for Stored {
    const NAME: &'static str = "sovra::FeatureBlock";
}

impl Versionize for Stored {
    type Versioned<'vers> = <Glwe as Versionize>::Versioned<'vers>;
    fn versionize(&self) -> Self::Versioned<'_> {
        self.0.versionize()
    }
}

impl VersionizeOwned for Stored {
    type VersionedOwned = <Glwe as VersionizeOwned>::VersionedOwned;
    fn versionize_owned(self) -> Self::VersionedOwned {
        self.0.versionize_owned()
    }
}

impl Unversionize for Stored {
    fn unversionize(versioned: Self::VersionedOwned) -> Result<Self, UnversionizeError> {
        Glwe::unversionize(versioned).map(Stored)
    }
}

impl ParameterSetConformant for Stored {
    type ParameterSet = GlweCiphertextConformanceParams<u64>;
    fn is_conformant(&self, p: &Self::ParameterSet) -> bool {
        self.0.is_conformant(p)
    }
}

/// The most bytes a serialised block may take (mask, body, framing).
pub const MAX_BLOCK_BYTES: u64 = (SLOTS as u64) * 2 * 8 + 4096;

/// One feature of [`SLOTS`] customers, encrypted.
#[derive(Clone)]
pub struct FeatureBlock {
    ct: Glwe,
}

impl std::fmt::Debug for FeatureBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FeatureBlock")
    }
}

impl FeatureBlock {
    /// Wraps a ciphertext, checking it conforms to the parameter set.
    pub fn from_glwe(ct: GlweCiphertextOwned<u64>) -> Result<FeatureBlock> {
        if !ct.is_conformant(&params::glwe_conformance()) {
            return Err(BadCiphertextError::error(
                "feature block",
                "does not conform to the GLWE parameters (k = 1, N = 2048, native modulus)",
            ));
        }
        Ok(FeatureBlock { ct })
    }

    /// Reads a block written by [`FeatureBlock::to_bytes`]. `what` names it
    /// in errors (feature and block number; never a value).
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<FeatureBlock> {
        if bytes.len() as u64 > MAX_BLOCK_BYTES {
            return Err(BadCiphertextError::error(
                what,
                format!(
                    "{} bytes, more than the {MAX_BLOCK_BYTES} a block may take",
                    bytes.len()
                ),
            ));
        }
        let Stored(ct) =
            safe_deserialize_conformant(bytes, MAX_BLOCK_BYTES, &params::glwe_conformance())
                .map_err(|e| BadCiphertextError::error(what, e))?;
        Ok(FeatureBlock { ct })
    }

    /// The block's stored form (tfhe safe serialisation, versioned).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(SLOTS * 2 * 8 + 64);
        // Serialising a clone keeps the public type tfhe's own.
        safe_serialize(&Stored(self.ct.clone()), &mut out, MAX_BLOCK_BYTES)
            .map_err(|e| BadCiphertextError::error("feature block", e.to_string()))?;
        Ok(out)
    }

    /// The ciphertext.
    pub fn glwe(&self) -> &GlweCiphertextOwned<u64> {
        &self.ct
    }
}
