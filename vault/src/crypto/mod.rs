//! Cryptography: the key hierarchy, AES-256-GCM envelopes, HMAC blind
//! indexes, shred pads and the tenants' TFHE keys. Nothing here touches
//! sled trees or the network; every secret lives in a zeroize-on-drop type.

pub mod blind_index;
pub mod envelope;
pub(crate) mod fhe;
pub mod keys;
pub mod shred;
