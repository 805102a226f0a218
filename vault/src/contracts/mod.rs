//! CRM contracts in the vault: the registry (register, list, show,
//! disable) and its start-up check. The manifests, conditions, guests and
//! the pure evaluation are the `sovra-contracts` crate's.
//!
//! Guarantees:
//! - A registration or a disabling is a `contract_event` ledger entry
//!   (kind 10), appended before the registry changes and durable, with the
//!   registry's change, before the caller is answered.
//! - Registration and disabling entries name the contract by its
//!   *registry subject* ([`registry_subject`]), so the ledger's subject
//!   index finds every registry entry of one contract.
//! - At start ([`check`]) every record's pin is recomputed from its
//!   manifest and guest, and its registration and disabling entries are
//!   read back from the ledger and must match; a contract the ledger says
//!   is disabled is disabled again if its record says otherwise (a crash
//!   between the entry and the record, or a record restored from an older
//!   copy); any other disagreement refuses the start, naming the contract
//!   and the entry.
//!
//! Does not guarantee: that a record deleted from the data directory is
//! noticed when no entry of that contract is newer than the record. A lost
//! registration leaves the contract not in force, which takes no action on
//! any customer; it is reported when the ledger holds its registration.

pub mod evidence;
mod ready;
pub mod runtime;

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};
use sovra_contracts::{CelType, ContractError, Manifest};
use sovra_ledger::{Body, ContractEvent, ContractStep, Digest, Ledger};
use sovra_policy::Action;
use sovra_proto::contracts::v1 as pb;

use crate::access::auth::Principal;
use crate::app::App;
use crate::engine::contracts::{ContractRecord, StoredContract};
use crate::engine::Engine;
use crate::error::{Result, VaultError};
use crate::schema::{FieldType, Schema};

/// Longest file name accepted for error messages.
const MAX_FILE_NAME: usize = 256;
/// Longest disabling reason.
const MAX_REASON: usize = 128;
/// Most versions one contract id keeps.
pub const MAX_VERSIONS: usize = 16;
/// Most contract ids one tenant registers.
pub const MAX_CONTRACTS: usize = 256;

/// The subject of a contract's registry entries:
/// SHA-256(`"sovra/v1/contract-registry"` ‖ 0x00 ‖ tenant ‖ 0x00 ‖ id).
pub fn registry_subject(tenant: &str, id: &str) -> Digest {
    let mut h = Sha256::new();
    h.update(b"sovra/v1/contract-registry\0");
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    Digest(h.finalize().into())
}

/// The schema's fields as CEL types (timestamps are integers of ms).
pub fn field_types(schema: &Schema) -> BTreeMap<String, CelType> {
    schema
        .fields()
        .iter()
        .map(|f| {
            let t = match f.ty {
                FieldType::String => CelType::String,
                FieldType::Integer | FieldType::Timestamp => CelType::Int,
            };
            (f.name.clone(), t)
        })
        .collect()
}

/// A contract to register.
pub struct Registration {
    /// The manifest (TOML).
    pub manifest: String,
    /// Its guest module (text or binary; empty for none).
    pub guest: Vec<u8>,
    /// The manifest's file name, for error messages.
    pub file_name: String,
}

/// The registry's use cases.
#[derive(Clone)]
pub struct Registry {
    app: App,
    runtime: runtime::Runtime,
    // INVARIANT: registrations and disablings run one at a time, so the
    // check for an existing version and the write that follows it see the
    // same registry.
    lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

impl Registry {
    /// The registry over the application layer; changes tell `runtime`
    /// what the tenant's contracts now listen to.
    pub fn new(app: App, runtime: runtime::Runtime) -> Self {
        Self {
            app,
            runtime,
            lock: Default::default(),
        }
    }

