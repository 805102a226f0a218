//! Every RFC 9162 inclusion and consistency vector of transparency-dev/merkle
//! (testdata/rfc9162), through the crate's public verification functions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde_json::Value;
use sovra_ledger::{verify_consistency, verify_inclusion};

fn cases(kind: &str) -> Vec<(PathBuf, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/rfc9162")
        .join(kind);
    let mut out = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "json") {
                let v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                out.push((p, v));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn b64(v: &Value) -> Vec<u8> {
    BASE64_STANDARD.decode(v.as_str().unwrap()).unwrap()
}

fn proof(v: &Value) -> Vec<Vec<u8>> {
    // `"proof": null` is an empty proof.
    v.as_array()
        .map(|a| a.iter().map(b64).collect())
        .unwrap_or_default()
}

#[test]
fn inclusion_vectors() {
    let all = cases("inclusion");
    assert!(all.len() > 50, "vectors missing: {}", all.len());
    let (mut ok, mut err) = (0, 0);
    for (path, c) in all {
        let got = verify_inclusion(
            c["leafIdx"].as_u64().unwrap(),
            c["treeSize"].as_u64().unwrap(),
            &b64(&c["leafHash"]),
            &proof(&c["proof"]),
            &b64(&c["root"]),
        );
        let want_err = c["wantErr"].as_bool().unwrap();
        assert_eq!(got.is_err(), want_err, "{}: {:?}", path.display(), got);
        if want_err {
            err += 1
        } else {
            ok += 1
        }
    }
    assert!(ok > 0 && err > 0);
}

#[test]
fn consistency_vectors() {
    let all = cases("consistency");
    assert!(all.len() > 50, "vectors missing: {}", all.len());
    let (mut ok, mut err) = (0, 0);
    for (path, c) in all {
        let got = verify_consistency(
            c["size1"].as_u64().unwrap(),
            c["size2"].as_u64().unwrap(),
            &proof(&c["proof"]),
            &b64(&c["root1"]),
            &b64(&c["root2"]),
        );
        let want_err = c["wantErr"].as_bool().unwrap();
        assert_eq!(got.is_err(), want_err, "{}: {:?}", path.display(), got);
        if want_err {
            err += 1
        } else {
            ok += 1
        }
    }
    assert!(ok > 0 && err > 0);
}
