#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod calls;
mod disk;
mod env;
pub mod fhe;
mod ledger;
mod server;

pub use calls::*;
pub use disk::*;
pub use env::*;
pub use ledger::*;
pub use server::*;
