//! Property tests: every proof the persistent log produces verifies, every
//! single-bit change to a proof, root, index or size is rejected, and roots
//! and proofs agree with the independent `ct-merkle` implementation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use ct_merkle::mem_backed_tree::MemoryBackedTree;
use proptest::prelude::*;
use sovra_ledger::bundle::check_consistency;
use sovra_ledger::entry::{Body, PolicyChange};
use sovra_ledger::{
    verify_checkpoint, verify_consistency, verify_inclusion, verify_receipt, ConsistencyProof,
    Digest, Ledger, LedgerOptions, LogKey, TlogProof,
};

const LEAVES: u64 = 4100;

struct Fixture {
    _dir: tempfile::TempDir,
    ledger: Ledger,
    leaves: Vec<Vec<u8>>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let key = LogKey::from_seed("sovra.test/proofs", &[3; 32]).unwrap();
        let ledger = Ledger::open(dir.path(), key, LedgerOptions::default()).unwrap();
        let bodies: Vec<Body> = (0..LEAVES)
            .map(|i| {
                Body::PolicyChanged(PolicyChange {
                    actor: format!("a{i}"),
                    policy_sha256: Digest([(i % 251) as u8; 32]),
                    summary: "x".repeat((i % 17) as usize),
                })
            })
            .collect();
        let leaves = bodies
            .chunks(500)
            .flat_map(|c| ledger.append(c).unwrap())
            .map(|a| a.bytes)
            .collect();
        ledger.flush().unwrap();
        Fixture {
            _dir: dir,
            ledger,
            leaves,
        }
    })
}

fn flip(b: &[u8; 32], bit: usize) -> [u8; 32] {
    let mut c = *b;
    c[(bit / 8) % 32] ^= 1 << (bit % 8);
    c
}

#[test]
fn roots_and_proofs_match_ct_merkle() {
    let f = fixture();
    let mut tree = MemoryBackedTree::<sha2_011::Sha256, Vec<u8>>::new();
    for (n, leaf) in f.leaves.iter().enumerate().take(600) {
        tree.push(leaf.clone());
        let size = n as u64 + 1;
        let root = f.ledger.tree_root(size).unwrap();
        assert_eq!(
            tree.root().as_bytes().as_slice(),
            &root[..],
            "root at {size}"
        );
        if size % 7 == 0 || size < 20 {
            let idx = (n * 31) % (n + 1);
            let ours: Vec<u8> = f.ledger.inclusion_proof(idx as u64, size).unwrap().concat();
            assert_eq!(
                tree.prove_inclusion(idx).as_bytes(),
                ours.as_slice(),
                "inclusion {idx}/{size}"
            );
            if n > 0 {
                let old = (n * 13) % n + 1;
                let ours: Vec<u8> = f
                    .ledger
                    .consistency_proof(old as u64, size)
                    .unwrap()
                    .concat();
                assert_eq!(
                    tree.prove_consistency(n + 1 - old).as_bytes(),
                    ours.as_slice(),
                    "consistency {old}->{size}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn inclusion_proofs_verify_and_resist_bit_flips(size in 1..=LEAVES, idx_seed in any::<u64>(), bit in 0usize..256, which in 0usize..64, ibit in 0u32..13) {
        let f = fixture();
        let idx = idx_seed % size;
        let leaf = sovra_ledger::leaf_hash(&f.leaves[idx as usize]);
        let root = f.ledger.tree_root(size).unwrap();
        let proof = f.ledger.inclusion_proof(idx, size).unwrap();
        prop_assert!(verify_inclusion(idx, size, &leaf, &proof, &root).is_ok());
        if !proof.is_empty() {
            let mut p = proof.clone();
            let i = which % p.len();
            p[i] = flip(&p[i], bit);
            prop_assert!(verify_inclusion(idx, size, &leaf, &p, &root).is_err());
        }
        prop_assert!(verify_inclusion(idx, size, &leaf, &proof, &flip(&root, bit)).is_err());
        prop_assert!(verify_inclusion(idx, size, &flip(&leaf, bit), &proof, &root).is_err());
        prop_assert!(verify_inclusion(idx ^ (1 << ibit), size, &leaf, &proof, &root).is_err());
        // RFC 9162 proofs do not pin the tree size by themselves (leaf 0 of
        // 33 and of 35 share a path to the same root), so the size is only
        // ever taken from a signed checkpoint: a flipped size in a receipt
        // breaks its signature.
        let key = LogKey::from_seed("sovra.test/proofs", &[3; 32]).unwrap();
        let cp = key.sign_checkpoint(size, &root).unwrap();
        let receipt = TlogProof { extra: None, index: idx, hashes: proof.clone(), checkpoint: cp.note.clone() };
        let entry = &f.leaves[idx as usize];
        prop_assert!(verify_receipt(entry, receipt.to_text().as_bytes(), &key.verifier_key()).is_ok());
        let text = String::from_utf8(cp.note.clone()).unwrap();
        let forged = text.replacen(&format!("\n{size}\n"), &format!("\n{}\n", size ^ (1 << ibit)), 1);
        let forged = TlogProof { checkpoint: forged.into_bytes(), ..receipt.clone() };
        prop_assert!(verify_receipt(entry, forged.to_text().as_bytes(), &key.verifier_key()).is_err());
        let moved = TlogProof { index: idx ^ (1 << ibit), ..receipt };
        prop_assert!(verify_receipt(entry, moved.to_text().as_bytes(), &key.verifier_key()).is_err());
    }

    #[test]
    fn consistency_proofs_verify_and_resist_bit_flips(size2 in 1..=LEAVES, s1 in any::<u64>(), bit in 0usize..256, which in 0usize..64, ibit in 0u32..13) {
        let f = fixture();
        let size1 = s1 % size2 + 1;
        let root1 = f.ledger.tree_root(size1).unwrap();
        let root2 = f.ledger.tree_root(size2).unwrap();
        let proof = f.ledger.consistency_proof(size1, size2).unwrap();
        prop_assert!(verify_consistency(size1, size2, &proof, &root1, &root2).is_ok());
        if !proof.is_empty() {
            let mut p = proof.clone();
            let i = which % p.len();
            p[i] = flip(&p[i], bit);
            prop_assert!(verify_consistency(size1, size2, &p, &root1, &root2).is_err());
        }
        prop_assert!(verify_consistency(size1, size2, &proof, &flip(&root1, bit), &root2).is_err());
        prop_assert!(verify_consistency(size1, size2, &proof, &root1, &flip(&root2, bit)).is_err());
        prop_assert!(verify_consistency(size1 ^ (1 << ibit), size2, &proof, &root1, &root2).is_err());
        // As for inclusion, sizes are trusted only inside signed
        // checkpoints: a flipped size breaks the signature.
        let key = LogKey::from_seed("sovra.test/proofs", &[3; 32]).unwrap();
        let old = key.sign_checkpoint(size1, &root1).unwrap();
        let new = key.sign_checkpoint(size2, &root2).unwrap();
        let p = ConsistencyProof::new(size1, size2, &proof);
        prop_assert!(check_consistency(&old, &new, Some(&p)).is_ok());
        let text = String::from_utf8(new.note.clone()).unwrap();
        let forged = text.replacen(&format!("\n{size2}\n"), &format!("\n{}\n", size2 ^ (1 << ibit)), 1);
        prop_assert!(verify_checkpoint(forged.as_bytes(), &key.verifier_key()).is_err());
        let wrong = ConsistencyProof::new(size1, size2 ^ (1 << ibit), &proof);
        prop_assert!(check_consistency(&old, &new, Some(&wrong)).is_err());
    }
}
