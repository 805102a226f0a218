//! Decision trees evaluated obliviously on ciphertexts.
//!
//! Guarantees: the encrypted output of [`Tree::evaluate`] decrypts (at
//! [`OUTPUT_LOG`]) to exactly [`Tree::reference`] on the same quantised
//! features. Every split is evaluated, whichever way the customer goes (the
//! evaluator cannot branch on a ciphertext): each split's comparison is an
//! exact [`Bootstrapper::at_least`] bit; each leaf is selected by one
//! bootstrap on the sum of its path's literals (b, or 1 − b for the `below`
//! side), which equals the path's length only on the customer's path; two
//! sibling leaves share one bootstrap when their parent is at most 3 deep
//! (the sum then reads 2·(ancestors' literals) + the parent's bit). The
//! selected leaf's value comes out of its table, every other table gives 0,
//! and the output is their sum.
//!
//! Noise: a leaf bootstrap reads at most 7 levels spaced 2^60 apart (margin
//! 2^59, twice the parameter set's own) from at most 13 fresh bootstrap
//! outputs weighted by 2 or 1; the output adds at most 64 fresh bootstrap
//! outputs and is read at a scale of 2^57 (margin 2^56, leaf values within
//! ±63).
//!
//! Does not: hide the tree's shape or thresholds from whoever runs it (the
//! spec is public to the sandbox), or evaluate features that are not
//! quantised integers.

use crate::bootstrap::{add_constant, trivial, Bootstrapper, Lut, Lwe};
use std::collections::BTreeMap;
use tfhe::core_crypto::prelude::{
    lwe_ciphertext_add_assign, lwe_ciphertext_cleartext_mul_assign, lwe_ciphertext_sub_assign,
    Cleartext,
};

/// log2 of the scale a tree's output is encoded at.
pub const OUTPUT_LOG: u32 = 57;
/// log2 of the spacing of the literal sums a leaf bootstrap reads.
const LITERAL_LOG: u32 = 60;
/// Parents at most this deep have their two leaves read by one bootstrap.
const PAIR_DEPTH: usize = 3;

/// A node of a validated tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// Output this value.
    Leaf(i64),
    /// Go to `at_least` when feature ≥ threshold, else to `below`.
    Split {
        /// The feature compared.
        feature: String,
        /// The threshold.
        threshold: i64,
        /// Index of the node for feature < threshold.
        below: usize,
        /// Index of the node for feature ≥ threshold.
        at_least: usize,
    },
}

/// A validated decision tree (root at index 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    nodes: Vec<Node>,
}

/// How one leaf (or a pair of sibling leaves) is selected.
enum Selector {
    /// The path's literals (split, side is at_least) and the leaf value.
    Single(Vec<(usize, bool)>, i64),
    /// The parent's path, the parent, and the below / at_least leaves.
    Pair(Vec<(usize, bool)>, usize, i64, i64),
}

impl Tree {
    /// Wraps nodes checked by the spec validation (root first).
    pub(crate) fn new(nodes: Vec<Node>) -> Tree {
        Tree { nodes }
    }

