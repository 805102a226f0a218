//! The contract registry's storage: one record per registered contract
//! version in the `contracts` tree (`store::ContractRecord`), written
//! through the write-ahead log like every other tree.
//!
//! Guarantees: a record is read back exactly as written or refused as
//! damaged, naming the contract. Not guaranteed here: that a record agrees
//! with the ledger; the application layer checks that at start
//! (`contracts::check`) and orders every change after its ledger entry.

use prost::Message;

use super::Engine;
use crate::error::{Result, VaultError};
pub use crate::store::ContractRecord;
use crate::store::{contract_key, contract_prefix};

/// A stored contract version: its tenant, id and version, and its record.
#[derive(Clone)]
pub struct StoredContract {
    /// The tenant.
    pub tenant: String,
    /// The contract's id.
    pub id: String,
    /// Its version.
    pub version: u32,
    /// Its record.
    pub record: ContractRecord,
}

fn decode(tenant: &str, key: &[u8], value: &[u8]) -> Result<StoredContract> {
    let rest = key.get(tenant.len() + 1..).unwrap_or_default();
    let damaged = || {
        VaultError::integrity(format!(
            "a contract record of tenant `{tenant}` in the vault's `contracts` tree"
        ))
    };
    let (id, version) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => return Err(damaged()),
    };
    let id = std::str::from_utf8(id).map_err(|_| damaged())?.to_owned();
    let version = <[u8; 4]>::try_from(version)
        .map(u32::from_be_bytes)
        .map_err(|_| damaged())?;
    let record = ContractRecord::decode(value).map_err(|_| {
        VaultError::integrity(format!(
            "the record of contract `{id}` v{version} of tenant `{tenant}` in the vault's `contracts` tree"
        ))
    })?;
    Ok(StoredContract {
        tenant: tenant.to_owned(),
        id,
        version,
        record,
    })
}

impl Engine {
    /// Every version of every contract of `tenant` (of one `id` when
    /// given), in key order: by id, then by version.
    pub fn contracts(&self, tenant: &str, id: Option<&str>) -> Result<Vec<StoredContract>> {
        let tree = &self.store.contracts;
        let mut out = Vec::new();
        for item in tree.scan_prefix(contract_prefix(tenant, id)) {
            let (k, v) = item?;
            out.push(decode(tenant, &k, &v)?);
        }
        Ok(out)
    }

    /// How many contract ids `tenant` has registered.
    pub fn contract_ids(&self, tenant: &str) -> Result<usize> {
        let mut ids = std::collections::BTreeSet::new();
        for c in self.contracts(tenant, None)? {
            ids.insert(c.id);
        }
        Ok(ids.len())
    }

    /// Every contract version of every tenant (for the start-up check).
    pub fn all_contracts(&self) -> Result<Vec<StoredContract>> {
        let mut out = Vec::new();
        for item in self.store.contracts.iter() {
            let (k, v) = item?;
            let tenant = k
                .iter()
                .position(|b| *b == 0)
                .and_then(|i| std::str::from_utf8(&k[..i]).ok())
                .ok_or_else(|| VaultError::integrity("a key in the vault's `contracts` tree"))?
                .to_owned();
            out.push(decode(&tenant, &k, &v)?);
        }
        Ok(out)
    }

    /// Writes contract versions (not durable until [`Engine::commit`]).
    pub fn put_contracts(&self, items: &[StoredContract]) -> Result<()> {
        let encoded: Vec<(Vec<u8>, Vec<u8>)> = items
            .iter()
            .map(|c| {
                (
                    contract_key(&c.tenant, &c.id, c.version),
                    c.record.encode_to_vec(),
                )
            })
            .collect();
        let writes: Vec<(&[u8], Option<&[u8]>)> = encoded
            .iter()
            .map(|(k, v)| (k.as_slice(), Some(v.as_slice())))
            .collect();
        self.store.writer.write(&self.store.contracts, &writes)?;
        Ok(())
    }
}
