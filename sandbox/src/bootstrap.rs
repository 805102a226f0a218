//! Programmable bootstrapping: the public evaluation keys, lookup tables,
//! and the primitive every non-linear model is built from, an exact
//! comparison of an encrypted integer with a cleartext threshold.
//!
//! Guarantees: a bootstrap is tfhe's own pipeline for the published
//! parameter set ([`crate::params`]): key switch from the GLWE key (as a
//! 2048-dimensional LWE key) to the small 918-dimensional key, tfhe's
//! centred modulus switch, blind rotation with the Fourier bootstrapping
//! key, sample extraction. [`BootstrapKey`] holds those two public keys and
//! nothing else. [`Bootstrapper::at_least`] is exact for every input its
//! caller's bounds allow: each bootstrap reads a value that sits at least
//! 2^57.8 away from the edges of the cell it must land in (the published
//! set's own design margin is 2^58, for a failure probability of 2^-129;
//! see `SECURITY.md` for the arithmetic), because a wide integer is read a
//! few bits at a time, lowest bits first, each reading made exact by
//! subtracting what the previous ones found.
//!
//! Does not: generate keys (that needs the secret key, which only the vault
//! holds), or decide what is worth a bootstrap (the models do).

use crate::error::{BadCiphertextError, Result};
use crate::params;
use tfhe::core_crypto::prelude::*;

/// An LWE ciphertext under the GLWE key read as a 2048-dimensional LWE key:
/// what sample extraction and bootstraps produce.
pub type Lwe = LweCiphertextOwned<u64>;

/// The public keys a bootstrap needs: the key-switching key (GLWE key →
/// small LWE key) and the bootstrapping key (small LWE key → GLWE key, in
/// the Fourier domain).
pub struct BootstrapKey {
    ksk: LweKeyswitchKeyOwned<u64>,
    bsk: FourierLweBootstrapKeyOwned,
}

impl std::fmt::Debug for BootstrapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (k, b) = self.byte_sizes();
        write!(f, "BootstrapKey(ksk {k} bytes, bsk {b} bytes)")
    }
}

impl BootstrapKey {
    /// Wraps the two keys after checking that they belong to the parameter
    /// set: dimensions, decompositions and modulus.
    pub fn new(ksk: LweKeyswitchKeyOwned<u64>, bsk: FourierLweBootstrapKeyOwned) -> Result<Self> {
        let big = params::glwe_dimension().to_equivalent_lwe_dimension(params::polynomial_size());
        let small = params::lwe_dimension();
        let (ks_base, ks_level) = params::ks_decomposition();
        let (pbs_base, pbs_level) = params::pbs_decomposition();
        let ksk_ok = ksk.input_key_lwe_dimension() == big
            && ksk.output_key_lwe_dimension() == small
            && ksk.decomposition_base_log() == ks_base
            && ksk.decomposition_level_count() == ks_level
            && ksk.ciphertext_modulus() == params::ciphertext_modulus();
        let bsk_ok = bsk.input_lwe_dimension() == small
            && bsk.glwe_size() == params::glwe_dimension().to_glwe_size()
            && bsk.polynomial_size() == params::polynomial_size()
            && bsk.decomposition_base_log() == pbs_base
            && bsk.decomposition_level_count() == pbs_level;
        if !(ksk_ok && bsk_ok) {
            return Err(BadCiphertextError::error(
                "bootstrap key",
                format!(
                    "the keys do not match the parameter set {}",
                    params::PARAMETER_SET_NAME
                ),
            ));
        }
        Ok(BootstrapKey { ksk, bsk })
    }

    /// Bytes of the key-switching key and of the Fourier bootstrapping key
    /// in memory.
    pub fn byte_sizes(&self) -> (usize, usize) {
        (
            self.ksk.as_ref().len() * 8,
            self.bsk.as_view().data().len() * 16,
        )
    }
}

