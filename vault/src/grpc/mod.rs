//! The gRPC edge: one file per service, authentication and transport
//! limits as tower layers, and the one mapping of the vault's errors to
//! gRPC status. A handler decodes, calls the application layer
//! ([`crate::app`]), and encodes.

pub mod admit;
pub mod authn;
pub mod contracts;
pub mod ledger;
pub mod lineage;
pub mod net;
pub mod policy;
pub mod sandbox;
pub mod status;
pub mod vault;
