//! Bearer-token authentication.
//!
//! Guarantees: the server stores and compares only SHA-256 hashes of tokens;
//! a token is 256 random bits, so a hash lookup reveals nothing useful about
//! other tokens through timing, and a stolen configuration file does not
//! yield usable tokens. Tokens never appear in logs or errors.
//!
//! Does not guarantee: revocation without a restart, or protection of a token
//! in transit without TLS.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use aes_gcm::aead::OsRng;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{Result, UnauthenticatedError, VaultError};

/// Token prefix, so leaked tokens are easy to spot in scans.
pub const TOKEN_PREFIX: &str = "sovra_";

/// What a principal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Internal services: write records, read for a declared purpose.
    Service,
    /// Compliance officers: audit data, never field values.
    Officer,
    /// Partner modelers: never plaintext.
    Partner,
    /// Operators: keys and erasure.
    Admin,
}

impl Role {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Service => "service",
            Role::Officer => "officer",
            Role::Partner => "partner",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = VaultError;
    fn from_str(s: &str) -> Result<Role> {
        match s {
            "service" => Ok(Role::Service),
            "officer" => Ok(Role::Officer),
            "partner" => Ok(Role::Partner),
            "admin" => Ok(Role::Admin),
            _ => Err(VaultError::invalid(
                "role",
                "one of service, officer, partner, admin",
            )),
        }
    }
}

impl Role {
    /// The policy engine's principal type for the role.
    pub fn kind(self) -> sovra_policy::PrincipalKind {
        match self {
            Role::Service => sovra_policy::PrincipalKind::Service,
            Role::Officer => sovra_policy::PrincipalKind::Officer,
            Role::Partner => sovra_policy::PrincipalKind::Partner,
            Role::Admin => sovra_policy::PrincipalKind::Admin,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Its configured name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The tenant it acts for.
    pub tenant: String,
    /// The caller as the policy engine sees it (kind, name, department,
    /// purposes).
    pub policy: sovra_policy::Principal,
}

impl Principal {
    /// A principal with its policy attributes.
    pub fn new(
        name: &str,
        role: Role,
        tenant: &str,
        department: &str,
        purposes: impl IntoIterator<Item = String>,
    ) -> Principal {
        Principal {
            name: name.to_owned(),
            role,
            tenant: tenant.to_owned(),
            policy: sovra_policy::Principal {
                kind: role.kind(),
                name: name.to_owned(),
                department: department.to_owned(),
                purposes: purposes.into_iter().collect(),
            },
        }
    }
}

/// A freshly issued token: shown once, then only its hash is kept.
pub struct IssuedToken {
    /// The token itself (zeroized on drop).
    pub token: Zeroizing<String>,
    /// Hex SHA-256 of the token, for the configuration.
    pub sha256_hex: String,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IssuedToken(sha256={})", self.sha256_hex)
    }
}

/// Issues a new random token.
pub fn issue_token() -> IssuedToken {
    let mut raw = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(raw.as_mut());
    let token = Zeroizing::new(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.as_ref())
    ));
    let sha256_hex = hex::encode(Sha256::digest(token.as_bytes()));
    IssuedToken { token, sha256_hex }
}

/// Maps token hashes to principals.
#[derive(Debug, Default)]
pub struct Authenticator {
    by_hash: HashMap<[u8; 32], Arc<Principal>>,
}

impl Authenticator {
    /// Adds a principal by the hex SHA-256 of its token.
    pub fn add(&mut self, sha256_hex: &str, principal: Principal) -> Result<()> {
        let mut h = [0u8; 32];
        hex::decode_to_slice(sha256_hex.trim(), &mut h).map_err(|_| {
            VaultError::invalid(
                format!("principals.{}.token_sha256", principal.name),
                "must be 64 hexadecimal digits",
            )
        })?;
        if self.by_hash.insert(h, Arc::new(principal)).is_some() {
            return Err(VaultError::invalid(
                "principals",
                "two principals share a token",
            ));
        }
        Ok(())
    }

    /// The principal configured under `name`, if any (for explanations).
    pub fn by_name(&self, name: &str) -> Option<Arc<Principal>> {
        self.by_hash.values().find(|p| p.name == name).cloned()
    }

    /// Authenticates the value of an `authorization` header.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Arc<Principal>> {
        let header = header.ok_or(UnauthenticatedError::new(
            "missing `authorization: Bearer <token>` metadata",
        ))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(UnauthenticatedError::new(
                "the `authorization` metadata must be `Bearer <token>`",
            ))?
            .trim();
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_hash
            .get(&h)
            .cloned()
            .ok_or_else(|| UnauthenticatedError::new("unknown or revoked token").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_authenticate() {
        let t = issue_token();
        assert!(t.token.starts_with(TOKEN_PREFIX));
        assert!(!format!("{t:?}").contains(t.token.as_str()));
        let mut a = Authenticator::default();
        let p = Principal::new("svc", Role::Service, "default", "sales", []);
        a.add(&t.sha256_hex, p.clone()).unwrap();
        assert_eq!(
            *a.authenticate(Some(&format!("Bearer {}", t.token.as_str())))
                .unwrap(),
            p
        );
        for bad in [
            None,
            Some(""),
            Some("Basic x"),
            Some("Bearer "),
            Some("Bearer sovra_nope"),
        ] {
            assert!(
                matches!(a.authenticate(bad), Err(VaultError::Unauthenticated(_))),
                "{bad:?}"
            );
        }
        assert!(a.add("zz", p.clone()).is_err());
        assert!(a.add(&t.sha256_hex, p).is_err(), "duplicate token");
    }
}