fn lwe_size() -> LweSize {
    params::glwe_dimension()
        .to_equivalent_lwe_dimension(params::polynomial_size())
        .to_lwe_size()
}

/// A noiseless ciphertext of `phase` (a public constant).
pub fn trivial(phase: u64) -> Lwe {
    let mut ct = LweCiphertext::new(0u64, lwe_size(), params::ciphertext_modulus());
    *ct.get_mut_body().data = phase;
    ct
}

/// Adds a public constant to a ciphertext's phase.
pub(crate) fn add_constant(ct: &mut Lwe, phase: u64) {
    let body = ct.get_mut_body();
    *body.data = body.data.wrapping_add(phase);
}

/// Slot `slot` of a GLWE ciphertext as an LWE ciphertext.
pub fn extract(glwe: &GlweCiphertextOwned<u64>, slot: usize) -> Lwe {
    let mut out = LweCiphertext::new(0u64, lwe_size(), params::ciphertext_modulus());
    extract_lwe_sample_from_glwe_ciphertext(glwe, &mut out, MonomialDegree(slot));
    out
}

/// A lookup table: the accumulator a blind rotation turns.
///
/// Position p of the positive half torus stands for phases in
/// [p·2^52, (p+1)·2^52); the negative half gives the negated values
/// (negacyclic), which is why readings that need the whole torus go
/// through [`Bootstrapper::at_least`]'s sign step.
pub(crate) struct Lut(GlweCiphertextOwned<u64>);

/// log2 of the phase width of one lookup-table position (2^64 / 2N).
const POSITION_LOG: u32 = 52;

impl Lut {
    /// The table whose output at phase φ ∈ [0, 2^63) is g(φ rounded down
    /// to its position).
    pub(crate) fn new(g: impl Fn(u64) -> u64) -> Lut {
        let mut acc = GlweCiphertext::new(
            0u64,
            params::glwe_dimension().to_glwe_size(),
            params::polynomial_size(),
            params::ciphertext_modulus(),
        );
        for (p, c) in acc.get_mut_body().as_mut().iter_mut().enumerate() {
            *c = g((p as u64) << POSITION_LOG);
        }
        Lut(acc)
    }

    /// +v on the positive half torus, −v on the negative half.
    pub(crate) fn sign(v: u64) -> Lut {
        Lut::new(|_| v)
    }
}

/// Runs bootstraps with one thread's scratch memory. Cheap to create;
/// create one per worker.
pub struct Bootstrapper<'k> {
    key: &'k BootstrapKey,
    fft: Fft,
    buffers: ComputationBuffers,
    small: LweCiphertextOwned<u64>,
    count: u64,
}

