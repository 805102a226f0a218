//! Compiles the .proto contracts with protox (pure Rust), so a fresh machine
//! needs no system `protoc`.

use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "sovra/vault/v1/vault.proto",
    "sovra/ledger/v1/ledger.proto",
    "sovra/policy/v1/policy.proto",
    "sovra/lineage/v1/lineage.proto",
    "sovra/sandbox/v1/sandbox.proto",
    "sovra/contracts/v1/contracts.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("sovra_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::StrictCodec")
        .compile_fds(fds)?;
    Ok(())
}
