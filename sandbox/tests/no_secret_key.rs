//! The sandbox cannot decrypt: no secret-key type and no decryption
//! function is named anywhere in the crate's source, so its public API
//! cannot take or return one (the evaluation API takes
//! `EvaluationMaterial`, which holds public parameters only). The vault's
//! release gate is the only place that decrypts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn the_sandbox_source_names_no_secret_key_and_no_decryption() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let forbidden = [
        "SecretKey",
        "secret_key",
        "decrypt_",
        "SecretRandomGenerator",
        "ClientKey",
    ];
    let mut scanned = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        scanned += 1;
        for f in forbidden {
            assert!(
                !text.contains(f),
                "{} mentions `{f}`: the sandbox must hold evaluation material only",
                path.display()
            );
        }
    }
    assert!(scanned >= 5, "scanned only {scanned} files");
}

#[test]
fn evaluation_material_is_public_parameters_only() {
    // Its whole content is an optional shared bootstrap key (a key-switching
    // key and a bootstrapping key, both public); its size proves there is
    // no room for anything else.
    assert_eq!(
        std::mem::size_of::<sovra_sandbox::EvaluationMaterial>(),
        std::mem::size_of::<Option<std::sync::Arc<sovra_sandbox::BootstrapKey>>>()
    );
}