impl<'k> Bootstrapper<'k> {
    /// A bootstrapper using `key`.
    pub fn new(key: &'k BootstrapKey) -> Bootstrapper<'k> {
        let fft = Fft::new(params::polynomial_size());
        let mut buffers = ComputationBuffers::new();
        buffers.resize(
            blind_rotate_assign_mem_optimized_requirement::<u64>(
                params::glwe_dimension().to_glwe_size(),
                params::polynomial_size(),
                fft.as_view(),
            )
            .unaligned_bytes_required(),
        );
        Bootstrapper {
            key,
            fft,
            buffers,
            small: LweCiphertext::new(
                0u64,
                params::lwe_dimension().to_lwe_size(),
                params::ciphertext_modulus(),
            ),
            count: 0,
        }
    }

    /// Bootstraps done so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// One bootstrap: key switch, centred modulus switch, blind rotation of
    /// `lut`, sample extraction. The output's noise is that of a fresh
    /// bootstrap, whatever the input's was (if the input read correctly).
    pub(crate) fn apply(&mut self, input: &Lwe, lut: &Lut) -> Lwe {
        // INVARIANT: every Lwe here has the 2048-dimensional size, the keys
        // were checked against the parameter set in BootstrapKey::new, and
        // the scratch was sized for it, so tfhe's size assertions hold.
        keyswitch_lwe_ciphertext(&self.key.ksk, input, &mut self.small);
        let log_modulus = params::polynomial_size().to_blind_rotation_input_modulus_log();
        let switched = lwe_ciphertext_centered_binary_modulus_switch::<u64, usize, _>(
            self.small.as_view(),
            log_modulus,
        );
        let mut acc = lut.0.clone();
        blind_rotate_assign_mem_optimized(
            &switched,
            &mut acc,
            &self.key.bsk,
            self.fft.as_view(),
            self.buffers.stack(),
        );
        self.count += 1;
        extract(&acc, 0)
    }

    /// Exactly [v ≥ t], as bit·2^`out_log` (out_log ≤ 63), for an integer
    /// v ∈ [lo, hi] encoded v·2^32 in `x` with noise at most 2^28
    /// ([`MAX_INPUT_NOISE_LOG`]).
    ///
    /// With d = v − t + 2^(m−1) ∈ [0, 2^m), the answer is bit m−1 of d. The
    /// bits are read in chunks, lowest first: chunk 0 is one bit, chunk 1
    /// four, then three at a time. To read chunk i, `x` is multiplied by a
    /// power of two so the chunk fills the top of the torus (the bits above
    /// it wrap away); the chunk below has its low bits subtracted (found by
    /// the previous step's second bootstrap) and its top bit left in place,
    /// where it shifts the reading by exactly half a cell; a quarter-cell
    /// offset then keeps every reading at least 2^58 from a boundary (a
    /// quarter of the four-bit chunk's 2^60 cell; for later 2^61 cells, a
    /// quarter less what the bits further below can add: 2^61/16 after the
    /// four-bit chunk, 2^61/8 after a three-bit one). A sign bootstrap reads the chunk's top bit; a second one,
    /// once that bit is removed (so the input is on the half torus where
    /// any table works), reads the rest. The last chunk's top bit is the
    /// answer. Costs 1 bootstrap for m ≤ 5, then 2 per further 3 bits.
    pub fn at_least(&mut self, x: &Lwe, lo: i64, hi: i64, t: i64, out_log: u32) -> Lwe {
        let one = 1u64 << out_log;
        if t <= lo {
            return trivial(one);
        }
        if t > hi {
            return trivial(0);
        }
        let chunks = chunk_sizes(lo, hi, t);
        let m: u32 = chunks.iter().sum();
        // INVARIANT: m ≤ 32 (chunk_sizes caps it for |lo|, |hi|, |t| ≤
        // 2^30), so 32 − s − b ≥ 0 below and the offset fits.
        let mut xd = x.clone();
        let offset = (1i64 << (m - 1)) - t;
        add_constant(&mut xd, params::encode(offset));
        let mut consumed = chunks[0];
        let mut low: Option<Lwe> = None;
        for (i, &b) in chunks.iter().enumerate().skip(1) {
            let cell_log = 64 - b;
            let mut y = xd.clone();
            lwe_ciphertext_cleartext_mul_assign(&mut y, Cleartext(1u64 << (32 - consumed - b)));
            if let Some(l) = &low {
                lwe_ciphertext_sub_assign(&mut y, l);
            }
            add_constant(&mut y, 1u64 << (cell_log - 2));
            if i + 1 == chunks.len() {
                let o = self.apply(&y, &Lut::sign(one >> 1));
                let mut bit = trivial(one >> 1);
                lwe_ciphertext_sub_assign(&mut bit, &o);
                return bit;
            }
            // The chunk's top bit β as ±2^62; y − β·2^63 = y − 2^62 + o.
            let o = self.apply(&y, &Lut::sign(1 << 62));
            lwe_ciphertext_add_assign(&mut y, &o);
            add_constant(&mut y, (1u64 << 62).wrapping_neg());
            let next = chunks[i + 1];
            let shift = 64 - next - b;
            low = Some(self.apply(&y, &Lut::new(|phase| (phase >> cell_log) << shift)));
            consumed += b;
        }
        // Unreachable: chunk_sizes returns at least two chunks.
        trivial(0)
    }
}

/// log2 of the bound on the standard deviation of a bootstrap's output
/// noise (tfhe's noise formula for this set gives about 2^49.5; the
/// bootstrap test measures it).
pub const OUTPUT_NOISE_LOG: u32 = 51;

/// log2 of the most noise the input of [`Bootstrapper::at_least`] may carry:
/// multiplied by the first reading's factor 2^27 it stays below 2^55, an
/// eighth of the narrowest margin.
pub const MAX_INPUT_NOISE_LOG: u32 = 28;

/// The chunk sizes for comparing v ∈ [lo, hi] with t: one bit, four, then
/// threes, summing to m ≥ 5 with 2^(m−1) ≥ max(t − lo, hi − t + 1).
fn chunk_sizes(lo: i64, hi: i64, t: i64) -> Vec<u32> {
    let need = (t - lo).max(hi - t + 1).max(1) as u64;
    let mut m = 1 + (64 - (need - 1).leading_zeros());
    m = m.clamp(5, 32);
    let mut sizes = vec![1, 4];
    let mut rest = m - 5;
    while rest > 0 {
        let c = rest.min(3);
        sizes.push(c);
        rest -= c;
    }
    sizes
}

/// Bootstraps [`Bootstrapper::at_least`] spends for these bounds.
pub fn comparison_cost(lo: i64, hi: i64, t: i64) -> u64 {
    if t <= lo || t > hi {
        return 0;
    }
    2 * chunk_sizes(lo, hi, t).len() as u64 - 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_range() {
        for (lo, hi, t) in [
            (0i64, 1023i64, 512i64),
            (0, 1, 1),
            (0, 15, 3),
            (-3499, 60_000, 0),
            (0, 1023, 1),
            (0, 1023, 1023),
            (-(1 << 30), 1 << 30, 1 << 30),
        ] {
            let c = chunk_sizes(lo, hi, t);
            let m: u32 = c.iter().sum();
            assert!((5..=32).contains(&m), "{c:?}");
            let half = 1i64 << (m - 1);
            assert!(
                lo - t + half >= 0 && hi - t + half < 2 * half,
                "{lo} {hi} {t} {c:?}"
            );
            assert_eq!(c[0], 1);
            assert_eq!(c[1], 4);
            assert!(c[2..].iter().all(|&b| (1..=3).contains(&b)));
        }
        assert_eq!(comparison_cost(0, 15, 3), 1);
        assert_eq!(comparison_cost(0, 1023, 512), 5);
        assert_eq!(comparison_cost(0, 1023, 0), 0);
        assert_eq!(comparison_cost(0, 1023, 1024), 0);
    }

    #[test]
    fn keys_of_another_parameter_set_are_refused() {
        let (kb, kl) = params::ks_decomposition();
        let (pb, pl) = params::pbs_decomposition();
        let big = params::glwe_dimension().to_equivalent_lwe_dimension(params::polynomial_size());
        let ksk = |output: LweDimension| {
            LweKeyswitchKey::new(0u64, kb, kl, big, output, params::ciphertext_modulus())
        };
        let bsk = |input: LweDimension| {
            FourierLweBootstrapKey::new(
                input,
                params::glwe_dimension().to_glwe_size(),
                params::polynomial_size(),
                pb,
                pl,
            )
        };
        let small = params::lwe_dimension();
        let wrong = LweDimension(small.0 - 1);
        for (k, b) in [(wrong, small), (small, wrong)] {
            let e = BootstrapKey::new(ksk(k), bsk(b)).unwrap_err();
            assert!(
                e.to_string().contains("do not match the parameter set"),
                "{e}"
            );
        }
    }
}