    /// Checks and registers a contract (see the proto's `RegisterContract`).
    pub async fn register(&self, p: &Principal, r: Registration) -> Result<pb::Contract> {
        self.app.authorize(p, Action::ManageContracts)?;
        let (m, file_name) = self.checked(&r).await?;
        let _one = self.lock.lock().await;
        let versions = self.app.engine.contracts(&p.tenant, Some(&m.id))?;
        if let Some(existing) = self.admissible(p, &m, &versions)? {
            return Ok(existing);
        }
        let pin = m.hash();
        let wasm = m
            .guest
            .as_ref()
            .map(|g| g.wasm().to_vec())
            .unwrap_or_default();
        let appended = self.app.ledger.append(&[registry_event(
            p,
            &m.id,
            m.version,
            Digest(pin),
            ContractStep::Registered,
            "",
        )])?;
        let index = appended.first().map_or(0, |a| a.index);
        let stored = StoredContract {
            tenant: p.tenant.clone(),
            id: m.id.clone(),
            version: m.version,
            record: ContractRecord {
                manifest: r.manifest,
                wasm,
                sha256: pin.to_vec(),
                registered_at_ms: crate::clock::now_ms(),
                registered_by: p.name.clone(),
                registered_entry: index,
                disabled_entry: 0,
                file_name,
                purpose: m.purpose.clone(),
                department: m.department.clone(),
                triggers: m
                    .triggers
                    .iter()
                    .map(|(k, n)| match n {
                        Some(n) => format!("{}:{n}", k.as_str()),
                        None => k.as_str().to_owned(),
                    })
                    .collect(),
                capabilities: m
                    .capabilities
                    .iter()
                    .map(|c| c.as_str().to_owned())
                    .collect(),
                actions: m.actions.iter().map(|a| a.id.clone()).collect(),
            },
        };
        self.app
            .engine
            .put_contracts(std::slice::from_ref(&stored))?;
        self.app.commit().await?;
        self.runtime.refresh_listening(&p.tenant)?;
        let versions = self.app.engine.contracts(&p.tenant, Some(&m.id))?;
        Ok(contract(&stored, &versions))
    }

    /// The manifest checked, with the file name its errors name.
    async fn checked(&self, r: &Registration) -> Result<(Manifest, String)> {
        let file_name = if r.file_name.is_empty() {
            "manifest.toml".to_owned()
        } else {
            r.file_name.clone()
        };
        if file_name.len() > MAX_FILE_NAME || file_name.chars().any(char::is_control) {
            return Err(VaultError::invalid(
                "file_name",
                format!("at most {MAX_FILE_NAME} bytes, no control characters"),
            ));
        }
        let types = field_types(self.app.engine.schema());
        // Compiling a guest is CPU work (up to 1 MiB of module).
        let (name, text, guest) = (file_name.clone(), r.manifest.clone(), r.guest.clone());
        let m = tokio::task::spawn_blocking(move || {
            let guest = (!guest.is_empty()).then_some(guest.as_slice());
            Manifest::parse(&name, &text, guest, &types)
        })
        .await
        .map_err(|e| VaultError::internal(format!("the manifest check failed: {e}")))?
        .map_err(manifest_error)?;
        self.app
            .engine
            .schema()
            .check_purpose(&m.purpose)
            .map_err(|_| {
                VaultError::invalid(
                    "manifest",
                    format!(
                        "{file_name}: purpose `{}` is not one of the schema's purposes",
                        m.purpose
                    ),
                )
            })?;
        Ok((m, file_name))
    }

