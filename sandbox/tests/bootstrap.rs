//! Programmable bootstrapping on the published parameter set: the exact
//! comparison every non-linear model is built from, at the edges of its
//! range, and the noise of a bootstrap's output measured against the bound
//! the models rely on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sovra_sandbox::bootstrap::{extract, trivial, Bootstrapper, OUTPUT_NOISE_LOG};
use sovra_sandbox::params::SLOTS;
use sovra_testkit::fhe::Key;

#[test]
fn comparisons_are_exact_at_the_edges_of_their_range() {
    let key = Key::new();
    let bk = key.bootstrap_key();
    let mut bs = Bootstrapper::new(&bk);
    // (values in slots, range, thresholds): a 10-bit feature, a tiny
    // feature, and a signed score-sized range.
    let cases: [(&[i64], i64, i64, &[i64]); 3] = [
        (&[0, 511, 512, 513, 1023], 0, 1023, &[512, 1, 1023]),
        (&[0, 2, 3, 15], 0, 15, &[3]),
        (&[-3499, -1, 0, 59_999], -3499, 60_000, &[0, 60_000]),
    ];
    for (values, lo, hi, thresholds) in cases {
        let mut slots = vec![0i64; SLOTS];
        slots[..values.len()].copy_from_slice(values);
        let block = key.encrypt(&slots);
        for &t in thresholds {
            for (s, &v) in values.iter().enumerate() {
                let x = extract(block.glwe(), s);
                let bit = bs.at_least(&x, lo, hi, t, 60);
                let got = (key.phase(&bit).wrapping_add(1 << 59)) >> 60;
                assert_eq!(got, u64::from(v >= t), "{v} >= {t} in [{lo}, {hi}]");
            }
        }
    }
    assert!(bs.count() > 0);
}

#[test]
fn bootstrap_output_noise_stays_under_the_bound() {
    let key = Key::new();
    let t0 = std::time::Instant::now();
    let bk = key.bootstrap_key();
    eprintln!("keygen {:?}", t0.elapsed());
    let mut bs = Bootstrapper::new(&bk);
    let mut slots = vec![0i64; SLOTS];
    slots[1] = 9;
    let t0 = std::time::Instant::now();
    let block = key.encrypt(&slots);
    let mut worst = 0u64;
    let mut sum_sq = 0f64;
    let n = 24;
    for i in 0..n {
        let x = extract(block.glwe(), i % 2);
        let bit = bs.at_least(&x, 0, 15, 1, 60);
        let expected = if i % 2 == 1 { 1u64 << 60 } else { 0 };
        let err = key.phase(&bit).wrapping_sub(expected) as i64;
        worst = worst.max(err.unsigned_abs());
        sum_sq += (err as f64) * (err as f64);
    }
    eprintln!("{n} bootstraps {:?}", t0.elapsed());
    let sigma = (sum_sq / n as f64).sqrt().log2();
    eprintln!(
        "bootstrap output noise: σ ≈ 2^{sigma:.1}, worst 2^{:.1}",
        (worst as f64).log2()
    );
    assert!(sigma < f64::from(OUTPUT_NOISE_LOG), "σ = 2^{sigma:.1}");
    // A trivial constant carries no noise at all.
    assert_eq!(key.phase(&trivial(1 << 60)), 1 << 60);
}