    /// The nodes, root first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The features the splits compare, sorted, without duplicates.
    pub fn features(&self) -> Vec<String> {
        let mut f: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| match n {
                Node::Split { feature, .. } => Some(feature.clone()),
                Node::Leaf(_) => None,
            })
            .collect();
        f.sort();
        f.dedup();
        f
    }

    /// The plaintext reference: the leaf reached by one customer's quantised
    /// features (missing features count as 0).
    pub fn reference(&self, features: &BTreeMap<String, i64>) -> i64 {
        let mut at = 0;
        // INVARIANT: validation built the nodes as a tree rooted at 0 whose
        // children indices point inside `nodes`, at most 6 deep.
        loop {
            match &self.nodes[at] {
                Node::Leaf(v) => return *v,
                Node::Split {
                    feature,
                    threshold,
                    below,
                    at_least,
                } => {
                    let v = features.get(feature).copied().unwrap_or(0);
                    at = if v >= *threshold { *at_least } else { *below };
                }
            }
        }
    }

    fn selectors(&self) -> Vec<Selector> {
        let mut out = Vec::new();
        let mut stack: Vec<(usize, Vec<(usize, bool)>)> = vec![(0, Vec::new())];
        while let Some((at, path)) = stack.pop() {
            match &self.nodes[at] {
                Node::Leaf(v) => out.push(Selector::Single(path, *v)),
                Node::Split {
                    below, at_least, ..
                } => match (&self.nodes[*below], &self.nodes[*at_least]) {
                    (Node::Leaf(b), Node::Leaf(a)) if path.len() <= PAIR_DEPTH => {
                        out.push(Selector::Pair(path, at, *b, *a));
                    }
                    _ => {
                        let mut p = path.clone();
                        p.push((at, false));
                        stack.push((*below, p));
                        let mut p = path;
                        p.push((at, true));
                        stack.push((*at_least, p));
                    }
                },
            }
        }
        out
    }

    /// Bootstraps one customer costs, given each feature's largest value.
    pub fn bootstraps(&self, max: &dyn Fn(&str) -> i64) -> u64 {
        let comparisons: u64 = self
            .nodes
            .iter()
            .map(|n| match n {
                Node::Split {
                    feature, threshold, ..
                } => crate::bootstrap::comparison_cost(0, max(feature), *threshold),
                Node::Leaf(_) => 0,
            })
            .sum();
        let leaves = self
            .selectors()
            .iter()
            .filter(|s| !matches!(s, Selector::Single(p, _) if p.is_empty()))
            .count() as u64;
        comparisons + leaves
    }

    /// The encrypted leaf value of one customer, encoded v·2^[`OUTPUT_LOG`].
    /// `feature` gives a feature's ciphertext (v·2^32, fresh noise) and its
    /// largest value.
    pub(crate) fn evaluate(
        &self,
        bs: &mut Bootstrapper<'_>,
        feature: &dyn Fn(&str) -> (Lwe, i64),
    ) -> Lwe {
        let bits: Vec<Option<Lwe>> = self
            .nodes
            .iter()
            .map(|n| match n {
                Node::Split {
                    feature: f,
                    threshold,
                    ..
                } => {
                    let (x, max) = feature(f);
                    Some(bs.at_least(&x, 0, max, *threshold, LITERAL_LOG))
                }
                Node::Leaf(_) => None,
            })
            .collect();
        let literal = |(node, at_least): (usize, bool)| -> Lwe {
            let zero = trivial(0);
            let b = bits[node].as_ref().unwrap_or(&zero);
            if at_least {
                b.clone()
            } else {
                let mut l = trivial(1 << LITERAL_LOG);
                lwe_ciphertext_sub_assign(&mut l, b);
                l
            }
        };
        let sum = |path: &[(usize, bool)]| -> Lwe {
            let mut s = trivial(0);
            for &l in path {
                lwe_ciphertext_add_assign(&mut s, &literal(l));
            }
            s
        };
        let mut out = trivial(0);
        for sel in self.selectors() {
            let (mut input, table): (Lwe, Vec<(u64, i64)>) = match sel {
                Selector::Single(path, v) if path.is_empty() => {
                    add_constant(&mut out, encode(v));
                    continue;
                }
                Selector::Single(path, v) => (sum(&path), vec![(path.len() as u64, v)]),
                Selector::Pair(path, parent, below, at_least) => {
                    let mut s = sum(&path);
                    lwe_ciphertext_cleartext_mul_assign(&mut s, Cleartext(2));
                    lwe_ciphertext_add_assign(&mut s, &literal((parent, true)));
                    let d = 2 * path.len() as u64;
                    (s, vec![(d, below), (d + 1, at_least)])
                }
            };
            // Centre each level in its cell.
            add_constant(&mut input, 1 << (LITERAL_LOG - 1));
            let lut = Lut::new(|phase| {
                let level = phase >> LITERAL_LOG;
                table
                    .iter()
                    .find(|(l, _)| *l == level)
                    .map_or(0, |(_, v)| encode(*v))
            });
            lwe_ciphertext_add_assign(&mut out, &bs.apply(&input, &lut));
        }
        out
    }
}

fn encode(v: i64) -> u64 {
    (v as u64).wrapping_shl(OUTPUT_LOG)
}