    /// Whether `m` may be registered beside `versions`: the registration
    /// that exists when it is the same; an error when it may not be.
    fn admissible(
        &self,
        p: &Principal,
        m: &Manifest,
        versions: &[StoredContract],
    ) -> Result<Option<pb::Contract>> {
        if let Some(v) = versions.iter().find(|v| v.version == m.version) {
            if v.record.sha256 == m.hash() {
                return Ok(Some(contract(v, versions)));
            }
            return Err(VaultError::already_exists(
                "contract",
                format!(
                    "`{}` v{} is registered with another pin ({}); register a higher version",
                    m.id,
                    m.version,
                    hex::encode(&v.record.sha256)
                ),
            ));
        }
        // INVARIANT: versions only go up, so the latest version is always
        // the latest registration, and a disabling entry newer than a
        // version's registration covers it (what `check` relies on).
        if let Some(latest) = versions.last().filter(|l| l.version > m.version) {
            return Err(VaultError::precondition(format!(
                "`{}` is registered up to v{}: register a version above it, not v{}",
                m.id, latest.version, m.version
            )));
        }
        if versions.len() >= MAX_VERSIONS {
            return Err(VaultError::exhausted(format!(
                "`{}` has {MAX_VERSIONS} versions registered, the most one contract keeps",
                m.id
            )));
        }
        if versions.is_empty() && self.app.engine.contract_ids(&p.tenant)? >= MAX_CONTRACTS {
            return Err(VaultError::exhausted(format!(
                "the tenant has {MAX_CONTRACTS} contracts registered, the most it may"
            )));
        }
        Ok(None)
    }

    /// The tenant's contracts: the latest version of each id.
    pub fn list(&self, p: &Principal, include_disabled: bool) -> Result<Vec<pb::Contract>> {
        self.app.authorize(p, Action::ReadContracts)?;
        let all = self.app.engine.contracts(&p.tenant, None)?;
        let mut by_id: BTreeMap<&str, Vec<StoredContract>> = BTreeMap::new();
        for c in &all {
            by_id.entry(&c.id).or_default().push(c.clone());
        }
        Ok(by_id
            .values()
            .filter_map(|versions| versions.last().map(|l| contract(l, versions)))
            .filter(|c| include_disabled || !c.disabled)
            .collect())
    }

    /// One version (0: the latest) with its manifest.
    pub fn get(&self, p: &Principal, id: &str, version: u32) -> Result<pb::ContractDetail> {
        self.app.authorize(p, Action::ReadContracts)?;
        let versions = self.app.engine.contracts(&p.tenant, Some(id))?;
        let found = if version == 0 {
            versions.last()
        } else {
            versions.iter().find(|v| v.version == version)
        };
        let v = found.ok_or_else(|| not_found(id, version))?;
        Ok(pb::ContractDetail {
            contract: Some(contract(v, &versions)),
            manifest: v.record.manifest.clone(),
            guest_wasm: v.record.wasm.clone(),
        })
    }

