//! What is on disk: every file under a directory, whether bytes occur in
//! any of them (a plaintext must not), and the raw sled database.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Whether `needle` occurs in any file under `dir`.
pub fn occurs_in(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    files_under(dir).into_iter().find(|p| {
        let bytes = std::fs::read(p).unwrap();
        bytes.windows(needle.len()).any(|w| w == needle)
    })
}

/// Opens the raw sled database of a stopped server, waiting for the lock.
pub fn open_raw(dir: &Path) -> sled::Db {
    for _ in 0..100 {
        if let Ok(db) = sled::open(dir) {
            return db;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("cannot open {}", dir.display());
}

/// The reference at rest of `customer` of tenant `default` in `env`'s vault
/// (computed from its root key, as the vault does).
pub fn customer_ref(env: &crate::Env, customer: &str) -> [u8; 16] {
    let root = env.config().load_root_key().unwrap();
    sovra_vault::crypto::keys::KeyRing::new(root)
        .customer_ref("default", customer)
        .0
}

/// `tenant 0 ref`, the key of a customer's record (its
/// [`FieldSet`](sovra_vault::store::FieldSet)), as documented in store/mod.rs.
pub fn record_key(env: &crate::Env, customer: &str) -> Vec<u8> {
    data_key_key(env, customer)
}

/// The stored bytes of `field` of `customer` in a raw `records` tree.
pub fn get_field(
    records: &sled::Tree,
    env: &crate::Env,
    customer: &str,
    field: &str,
) -> Option<Vec<u8>> {
    let held = records.get(record_key(env, customer)).unwrap()?;
    let set = sovra_vault::store::FieldSet::decode(&held).expect("a well-formed record");
    set.get(field).map(<[u8]>::to_vec)
}

/// Sets the stored bytes of `field` of `customer` in a raw `records` tree,
/// keeping its other fields.
pub fn set_field(
    records: &sled::Tree,
    env: &crate::Env,
    customer: &str,
    field: &str,
    bytes: &[u8],
) {
    let k = record_key(env, customer);
    let held = records
        .get(&k)
        .unwrap()
        .map(|v| v.to_vec())
        .unwrap_or_default();
    let set = if held.is_empty() {
        sovra_vault::store::FieldSet::default()
    } else {
        sovra_vault::store::FieldSet::decode(&held).expect("a well-formed record")
    };
    let new = set.encode_with(&[(field, bytes)]).unwrap();
    records.insert(k, new).unwrap();
}

/// `tenant 0 ref`, the data-key layout documented in store.rs.
pub fn data_key_key(env: &crate::Env, customer: &str) -> Vec<u8> {
    [b"default\0".as_slice(), &customer_ref(env, customer)].concat()
}
