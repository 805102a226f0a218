#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub mod codec;

/// `sovra.vault.v1`: the vault service.
pub mod vault {
    /// Version 1 of the vault API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        include!(concat!(env!("OUT_DIR"), "/sovra.vault.v1.rs"));
    }
}

/// `sovra.ledger.v1`: the consent and audit ledger service.
pub mod ledger {
    /// Version 1 of the ledger API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        include!(concat!(env!("OUT_DIR"), "/sovra.ledger.v1.rs"));
    }
}

/// `sovra.policy.v1`: policy status, reload and explanation.
pub mod policy {
    /// Version 1 of the policy API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        include!(concat!(env!("OUT_DIR"), "/sovra.policy.v1.rs"));
    }
}

/// `sovra.sandbox.v1`: jobs on encrypted features and their release.
pub mod sandbox {
    /// Version 1 of the sandbox API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        include!(concat!(env!("OUT_DIR"), "/sovra.sandbox.v1.rs"));
    }
}

/// `sovra.lineage.v1`: field lineage queries and export.
pub mod lineage {
    /// Version 1 of the lineage API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        include!(concat!(env!("OUT_DIR"), "/sovra.lineage.v1.rs"));
    }
}

/// `sovra.contracts.v1`: CRM contracts: registration and listing.
pub mod contracts {
    /// Version 1 of the contracts API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        include!(concat!(env!("OUT_DIR"), "/sovra.contracts.v1.rs"));
    }
}

/// The encoded `FileDescriptorSet` of every Sovra proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sovra_descriptor.bin"));
