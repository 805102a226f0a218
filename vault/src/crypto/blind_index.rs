//! Blind indexes: HMAC-SHA256 (ring) tokens over normalised field values, so
//! equality search works without decrypting anything.
//!
//! Guarantees: a token is a keyed hash under a per-tenant index key derived
//! from the root key, domain-separated by field name, so equal values in
//! different fields or tenants give unrelated tokens and nobody without the
//! root key can compute or test a token.
//!
//! Does not guarantee: hiding equality. Two customers with the same phone
//! number have the same token, so whoever reads the index learns which
//! customers share a value and how often each value occurs (see SECURITY.md).

use std::fmt;

use ring::hmac;

/// Length of a blind-index token.
pub const TOKEN_LEN: usize = 32;

/// A tenant's blind-index key.
pub struct BlindIndexKey(hmac::Key);

impl fmt::Debug for BlindIndexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlindIndexKey(<redacted>)")
    }
}

impl BlindIndexKey {
    /// Keys HMAC-SHA256 with `raw`. ring keeps its own copy of the key
    /// schedule; the caller zeroizes `raw`.
    pub(crate) fn new(raw: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, raw))
    }

    /// The token of `normalised` in `field`.
    pub fn token(&self, field: &str, normalised: &[u8]) -> [u8; TOKEN_LEN] {
        let mut ctx = hmac::Context::with_key(&self.0);
        // INVARIANT: field names are short identifiers, so a 1-byte length
        // prefix makes (field, value) pairs unambiguous.
        ctx.update(&[field.len() as u8]);
        ctx.update(field.as_bytes());
        ctx.update(normalised);
        let tag = ctx.sign();
        let mut out = [0u8; TOKEN_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_deterministic_and_separated() {
        let k = BlindIndexKey::new(&[7u8; 32]);
        let a = k.token("phone", b"+8613800000000");
        assert_eq!(a, k.token("phone", b"+8613800000000"));
        assert_ne!(a, k.token("email", b"+8613800000000"));
        assert_ne!(a, k.token("phone", b"+8613800000001"));
        // No (field, value) concatenation collisions.
        assert_ne!(k.token("ab", b"c"), k.token("a", b"bc"));
        let other = BlindIndexKey::new(&[8u8; 32]);
        assert_ne!(a, other.token("phone", b"+8613800000000"));
    }
}
