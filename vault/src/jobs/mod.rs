//! Sandbox jobs on the vault's side: the release gate, which alone decrypts
//! job outputs and only what the release policy allows, and the persisted
//! job views.

pub(crate) mod release;
pub mod view;
