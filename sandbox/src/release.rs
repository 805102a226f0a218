//! What the release gate does with decrypted values before it hands them
//! out: pure functions on integers the gate already decrypted.
//!
//! Guarantees: the functions are monotone or ranking-only, so they reveal
//! nothing about a customer that the released score does not; the
//! explanation names features, never values.
//!
//! Does not: decrypt (the gate lives in the vault).

use crate::spec::Bands;

/// A customer's score band.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Band {
    /// At or above the `high` threshold.
    High,
    /// At or above the `medium` threshold.
    Medium,
    /// Below it.
    Low,
}

impl Band {
    /// `high`, `medium` or `low`.
    pub fn as_str(self) -> &'static str {
        match self {
            Band::High => "high",
            Band::Medium => "medium",
            Band::Low => "low",
        }
    }
}

/// sigmoid(score / scale).
pub fn probability(score: i64, scale: i64) -> f64 {
    let x = score as f64 / scale.max(1) as f64;
    1.0 / (1.0 + (-x).exp())
}

/// The band of a probability.
pub fn band(p: f64, bands: &Bands) -> Band {
    if p >= bands.high {
        Band::High
    } else if p >= bands.medium {
        Band::Medium
    } else {
        Band::Low
    }
}

/// The names of the `n` features that pushed the score up most (largest
/// positive weight·feature first, ties by name); features that contributed
/// nothing or pulled the score down are not named.
pub fn top_features(terms: &[(String, i64)], n: usize) -> Vec<String> {
    let mut t: Vec<&(String, i64)> = terms.iter().filter(|(_, v)| *v > 0).collect();
    t.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    t.into_iter().take(n).map(|(f, _)| f.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_and_ranking() {
        let b = Bands::default();
        assert_eq!(band(probability(0, 10), &b), Band::Medium);
        assert_eq!(band(probability(100, 10), &b), Band::High);
        assert_eq!(band(probability(-100, 10), &b), Band::Low);
        let terms = vec![
            ("a".into(), 5),
            ("b".into(), 9),
            ("c".into(), -3),
            ("d".into(), 5),
        ];
        assert_eq!(top_features(&terms, 2), vec!["b", "a"]);
        assert_eq!(top_features(&terms, 9), vec!["b", "a", "d"]);
    }
}