    /// Disables a contract id (see the proto's `DisableContract`).
    pub async fn disable(&self, p: &Principal, id: &str, reason: &str) -> Result<pb::Contract> {
        self.app.authorize(p, Action::ManageContracts)?;
        if reason.len() > MAX_REASON
            || reason
                .chars()
                .any(|c| c.is_control() || sovra_ledger::entry::is_bidi_control(c))
        {
            return Err(VaultError::invalid(
                "reason",
                format!(
                    "at most {MAX_REASON} bytes, no control or bidirectional formatting characters"
                ),
            ));
        }
        let _one = self.lock.lock().await;
        let mut versions = self.app.engine.contracts(&p.tenant, Some(id))?;
        let latest = versions.last().cloned().ok_or_else(|| not_found(id, 0))?;
        if latest.record.disabled_entry != 0 {
            return Ok(contract(&latest, &versions));
        }
        let appended = self.app.ledger.append(&[registry_event(
            p,
            id,
            latest.version,
            Digest::from_slice("pin", &latest.record.sha256)?,
            ContractStep::Disabled,
            reason,
        )])?;
        let index = appended.first().map_or(0, |a| a.index);
        for v in versions.iter_mut().filter(|v| v.record.disabled_entry == 0) {
            v.record.disabled_entry = index;
        }
        self.app.engine.put_contracts(&versions)?;
        self.app.commit().await?;
        self.runtime.refresh_listening(&p.tenant)?;
        let latest = versions.last().cloned().ok_or_else(|| not_found(id, 0))?;
        Ok(contract(&latest, &versions))
    }
}

/// A registration or disabling entry, under the contract's registry subject.
fn registry_event(
    p: &Principal,
    id: &str,
    version: u32,
    pin: Digest,
    step: ContractStep,
    detail: &str,
) -> Body {
    Body::ContractEvent(ContractEvent {
        tenant: p.tenant.clone(),
        subject: registry_subject(&p.tenant, id),
        contract: id.to_owned(),
        version,
        contract_sha256: pin,
        instance: 0,
        step,
        action: String::new(),
        actor: p.name.clone(),
        input_sha256: Digest::default(),
        fuel_used: 0,
        detail: detail.to_owned(),
        lineage: Digest::default(),
    })
}

fn not_found(id: &str, version: u32) -> VaultError {
    let id: String = id.chars().take(64).collect();
    if version == 0 {
        VaultError::not_found(format!("contract `{id}`"))
    } else {
        VaultError::not_found(format!("contract `{id}` v{version}"))
    }
}

fn manifest_error(e: ContractError) -> VaultError {
    VaultError::invalid("manifest", e.to_string())
}

/// The proto view of a stored version; `versions` are its id's, in order
/// (the id is disabled when its latest version is).
fn contract(c: &StoredContract, versions: &[StoredContract]) -> pb::Contract {
    let latest_disabled = versions
        .last()
        .map_or(c.record.disabled_entry, |l| l.record.disabled_entry);
    pb::Contract {
        id: c.id.clone(),
        version: c.version,
        sha256: hex::encode(&c.record.sha256),
        purpose: c.record.purpose.clone(),
        department: c.record.department.clone(),
        triggers: c.record.triggers.clone(),
        capabilities: c.record.capabilities.clone(),
        actions: c.record.actions.clone(),
        has_guest: !c.record.wasm.is_empty(),
        registered_at_ms: c.record.registered_at_ms,
        registered_by: c.record.registered_by.clone(),
        registered_entry: c.record.registered_entry,
        disabled: latest_disabled != 0,
        disabled_entry: c.record.disabled_entry,
    }
}

/// The start-up check of the registry against the ledger (see the module
/// docs); returns how many contract versions it holds.
pub fn check(engine: &Engine, ledger: &Ledger) -> Result<usize> {
    let all = engine.all_contracts()?;
    let mut by_id: BTreeMap<(String, String), Vec<StoredContract>> = BTreeMap::new();
    for c in &all {
        check_record(ledger, c)?;
        by_id
            .entry((c.tenant.clone(), c.id.clone()))
            .or_default()
            .push(c.clone());
    }
    for ((tenant, id), mut versions) in by_id {
        let subject = registry_subject(&tenant, &id);
        let mut disables = Vec::new();
        let mut last_register = 0;
        for i in ledger.subject_entries(&subject)? {
            let (_, e) = ledger.entry(i)?;
            if let Body::ContractEvent(ev) = e.body {
                match ev.step {
                    ContractStep::Registered => last_register = i,
                    ContractStep::Disabled => disables.push(i),
                    _ => {}
                }
            }
        }
        // A version is disabled by every disabling entry newer than its
        // registration: a record that says otherwise (a crash between the
        // entry and the record, or a record restored or edited) is
        // disabled again. A record is never what brings a contract back.
        let mut stale = false;
        for v in versions.iter_mut() {
            let newer = disables
                .iter()
                .copied()
                .filter(|d| *d > v.record.registered_entry)
                .max();
            if let (Some(d), 0) = (newer, v.record.disabled_entry) {
                v.record.disabled_entry = d;
                stale = true;
            }
        }
        if stale {
            tracing::warn!(
                contract = %id,
                tenant = %tenant,
                "the ledger disabled this contract but its record did not say so (a crash before the record was written, or an older or edited copy): disabled again"
            );
            engine.put_contracts(&versions)?;
        }
        if let Some(latest) = versions.last() {
            if last_register > latest.record.registered_entry {
                tracing::warn!(
                    contract = %id,
                    tenant = %tenant,
                    entry = last_register,
                    "the ledger registered a later version of this contract than the registry holds (a crash before it was stored, or an older copy): that version is not in force; register it again"
                );
            }
        }
    }
    Ok(all.len())
}

/// One record against its pin and its ledger entries.
fn check_record(ledger: &Ledger, c: &StoredContract) -> Result<()> {
    let name = format!(
        "contract `{}` v{} of tenant `{}`",
        c.id, c.version, c.tenant
    );
    let wasm = wasm_source(&c.record.wasm);
    if sovra_contracts::manifest::pin(c.record.manifest.as_bytes(), wasm).as_slice()
        != c.record.sha256.as_slice()
    {
        return Err(VaultError::integrity(format!(
            "{name}: its manifest or guest in the vault's `contracts` tree does not match its pin (altered on disk)"
        )));
    }
    // The entry, when it is the step named; returns its actor.
    let want = |i: u64, step: ContractStep| -> Result<String> {
        let found = if i < ledger.size() {
            match ledger.entry(i)?.1.body {
                Body::ContractEvent(ev)
                    if ev.step == step
                        && ev.tenant == c.tenant
                        && ev.contract == c.id
                        && ev.subject == registry_subject(&c.tenant, &c.id)
                        && (step == ContractStep::Disabled
                            || (ev.version == c.version
                                && ev.contract_sha256.0.as_slice()
                                    == c.record.sha256.as_slice())) =>
                {
                    Some(ev.actor)
                }
                _ => None,
            }
        } else {
            None
        };
        if let Some(actor) = found {
            Ok(actor)
        } else {
            Err(VaultError::integrity(format!(
                "{name}: the vault's `contracts` tree names ledger entry {i} as its {}, but that entry is not (the registry was altered, or the ledger replaced)",
                if step == ContractStep::Registered { "registration" } else { "disabling" }
            )))
        }
    };
    let actor = want(c.record.registered_entry, ContractStep::Registered)?;
    if c.record.disabled_entry != 0 {
        want(c.record.disabled_entry, ContractStep::Disabled)?;
    }
    // What List and Get show must be what the pinned manifest says, and
    // who registered it what the entry says.
    let m = Manifest::parse(
        &c.record.file_name,
        &c.record.manifest,
        wasm,
        &sovra_contracts::AnyField,
    )
    .map_err(|e| {
        VaultError::integrity(format!(
            "{name}: its pinned manifest no longer checks ({e}); this build may be older than the one that registered it"
        ))
    })?;
    let mut summary = c.record.clone();
    set_summary(&mut summary, &m);
    if summary != c.record || actor != c.record.registered_by {
        return Err(VaultError::integrity(format!(
            "{name}: its summary or registrant in the vault's `contracts` tree differs from its manifest and ledger entry (altered on disk)"
        )));
    }
    Ok(())
}

/// The guest as stored (a WebAssembly binary), for a new check.
fn wasm_source(wasm: &[u8]) -> Option<&[u8]> {
    (!wasm.is_empty()).then_some(wasm)
}

/// Sets a record's summary from its checked manifest.
fn set_summary(r: &mut ContractRecord, m: &Manifest) {
    r.purpose = m.purpose.clone();
    r.department = m.department.clone();
    r.triggers = m
        .triggers
        .iter()
        .map(|(k, n)| match n {
            Some(n) => format!("{}:{n}", k.as_str()),
            None => k.as_str().to_owned(),
        })
        .collect();
    r.capabilities = m
        .capabilities
        .iter()
        .map(|c| c.as_str().to_owned())
        .collect();
    r.actions = m.actions.iter().map(|a| a.id.clone()).collect();
}
