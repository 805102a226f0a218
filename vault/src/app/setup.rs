//! Initialising a data directory (`sovra init`): the root key, the ledger
//! key, `config.toml` with one admin principal, `schema.toml`, the default
//! policy files, and the default tenant's TFHE key.
//!
//! It lives here, not in `config`, because it opens the engine to make
//! the TFHE key: the configuration itself is plain data and never depends
//! on the engine.

use std::path::{Path, PathBuf};

use sovra_ledger::LogKey;

use crate::access::auth::{IssuedToken, Role};
use crate::config::{default_tenant, write_config, Config, StorageConfig};
use crate::crypto::keys::RootKey;
use crate::engine::Engine;
use crate::error::{Result, VaultError};
use crate::schema::DEFAULT_SCHEMA;

/// What `sovra init` created.
#[derive(Debug)]
pub struct Initialised {
    /// The configuration file.
    pub config_path: PathBuf,
    /// The first admin's token (shown once).
    pub admin_token: IssuedToken,
    /// The ledger's verifier key, for officers to pin.
    pub verifier_key: String,
    /// Whether the default tenant's TFHE key was made (the schema declares
    /// model features).
    pub fhe_key: bool,
}

/// Creates a data directory: root key (0600), `config.toml` with one admin
/// principal, `schema.toml` (the default schema, to edit), and the default
/// tenant's TFHE key (stored wrapped under the root key; tenants added
/// later get theirs at the server's next start). Refuses a
/// directory that already holds a configuration or key.
pub fn init(dir: &Path, listen: &str) -> Result<Initialised> {
    init_with(dir, listen, StorageConfig::default())
}

/// [`init`] with the log kept where `storage` says: with PostgreSQL, its
/// schema must hold no log yet (one vault per schema).
pub fn init_with(dir: &Path, listen: &str, storage: StorageConfig) -> Result<Initialised> {
    // Whatever the caller's umask: every file 0600, every directory 0700.
    crate::files::private_umask();
    let shown = dir.display().to_string();
    std::fs::create_dir_all(dir)
        .map_err(|e| VaultError::config(&shown, format!("cannot create: {e}")))?;
    crate::files::make_private_dir(dir)?;
    // A random origin suffix, so that two vaults' checkpoints never name
    // the same log.
    let mut suffix = [0u8; 4];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut suffix);
    let mut cfg = Config::for_new_dir(
        dir,
        listen,
        format!("sovra.local/ledger/{}", hex::encode(suffix)),
    );
    cfg.storage = storage;
    let config_path = dir.join("config.toml");
    let root_key = cfg.resolve(&cfg.root_key_file);
    if config_path.exists() || root_key.exists() {
        return Err(VaultError::config(
            &shown,
            "already initialised (config.toml or root.key exists); refusing to overwrite",
        ));
    }
    let wal = cfg.open_wal()?;
    if wal.durable_lsn()? > 0 {
        return Err(VaultError::config(
            "[storage]",
            format!(
                "{} already holds a vault's log; initialise a new vault in another schema",
                wal.place()
            ),
        ));
    }
    RootKey::generate().write_new(&root_key)?;
    let ledger_key = cfg.resolve(&cfg.ledger.key_file);
    if !ledger_key.exists() {
        LogKey::write_new(&ledger_key)?;
    }
    write_defaults(dir, &shown)?;
    let admin_token = cfg.add_principal("admin", Role::Admin, &default_tenant())?;
    write_config(&cfg, &config_path)?;
    let verifier_key = LogKey::load_file(&cfg.ledger.origin, &ledger_key)?.verifier_key();
    // The store is opened once, to make the key, and closed (flushed)
    // before `sovra serve` opens it.
    let engine = Engine::open_over(
        &cfg.resolve(&cfg.data_dir),
        cfg.load_root_key()?,
        cfg.load_schema()?,
        wal,
        &cfg.pad_place()?,
    )?;
    let fhe_key = !engine.schema().feature_catalog().is_empty();
    if fhe_key {
        engine.ensure_fhe_keys(&default_tenant())?;
    }
    engine.store().flush()?;
    drop(engine);
    Ok(Initialised {
        config_path,
        admin_token,
        verifier_key,
        fhe_key,
    })
}

/// Writes the default schema and policy set, for the operator to edit.
fn write_defaults(dir: &Path, shown: &str) -> Result<()> {
    std::fs::write(dir.join("schema.toml"), DEFAULT_SCHEMA)
        .map_err(|e| VaultError::config(shown, format!("cannot write schema.toml: {e}")))?;
    let policy_dir = dir.join("policies");
    std::fs::create_dir_all(&policy_dir)
        .map_err(|e| VaultError::config(shown, format!("cannot create policies/: {e}")))?;
    for (name, text) in sovra_policy::DEFAULT_FILES {
        std::fs::write(policy_dir.join(name), text)
            .map_err(|e| VaultError::config(shown, format!("cannot write policies/{name}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_LISTEN;

    #[test]
    fn init_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let i = init(dir.path(), DEFAULT_LISTEN).unwrap();
        let c = Config::load(&i.config_path).unwrap();
        assert_eq!(c.principals.len(), 1);
        let text = std::fs::read_to_string(&i.config_path).unwrap();
        assert!(!text.contains(i.admin_token.token.as_str()));
        assert!(c.load_root_key().is_ok());
        assert!(c.load_schema().is_ok());
        assert!(
            init(dir.path(), DEFAULT_LISTEN).is_err(),
            "never re-initialises"
        );
    }
}
