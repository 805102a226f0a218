//! The contract runtime: triggers (signals and vault events), evaluation
//! with the customer's fields as policy discloses them to the contract's
//! `Workload` principal, the durable outbox, delivery to connectors,
//! completions, retries, the circuit breaker, deadlines, escalation and
//! cancellation.
//!
//! Guarantees:
//! - Every step is a `contract_event` ledger entry (kind 10) under the
//!   customer's pseudonym, appended before the runtime's records change;
//!   a caller is answered only once both are durable.
//! - Every action is decided by the policy set in force for the
//!   contract's principal and purpose before it is queued; a denied action
//!   is recorded (`action_denied`, with the determining policies) and
//!   never delivered. A contract reads only the fields its manifest names,
//!   as policy discloses them (plaintext, mask or nothing); a denied read
//!   fails the instance and takes no action.
//! - Delivery is at least once: an action is leased to one `WatchActions`
//!   stream at a time and sent again when its lease runs out or after a
//!   restart, until it is completed, failed for the last time or
//!   cancelled. Exactly one completion is recorded: a second is refused,
//!   also across a crash (at start, a completion or cancellation the
//!   ledger holds and the outbox lacks is applied to the outbox).
//! - Timers are keyed by due time and survive restarts; the loop wakes for
//!   the earliest one (and at least every second).
//! - An erasure cancels the customer's open actions; a withdrawal cancels
//!   those of contracts acting for the withdrawn purpose.
//!
//! Does not guarantee:
//! - that an escalation or an evaluation is recorded once when the process
//!   dies between its ledger entry and the outbox write: the ledger may
//!   then hold an entry the outbox does not reflect (an instance nobody
//!   sees, or an escalation recorded twice). Completions are reconciled.
//! - `write_field` and `submit_workload` actions are delivered to a
//!   connector like the others; the vault does not take them itself yet.
//! - the circuit breaker's state survives a restart (it is in memory).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use sovra_contracts::{Evaluation, Event, Manifest, Planned, Scalar, Trigger};
use sovra_ledger::entry::Disclosure as LedgerDisclosure;
use sovra_ledger::{Body, ContractEvent, ContractStep, Digest};
use sovra_policy::{Action as PolicyAction, CustomerAttrs, Disclosure, PrincipalKind};
use sovra_proto::contracts::v1 as pb;

use crate::access::auth::Principal;
use crate::access::policy;
use crate::app::App;
use crate::clock::now_ms;
use crate::engine::contract_runtime::{
    self as rt, action_key, actions_prefix, customer_action_key, customer_actions_prefix, decode,
    encode, instance_key, instance_prefix, signal_key, ActionRec, InboxRec, InstanceRec, SignalRec,
    NEXT_KEY, TIMER_DEADLINE, TIMER_RETRY,
};
use crate::engine::contracts::StoredContract;
use crate::error::{Result, VaultError};
use crate::schema::{FieldType, FieldValue};

/// How long a delivered action is a stream's by default.
pub const DEFAULT_LEASE_MS: i64 = 30_000;
/// How long the circuit breaker keeps a contract paused.
pub const BREAKER_PAUSE_MS: i64 = 30_000;
/// Longest idempotency key.
const MAX_KEY_LEN: usize = 128;
/// Longest failure reason.
const MAX_REASON: usize = 128;
/// Instance ids reserved at a time (durably, before any is used), so that
/// a crash never makes an id be used twice.
const ID_BLOCK: u64 = 1024;
/// Most timers fired per pass.
const TIMER_BATCH: usize = 256;
/// Most inbox records run per pass.
const INBOX_BATCH: usize = 256;

use super::ready::{Meta, Place, ReadyIndex};

#[derive(Debug, Default, Clone, Copy)]
struct Breaker {
    failures: u32,
    open_until_ms: i64,
}

#[derive(Debug, Default)]
struct Ids {
    next: u64,
    reserved: u64,
}

struct Inner {
    app: App,
    // INVARIANT: every change of the runtime's records runs under this
    // lock, so a check (is it completed? is this key used?) and the write
    // that follows it see the same records.
    lock: tokio::sync::Mutex<Ids>,
    // Deliverable actions and their leases: an index of the outbox,
    // rebuilt at start.
    ready: Mutex<ReadyIndex>,
    changed: tokio::sync::watch::Sender<u64>,
    // Set when the server stops: outbox streams end, so that a graceful
    // shutdown does not wait for connectors to hang up.
    closing: tokio::sync::watch::Sender<bool>,
    breakers: Mutex<HashMap<(String, String), Breaker>>,
    manifests: Mutex<HashMap<Vec<u8>, Arc<Manifest>>>,
    // Inbox records and timers the loop could not run (damaged): reported
    // once and not run again by this process.
    skip: Mutex<HashSet<Vec<u8>>>,
}

/// The runtime (cheap to clone).
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Runtime")
    }
}

/// A signal to send.
#[derive(Debug, Clone, Default)]
pub struct SignalRequest {
    /// Its name.
    pub name: String,
    /// The customer.
    pub customer_id: String,
    /// Only this contract ("" for every one triggered).
    pub contract: String,
    /// The idempotency key ("" for none).
    pub idempotency_key: String,
    /// Its attributes.
    pub attrs: BTreeMap<String, Scalar>,
}

/// What a trigger is about.
struct About {
    tenant: String,
    customer: Option<String>,
    cref: String,
    subject: Digest,
}

/// Ledger entries and record writes of one step, applied together.
#[derive(Default)]
struct Batch {
    bodies: Vec<Body>,
    instances: Vec<(String, u64, InstanceRec, Option<usize>)>,
    actions: Vec<(Place, ActionRec, Option<usize>, Option<usize>)>,
    raw: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    now_ready: Vec<Place>,
    not_ready: Vec<Place>,
}

impl Batch {
    fn entry(&mut self, b: Body) -> usize {
        self.bodies.push(b);
        self.bodies.len() - 1
    }
}

/// What `read_for` gives: the values the contract sees, the customer's
/// policy attributes and the read's lineage (when it read anything).
type Read = (BTreeMap<String, Scalar>, CustomerAttrs, Option<ReadLog>);

/// What a contract read, for its lineage: (field, version, disclosure)
/// and the determining policies.
#[derive(Default)]
struct ReadLog {
    used: Vec<(String, u64, LedgerDisclosure)>,
    policies: Vec<String>,
}

/// What every entry of one instance's evaluation shares.
struct StepCx<'a> {
    about: &'a About,
    m: &'a Manifest,
    pin: Digest,
    id: u64,
    actor: &'a str,
}

impl StepCx<'_> {
    fn body(
        &self,
        step: ContractStep,
        action: &str,
        input: Digest,
        fuel: u64,
        detail: String,
    ) -> Body {
        Body::ContractEvent(ContractEvent {
            tenant: self.about.tenant.clone(),
            subject: self.about.subject,
            contract: self.m.id.clone(),
            version: self.m.version,
            contract_sha256: self.pin,
            instance: self.id,
            step,
            action: action.to_owned(),
            actor: self.actor.to_owned(),
            input_sha256: input,
            fuel_used: fuel,
            detail,
            lineage: Digest::default(),
        })
    }
}

/// A stored contract in force, with its checked manifest.
struct InForce {
    stored: StoredContract,
    manifest: Arc<Manifest>,
}

impl Runtime {
    /// The runtime over the application layer; [`Runtime::start`] loads
    /// its state.
    pub fn new(app: App) -> Self {
        let (changed, _) = tokio::sync::watch::channel(0);
        let (closing, _) = tokio::sync::watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                app,
                lock: tokio::sync::Mutex::new(Ids::default()),
                ready: Mutex::new(ReadyIndex::default()),
                changed,
                closing,
                breakers: Mutex::new(HashMap::new()),
                manifests: Mutex::new(HashMap::new()),
                skip: Mutex::new(HashSet::new()),
            }),
        }
    }

    fn app(&self) -> &App {
        &self.inner.app
    }

    /// Ends every outbox stream (the server is stopping).
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Loads the outbox at start: reconciles open actions with the ledger
    /// (a completion or cancellation the ledger holds is applied), rebuilds
    /// the ready index and what each tenant listens to. Returns the open
    /// actions.
    pub fn start(&self) -> Result<usize> {
        let engine = &self.app().engine;
        let ledger = &self.app().ledger;
        let mut open = 0;
        let mut fixes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut ready = Vec::new();
        self.check_instances()?;
        for (k, v) in engine.rt_scan(b"a")? {
            let place = rt::split_action_key(&k)?;
            let mut a: ActionRec = decode(&action_name(&place), &v)?;
            if !a.is_open() {
                check_action(ledger, &place, &a)?;
                continue;
            }
            // The ledger is the truth: a step it holds that the outbox
            // lacks (the process died between them) is applied now.
            if let Some((step, index, actor)) = ledger_step(ledger, &place, &a)? {
                tracing::warn!(
                    instance = place.1,
                    action = %place.2,
                    entry = index,
                    "the ledger recorded a step of this action that the outbox did not (a crash between them): applied"
                );
                match step {
                    ContractStep::ActionCompleted => {
                        a.state = "completed".into();
                        a.completed_by = actor;
                        a.last_entry = index;
                    }
                    _ => {
                        a.state = "cancelled".into();
                        a.last_entry = index;
                    }
                }
                fixes.push((k.to_vec(), Some(encode(&a)?)));
                fixes.push((
                    customer_action_key(&place.0, &subject_bytes(&a.subject)?, place.1, &place.2),
                    None,
                ));
                // Its timers, if any are left, find it closed and do
                // nothing.
                continue;
            }
            check_action(ledger, &place, &a)?;
            open += 1;
            if a.state != "waiting" {
                ready.push((place, a.kind.clone(), a.contract.clone()));
            }
        }
        if !fixes.is_empty() {
            engine.rt_write(&fixes)?;
        }
        {
            let mut r = self.ready_lock();
            for (p, kind, contract) in ready {
                r.insert(p, Meta { kind, contract });
            }
        }
        let mut tenants = HashSet::new();
        for c in engine.all_contracts()? {
            tenants.insert(c.tenant);
        }
        for t in tenants {
            self.refresh_listening(&t)?;
        }
        Ok(open)
    }

    /// Every instance record against the ledger: its evaluation entry is
    /// its evaluation, and the actions it planned are in the outbox.
    fn check_instances(&self) -> Result<()> {
        let engine = &self.app().engine;
        let ledger = &self.app().ledger;
        for (k, v) in engine.rt_scan(b"i")? {
            let (tenant, id) = rt::split_instance_key(&k)?;
            let name = format!("contract instance {id} of tenant `{tenant}`");
            let inst: InstanceRec = decode(&name, &v)?;
            let ok = match ledger_event(ledger, inst.evaluated_entry)? {
                Some(ev) => {
                    ev.tenant == tenant
                        && ev.instance == id
                        && ev.contract == inst.contract
                        && ev.contract_sha256.to_hex() == inst.sha256
                        && matches!(ev.step, ContractStep::Evaluated | ContractStep::Failed)
                }
                None => false,
            };
            if !ok {
                return Err(VaultError::integrity(format!(
                    "{name}: the vault's `contract_runtime` tree names ledger entry {} as its evaluation, but that entry is not (the record was altered, or the ledger replaced)",
                    inst.evaluated_entry
                )));
            }
            for a in &inst.actions {
                if engine.rt_get(&action_key(&tenant, id, a))?.is_none() {
                    return Err(VaultError::integrity(format!(
                        "{name}: its action `{a}` is missing from the vault's `contract_runtime` tree (deleted, or the outbox restored from an older copy)"
                    )));
                }
            }
        }
        Ok(())
    }

    fn ready_lock(&self) -> std::sync::MutexGuard<'_, ReadyIndex> {
        self.inner
            .ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets which vault events `tenant`'s enabled contracts listen to.
    pub fn refresh_listening(&self, tenant: &str) -> Result<()> {
        let mut kinds = HashSet::new();
        for c in self.in_force(tenant)? {
            for (k, _) in &c.manifest.triggers {
                if *k != Trigger::Signal {
                    kinds.insert(k.as_str().to_owned());
                }
            }
        }
        // Cancellation on erasure and withdrawal needs the events even
        // when no contract is triggered by them.
        kinds.insert(Trigger::CustomerErased.as_str().to_owned());
        kinds.insert(Trigger::ConsentWithdrawn.as_str().to_owned());
        self.app()
            .engine
            .contract_hooks()
            .set_listening(tenant, kinds);
        Ok(())
    }

    /// The tenant's contracts in force: the latest version of each enabled
    /// id.
    fn in_force(&self, tenant: &str) -> Result<Vec<InForce>> {
        let all = self.app().engine.contracts(tenant, None)?;
        let mut latest: BTreeMap<String, StoredContract> = BTreeMap::new();
        for c in all {
            latest.insert(c.id.clone(), c);
        }
        let mut out = Vec::new();
        for (_, c) in latest {
            if c.record.disabled_entry != 0 {
                continue;
            }
            let manifest = self.manifest(&c)?;
            out.push(InForce {
                stored: c,
                manifest,
            });
        }
        Ok(out)
    }

    /// A stored contract's manifest, checked once per pin.
    fn manifest(&self, c: &StoredContract) -> Result<Arc<Manifest>> {
        let mut cache = self
            .inner
            .manifests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = cache.get(&c.record.sha256) {
            return Ok(m.clone());
        }
        let wasm = (!c.record.wasm.is_empty()).then_some(c.record.wasm.as_slice());
        let m = Manifest::parse(
            &c.record.file_name,
            &c.record.manifest,
            wasm,
            &sovra_contracts::AnyField,
        )
        .map_err(|e| {
            VaultError::integrity(format!(
                "contract `{}` v{}: its pinned manifest no longer checks ({e})",
                c.id, c.version
            ))
        })?;
        let m = Arc::new(m);
        cache.insert(c.record.sha256.clone(), m.clone());
        Ok(m)
    }

    // ----- signals -----

    /// Sends a signal (see the proto's `Signal`).
    pub async fn signal(&self, p: &Principal, s: SignalRequest) -> Result<pb::SignalResponse> {
        self.app().authorize(p, PolicyAction::SignalContracts)?;
        check_signal(&s)?;
        let request = signal_digest(&s);
        let mut ids = self.inner.lock.lock().await;
        if !s.idempotency_key.is_empty() {
            if let Some(v) = self
                .app()
                .engine
                .rt_get(&signal_key(&p.tenant, &s.idempotency_key))?
            {
                let rec: SignalRec = decode("a signal's idempotency record", &v)?;
                if now_ms().saturating_sub(rec.at_ms) < rt::SIGNAL_KEY_RETENTION_MS {
                    if rec.request != request {
                        return Err(VaultError::already_exists(
                            "idempotency_key",
                            "was used by another signal (another name, customer, contract or attributes) in the last 24 hours; use a new key",
                        ));
                    }
                    drop(ids);
                    let mut instances = Vec::new();
                    for id in rec.instances {
                        instances.push(self.instance(&p.tenant, id)?);
                    }
                    return Ok(pb::SignalResponse {
                        instances,
                        replayed: true,
                    });
                }
            }
        }
        let contracts: Vec<InForce> = self
            .in_force(&p.tenant)?
            .into_iter()
            .filter(|c| s.contract.is_empty() || c.stored.id == s.contract)
            .collect();
        if !s.contract.is_empty() && contracts.is_empty() {
            let shown: String = s.contract.chars().take(64).collect();
            return Err(VaultError::not_found(format!(
                "contract `{shown}` (not registered, or disabled)"
            )));
        }
        let (subject, cref, _) =
            self.app()
                .engine
                .contract_customer(&p.tenant, &s.customer_id, &[0; 32])?;
        let about = About {
            tenant: p.tenant.clone(),
            customer: Some(s.customer_id.clone()),
            cref: hex::encode(cref.0),
            subject,
        };
        let mut batch = Batch::default();
        let mut started = Vec::new();
        let at = now_ms();
        for c in contracts
            .iter()
            .filter(|c| c.manifest.triggered_by(Trigger::Signal, &s.name))
        {
            let id = self.next_id(&mut ids).await?;
            self.run_instance(
                &mut batch,
                id,
                c,
                &about,
                Trigger::Signal,
                &s.name,
                &s.attrs,
                at,
                &p.name,
            )?;
            started.push(id);
        }
        if !s.idempotency_key.is_empty() {
            batch.raw.push((
                signal_key(&p.tenant, &s.idempotency_key),
                Some(encode(&SignalRec {
                    request,
                    instances: started.clone(),
                    at_ms: at,
                })?),
            ));
        }
        self.apply(batch)?;
        drop(ids);
        self.app().commit().await?;
        self.publish();
        let mut instances = Vec::new();
        for id in started {
            instances.push(self.instance(&p.tenant, id)?);
        }
        Ok(pb::SignalResponse {
            instances,
            replayed: false,
        })
    }

    /// The next instance id, reserving a block durably first when needed.
    async fn next_id(&self, ids: &mut Ids) -> Result<u64> {
        if ids.next == 0 {
            let stored = match self.app().engine.rt_get(NEXT_KEY)? {
                Some(v) => <[u8; 8]>::try_from(&v[..])
                    .map(u64::from_be_bytes)
                    .map_err(|_| {
                        VaultError::integrity(
                            "the instance id reservation in the vault's `contract_runtime` tree",
                        )
                    })?,
                None => 1,
            };
            ids.next = stored.max(1);
            ids.reserved = ids.next;
        }
        if ids.next >= ids.reserved {
            let reserved = ids.next + ID_BLOCK;
            self.app()
                .engine
                .rt_write(&[(NEXT_KEY.to_vec(), Some(reserved.to_be_bytes().to_vec()))])?;
            self.app().engine.commit().await?;
            ids.reserved = reserved;
        }
        let id = ids.next;
        ids.next += 1;
        Ok(id)
    }

    // ----- evaluation -----

    /// Evaluates one contract on one event into `batch`.
    #[allow(clippy::too_many_arguments)]
    fn run_instance(
        &self,
        batch: &mut Batch,
        id: u64,
        c: &InForce,
        about: &About,
        kind: Trigger,
        name: &str,
        attrs: &BTreeMap<String, Scalar>,
        at_ms: i64,
        actor: &str,
    ) -> Result<()> {
        let m = &c.manifest;
        let principal = contract_principal(m);
        let mut inst = InstanceRec {
            contract: m.id.clone(),
            version: m.version,
            sha256: hex::encode(&c.stored.record.sha256),
            trigger: format!("{}:{name}", kind.as_str()),
            cref: about.cref.clone(),
            subject: about.subject.to_hex(),
            state: "open".into(),
            failure: String::new(),
            evaluated_entry: 0,
            created_at_ms: at_ms,
            fuel_used: 0,
            actions: Vec::new(),
        };
        let pin = Digest::from_slice("pin", &c.stored.record.sha256)?;
        let cx = StepCx {
            about,
            m,
            pin,
            id,
            actor,
        };
        let step = |s: ContractStep, action: &str, input: Digest, fuel: u64, d: String| {
            cx.body(s, action, input, fuel, d)
        };
        // The customer's fields and policy attributes, as the contract's
        // principal may see them.
        let (fields, customer, read) = match self.read_for(about, m, &principal) {
            Ok(v) => v,
            Err(why) => {
                return self.failed(batch, &cx, inst, why, Digest::default(), 0, None);
            }
        };
        let event = Event {
            kind,
            name: name.to_owned(),
            at_ms,
            attrs: attrs.clone(),
            fields,
        };
        let evaluated = sovra_contracts::evaluate(m, &event, at_ms);
        let input = self.keyed_input(about, &event, m);
        // The values read are plaintext: wiped here, as soon as they were
        // evaluated (the `cel` crate's own copies are not reachable).
        let mut event = event;
        wipe(&mut event.fields);
        let input = input?;
        let e: Evaluation = match evaluated {
            Ok(e) => e,
            Err(err) => {
                let fuel = match &err {
                    sovra_contracts::ContractError::Guest(g) => g.fuel_used(),
                    _ => 0,
                };
                return self.failed(batch, &cx, inst, err.to_string(), input, fuel, read);
            }
        };
        inst.fuel_used = e.fuel_used;
        let body = step(
            ContractStep::Evaluated,
            "",
            input,
            e.fuel_used,
            detail(&[
                ("trigger", inst.trigger.clone().into()),
                (
                    "condition",
                    serde_json::to_value(e.condition).unwrap_or_default(),
                ),
                ("actions", e.actions.len().into()),
            ]),
        );
        let pos = self.evaluation_entry(batch, about, m, read, body, &mut inst)?;
        if e.condition == Some(false) || e.actions.is_empty() {
            inst.state = if e.condition == Some(false) {
                "not_met"
            } else {
                "done"
            }
            .into();
            batch.instances.push((about.tenant.clone(), id, inst, pos));
            return Ok(());
        }
        let active = self.app().policies.current();
        let mut open = 0;
        for planned in &e.actions {
            inst.actions.push(planned.id.clone());
            let decision = decide(
                &active.policies,
                self.app().engine.schema(),
                &principal,
                &about.tenant,
                m,
                planned,
                &customer,
            );
            if self.queue(batch, &cx, planned, decision, input, &inst.sha256, at_ms)? {
                open += 1;
            }
        }
        if open == 0 {
            inst.state = "done".into();
        }
        batch.instances.push((about.tenant.clone(), id, inst, pos));
        Ok(())
    }

    /// Records a failed evaluation: the instance is `failed` with the
    /// reason (which never quotes a value), and a `failed` entry says why
    /// (the anchor of the read's lineage when fields were read).
    #[allow(clippy::too_many_arguments)]
    fn failed(
        &self,
        batch: &mut Batch,
        cx: &StepCx<'_>,
        mut inst: InstanceRec,
        why: String,
        input: Digest,
        fuel: u64,
        read: Option<ReadLog>,
    ) -> Result<()> {
        inst.state = "failed".into();
        inst.failure = why.clone();
        inst.fuel_used = fuel;
        let body = cx.body(
            ContractStep::Failed,
            "",
            input,
            fuel,
            detail(&[
                ("trigger", inst.trigger.clone().into()),
                ("reason", why.into()),
            ]),
        );
        let pos = self.evaluation_entry(batch, cx.about, cx.m, read, body, &mut inst)?;
        batch
            .instances
            .push((cx.about.tenant.clone(), cx.id, inst, pos));
        Ok(())
    }

    /// Takes a `write_field` action (see `write_field`): completed, or
    /// failed with the reason; returns the step to record and its detail.
    fn take_write(
        &self,
        cx: &StepCx<'_>,
        planned: &Planned,
        policies: &[String],
        a: &mut ActionRec,
        at_ms: i64,
    ) -> (ContractStep, String) {
        let field = planned.detail["field"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match self.write_field(cx.about, cx.m, policies, &field, &planned.detail["value"]) {
            Ok(entry) => {
                a.state = "completed".into();
                a.completed_by = cx.actor.to_owned();
                a.completed_at_ms = at_ms;
                (
                    ContractStep::ActionCompleted,
                    detail(&[("by", cx.actor.into()), ("write_entry", entry.into())]),
                )
            }
            Err(why) => {
                a.state = "failed".into();
                a.failures = 1;
                (
                    ContractStep::ActionFailed,
                    detail(&[
                        ("reason", why.into()),
                        ("attempt", 1.into()),
                        ("gave_up", true.into()),
                    ]),
                )
            }
        }
    }

    /// Writes a contract's derived value to the customer's record (sealed
    /// like every value, with its lineage: the contract as the agent, its
    /// purpose and the policies that allowed it) and returns the write's
    /// ledger entry. The write does not trigger `field_written` contracts
    /// (no contract loops). The error never quotes the value.
    fn write_field(
        &self,
        about: &About,
        m: &Manifest,
        policies: &[String],
        field: &str,
        value: &serde_json::Value,
    ) -> std::result::Result<u64, String> {
        use crate::schema::RawValue;
        let customer = about
            .customer
            .as_ref()
            .ok_or("there is no customer to write to")?;
        let engine = &self.app().engine;
        let schema = engine.schema();
        let def = schema.field(field).map_err(|e| e.to_string())?;
        let raw = match (value, def.ty) {
            (serde_json::Value::String(t), FieldType::String) => RawValue::Text(t.clone()),
            (serde_json::Value::Number(n), FieldType::Integer) => {
                RawValue::Integer(n.as_i64().ok_or("the value is not a 64-bit integer")?)
            }
            (serde_json::Value::Number(n), FieldType::Timestamp) => {
                RawValue::Timestamp(n.as_i64().ok_or("the value is not a 64-bit integer")?)
            }
            _ => {
                return Err(format!(
                    "the value computed for field `{field}` is not of its type"
                ))
            }
        };
        let v = schema.normalise(def, raw).map_err(|_| {
            format!(
                "the value computed for field `{field}` is not valid for it (its format or bounds)"
            )
        })?;
        let agent =
            crate::lineage::Agent::of(&m.id, "contract", m.purpose.clone(), policies.to_vec());
        let source = crate::schema::Source {
            channel: "contract".into(),
            collector: m.id.clone(),
            consent_ref: String::new(),
        };
        let ledger = &self.app().ledger;
        let (tenant, actor) = (about.tenant.clone(), m.id.clone());
        let written = std::cell::Cell::new(0u64);
        engine
            .put(
                &about.tenant,
                customer,
                &[(def, v)],
                &source,
                crate::engine::WriteLineage {
                    agent: &agent,
                    transformed: &[],
                    anchor: Box::new(|subject, hash, fields| {
                        let i = crate::lineage::appended_index(ledger.append(&[
                            Body::FieldsWritten(sovra_ledger::entry::Write {
                                tenant,
                                subject: *subject,
                                actor,
                                channel: "contract".into(),
                                fields,
                                lineage: *hash,
                            }),
                        ])?)?;
                        written.set(i);
                        Ok(i)
                    }),
                },
                None,
            )
            .map_err(|e| format!("the write failed: {e}"))?;
        Ok(written.get())
    }

    /// The evaluation's entry: appended with the batch, or, when the
    /// contract read the customer's fields, appended now as the anchor of
    /// the read's lineage activity (the customer's lineage shows the
    /// contract's read, and the entry carries its hash). Returns the
    /// entry's position in the batch (None when it was appended now; the
    /// instance then holds its index).
    fn evaluation_entry(
        &self,
        batch: &mut Batch,
        about: &About,
        m: &Manifest,
        read: Option<ReadLog>,
        body: Body,
        inst: &mut InstanceRec,
    ) -> Result<Option<usize>> {
        let (Some(read), Some(customer)) = (read, &about.customer) else {
            return Ok(Some(batch.entry(body)));
        };
        let mut activity =
            crate::lineage::Agent::of(&m.id, "contract", m.purpose.clone(), read.policies)
                .activity(
                    sovra_proto::lineage::v1::ActivityKind::Reveal,
                    &about.tenant,
                );
        activity.used = read
            .used
            .iter()
            .map(|(f, v, d)| crate::lineage::read_usage(f, *v, *d))
            .collect();
        let ledger = &self.app().ledger;
        let index =
            self.app()
                .engine
                .record_access(&about.tenant, customer, activity, |_, hash| {
                    let mut body = body;
                    if let Body::ContractEvent(ev) = &mut body {
                        ev.lineage = *hash;
                    }
                    crate::lineage::appended_index(ledger.append(&[body])?)
                })?;
        inst.evaluated_entry = index;
        Ok(None)
    }

    /// Queues (or records the denial of) one planned action; returns
    /// whether it waits for a connector.
    #[allow(clippy::too_many_arguments)]
    fn queue(
        &self,
        batch: &mut Batch,
        cx: &StepCx<'_>,
        planned: &Planned,
        decision: (bool, Vec<String>),
        input: Digest,
        sha256: &str,
        at_ms: i64,
    ) -> Result<bool> {
        let (about, m, id, actor) = (cx.about, cx.m, cx.id, cx.actor);
        let step = |s: ContractStep, action: &str, input: Digest, fuel: u64, d: String| {
            cx.body(s, action, input, fuel, d)
        };
        let place = (about.tenant.clone(), id, planned.id.clone());
        let mut a = ActionRec {
            contract: m.id.clone(),
            version: m.version,
            sha256: sha256.to_owned(),
            purpose: m.purpose.clone(),
            kind: planned.kind.to_owned(),
            // A derived value is never kept in the outbox or sent.
            detail: match planned.kind {
                "write_field" => serde_json::json!({ "field": planned.detail["field"] }),
                _ => planned.detail.clone(),
            },
            cref: about.cref.clone(),
            subject: about.subject.to_hex(),
            due_ms: planned.due_ms.unwrap_or(0),
            escalate_to: planned.escalate_to.clone().unwrap_or_default(),
            state: "ready".into(),
            failures: 0,
            max_attempts: m.retry.max_attempts.max(1),
            backoff_ms: m.retry.backoff_ms,
            policies: decision.1.clone(),
            queued_entry: 0,
            delivered_to: String::new(),
            completed_by: String::new(),
            completed_at_ms: 0,
            last_entry: 0,
        };
        if !decision.0 {
            a.state = "denied".into();
            let qp = batch.entry(step(
                ContractStep::ActionDenied,
                &planned.id,
                input,
                0,
                detail(&[
                    ("kind", planned.kind.into()),
                    ("policies", decision.1.join(",").into()),
                ]),
            ));
            batch.actions.push((place, a, Some(qp), None));
            return Ok(false);
        }
        let qp = batch.entry(step(
            ContractStep::ActionQueued,
            &planned.id,
            input,
            0,
            queued_detail(&a),
        ));
        if planned.kind == "write_field" {
            // The vault takes it itself: the value (derived from what the
            // contract read) is written to the customer's record, sealed,
            // with lineage, and never stored in the outbox or sent.
            let (st, d) = self.take_write(cx, planned, &decision.1, &mut a, at_ms);
            let lp = batch.entry(step(st, &planned.id, input, 0, d));
            batch.actions.push((place, a, Some(qp), Some(lp)));
            return Ok(false);
        }
        if planned.kind == "cancel_actions" {
            // The runtime takes it itself: the customer's open actions
            // of that purpose are cancelled, then it is completed.
            let purpose = planned.detail["purpose"].as_str().unwrap_or_default();
            self.cancel_open(batch, about, Some(purpose), actor, id)?;
            a.state = "completed".into();
            a.completed_by = actor.to_owned();
            a.completed_at_ms = at_ms;
            let cp = batch.entry(step(
                ContractStep::ActionCompleted,
                &planned.id,
                input,
                0,
                detail(&[("by", "sovra".into())]),
            ));
            batch.actions.push((place, a, Some(qp), Some(cp)));
            return Ok(false);
        }
        if a.due_ms > 0 {
            batch.raw.push((
                rt::timer_key(a.due_ms, &about.tenant, id, &planned.id),
                Some(vec![TIMER_DEADLINE]),
            ));
        }
        batch.raw.push((
            customer_action_key(&about.tenant, &about.subject.0, id, &planned.id),
            Some(Vec::new()),
        ));
        batch.now_ready.push(place.clone());
        batch.actions.push((place, a, Some(qp), None));
        Ok(true)
    }

    /// The fields `m` reads, the customer's policy attributes and what was
    /// read (for its lineage); `Err` with the reason when policy denies a
    /// read.
    fn read_for(
        &self,
        about: &About,
        m: &Manifest,
        principal: &sovra_policy::Principal,
    ) -> std::result::Result<Read, String> {
        let engine = &self.app().engine;
        let Some(customer) = &about.customer else {
            return Ok((BTreeMap::new(), CustomerAttrs::default(), None));
        };
        let schema = engine.schema();
        let mut defs = policy::attribute_fields(schema);
        for r in &m.reads {
            if let Ok(d) = schema.field(r) {
                if !defs.iter().any(|x| x.name == d.name) {
                    defs.push(d);
                }
            }
        }
        let (_, values) = engine
            .get(&about.tenant, customer, &defs)
            .map_err(|e| format!("reading the customer's fields failed: {e}"))?;
        let consent = self
            .app()
            .ledger
            .consent_state(&about.subject)
            .map_err(|e| format!("reading the consent state failed: {e}"))?;
        let attrs = policy::customer_attrs(&values, consent);
        if m.reads.is_empty() {
            return Ok((BTreeMap::new(), attrs, None));
        }
        let read_defs: Vec<_> = defs.iter().filter(|d| m.reads.contains(&d.name)).collect();
        let fattrs: Vec<&sovra_policy::FieldAttrs> = read_defs.iter().map(|d| &d.policy).collect();
        let active = self.app().policies.current();
        let decided = active
            .policies
            .scope(principal, &about.tenant, &attrs, &fattrs)
            .and_then(|scope| {
                active
                    .policies
                    .read_fields(&scope, &fattrs, &policy::context(&m.purpose, 0))
            })
            .map_err(|e| format!("the read decision failed: {e}"))?;
        let mut out = BTreeMap::new();
        let mut log = ReadLog::default();
        for d in decided {
            let Some(def) = read_defs.iter().find(|x| x.name == d.field) else {
                continue;
            };
            let value = values.iter().find(|v| v.def.name == d.field);
            match d.disclosure {
                Disclosure::Denied => {
                    return Err(format!(
                        "policy denies the contract reading field `{}` for purpose `{}` ({})",
                        d.field,
                        m.purpose,
                        d.determining().join(", ")
                    ))
                }
                Disclosure::Plaintext => {
                    if let Some(v) = value {
                        out.insert(d.field.clone(), scalar(&v.value));
                        log.used.push((d.field.clone(), v.version, LedgerDisclosure::Plaintext));
                    }
                    log.policies.extend(d.determining());
                }
                Disclosure::Masked => match (value, def.ty) {
                    (Some(v), FieldType::String) => {
                        out.insert(d.field.clone(), Scalar::Str(def.mask.apply(&v.value)));
                        log.used.push((d.field.clone(), v.version, LedgerDisclosure::Masked));
                        log.policies.extend(d.determining());
                    }
                    (None, _) => {}
                    _ => {
                        return Err(format!(
                            "policy discloses field `{}` to the contract only masked for purpose `{}` ({}), and a mask is not a number",
                            d.field,
                            m.purpose,
                            d.determining().join(", ")
                        ))
                    }
                },
            }
        }
        Ok((out, attrs, (!log.used.is_empty()).then_some(log)))
    }

    /// The evaluation input's digest keyed under the customer's data key
    /// (zero when there is no customer or it is erased).
    fn keyed_input(&self, about: &About, event: &Event, m: &Manifest) -> Result<Digest> {
        let Some(customer) = &about.customer else {
            return Ok(Digest::default());
        };
        let mut seen = Event {
            kind: event.kind,
            name: event.name.clone(),
            at_ms: event.at_ms,
            attrs: event.attrs.clone(),
            fields: event
                .fields
                .iter()
                .filter(|(k, _)| m.reads.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let digest = seen.digest();
        wipe(&mut seen.fields);
        let (_, _, keyed) =
            self.app()
                .engine
                .contract_customer(&about.tenant, customer, &digest)?;
        Ok(Digest(keyed))
    }

    /// Cancels the customer's open actions (of contracts acting for
    /// `purpose` when given) into `batch`.
    fn cancel_open(
        &self,
        batch: &mut Batch,
        about: &About,
        purpose: Option<&str>,
        actor: &str,
        by_instance: u64,
    ) -> Result<usize> {
        let engine = &self.app().engine;
        let mut n = 0;
        let mut touched: Vec<Place> = Vec::new();
        for (k, _) in engine.rt_scan(&customer_actions_prefix(&about.tenant, &about.subject.0))? {
            let place = rt::split_customer_action_key(&k, &about.tenant)?;
            let Some(v) = engine.rt_get(&action_key(&place.0, place.1, &place.2))? else {
                batch.raw.push((k.to_vec(), None));
                continue;
            };
            let mut a: ActionRec = decode("an outbox action", &v)?;
            if !a.is_open() || purpose.is_some_and(|p| p != a.purpose) {
                continue;
            }
            if batch.actions.iter().any(|(p, ..)| *p == place) {
                continue;
            }
            a.state = "cancelled".into();
            let pos = batch.entry(Body::ContractEvent(ContractEvent {
                tenant: about.tenant.clone(),
                subject: about.subject,
                contract: a.contract.clone(),
                version: a.version,
                contract_sha256: Digest::from_hex(&a.sha256)?,
                instance: place.1,
                step: ContractStep::Cancelled,
                action: place.2.clone(),
                actor: actor.to_owned(),
                input_sha256: Digest::default(),
                fuel_used: 0,
                detail: detail(&[
                    (
                        "why",
                        match purpose {
                            Some(p) => format!("consent for `{p}` withdrawn"),
                            None => "customer erased".to_owned(),
                        }
                        .into(),
                    ),
                    ("by_instance", by_instance.into()),
                ]),
                lineage: Digest::default(),
            }));
            batch.raw.push((k.to_vec(), None));
            if a.due_ms > 0 {
                batch
                    .raw
                    .push((rt::timer_key(a.due_ms, &place.0, place.1, &place.2), None));
            }
            batch.not_ready.push(place.clone());
            batch.actions.push((place.clone(), a, None, Some(pos)));
            touched.push(place);
            n += 1;
        }
        for place in touched {
            self.close_instance_if_done(batch, &place)?;
        }
        Ok(n)
    }

    /// Appends the batch's entries, then writes its records (one logged
    /// write). Not durable until `App::commit`.
    fn apply(&self, mut batch: Batch) -> Result<()> {
        let idx: Vec<u64> = if batch.bodies.is_empty() {
            Vec::new()
        } else {
            self.app()
                .ledger
                .append(&batch.bodies)?
                .into_iter()
                .map(|a| a.index)
                .collect()
        };
        let at = |p: Option<usize>| p.and_then(|p| idx.get(p).copied());
        let mut writes = std::mem::take(&mut batch.raw);
        let info: HashMap<Place, (String, String)> = batch
            .actions
            .iter()
            .map(|(p, a, ..)| (p.clone(), (a.kind.clone(), a.contract.clone())))
            .collect();
        for (tenant, id, mut inst, pos) in batch.instances {
            if let Some(i) = at(pos) {
                inst.evaluated_entry = i;
            }
            writes.push((instance_key(&tenant, id), Some(encode(&inst)?)));
        }
        for ((t, i, a), mut rec, queued, last) in batch.actions {
            if let Some(q) = at(queued) {
                rec.queued_entry = q;
            }
            if let Some(l) = at(last) {
                rec.last_entry = l;
            }
            writes.push((action_key(&t, i, &a), Some(encode(&rec)?)));
        }
        self.app().engine.rt_write(&writes)?;
        let mut r = self.ready_lock();
        for p in batch.not_ready {
            r.remove(&p);
        }
        for p in batch.now_ready {
            if let Some((kind, contract)) = info.get(&p).cloned() {
                r.insert(p, Meta { kind, contract });
            }
        }
        Ok(())
    }

    fn publish(&self) {
        self.inner.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    // ----- the loop: inbox and timers -----

    /// Runs the inbox and the timers in a task of its own until every
    /// other handle on the runtime is dropped (the server stopped): the
    /// task holds it only while a pass runs.
    pub fn spawn(&self) {
        let weak = Arc::downgrade(&self.inner);
        let wake = self.app().engine.contract_hooks().wake.clone();
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let rt = Runtime { inner };
                let wait = match rt.pass().await {
                    Ok(true) => std::time::Duration::ZERO,
                    Ok(false) => rt.until_next_timer(),
                    Err(e) => {
                        tracing::error!(error = %e, "contract runtime pass failed; retrying in 1 s");
                        std::time::Duration::from_secs(1)
                    }
                };
                drop(rt);
                if !wait.is_zero() {
                    let _ = tokio::time::timeout(wait, wake.notified()).await;
                }
            }
        });
    }

    fn until_next_timer(&self) -> std::time::Duration {
        let now = now_ms();
        let next = self
            .app()
            .engine
            .next_timer()
            .ok()
            .flatten()
            .unwrap_or(now + 1000);
        let ms = (next - now).clamp(1, 1000);
        std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(1000))
    }

    /// One pass: inbox records, then due timers. Returns whether it found
    /// work (so the loop goes on at once).
    pub async fn pass(&self) -> Result<bool> {
        let inbox = self.app().engine.rt_scan_limit(b"q", INBOX_BATCH + 64)?;
        let timers = self.app().engine.due_timers(now_ms(), TIMER_BATCH + 64)?;
        let skip = self.skipped();
        let inbox: Vec<_> = inbox
            .into_iter()
            .filter(|(k, _)| !skip.contains(k.as_ref()))
            .take(INBOX_BATCH)
            .collect();
        let timers: Vec<_> = timers
            .into_iter()
            .filter(|t| !skip.contains(&t.key))
            .take(TIMER_BATCH)
            .collect();
        if inbox.is_empty() && timers.is_empty() {
            return Ok(false);
        }
        let mut ids = self.inner.lock.lock().await;
        // Each record and timer in a batch of its own, applied when it
        // succeeds (so the next sees what it changed), all made durable by
        // one commit: a damaged one is reported and skipped, never a
        // reason to stop the others.
        for (k, v) in &inbox {
            let mut one = Batch::default();
            let done = match decode::<InboxRec>("an inbox record", v) {
                Ok(rec) => self.vault_event(&mut one, &mut ids, &rec).await,
                Err(e) => Err(e),
            };
            match done {
                Ok(()) => {
                    one.raw.push((k.to_vec(), None));
                    self.apply(one)?;
                }
                Err(e) => self.skip(k, "an inbox record", &e),
            }
        }
        for t in &timers {
            let mut one = Batch::default();
            match self.fire(&mut one, t) {
                Ok(()) => self.apply(one)?,
                Err(e) => self.skip(&t.key, "a timer", &e),
            }
        }
        drop(ids);
        self.app().commit().await?;
        self.publish();
        Ok(true)
    }

    fn skipped(&self) -> HashSet<Vec<u8>> {
        self.inner
            .skip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reports a record the loop cannot run and leaves it in place (it is
    /// not run again by this process).
    fn skip(&self, key: &[u8], what: &str, e: &VaultError) {
        tracing::error!(
            key = %hex::encode(key),
            error = %e,
            "the contract runtime cannot run {what} in the vault's `contract_runtime` tree; skipped (left in place)"
        );
        self.inner
            .skip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.to_vec());
    }

    /// Runs the tenant's contracts on a vault event, after cancelling what
    /// it cancels.
    async fn vault_event(&self, batch: &mut Batch, ids: &mut Ids, rec: &InboxRec) -> Result<()> {
        let Some(kind) = Trigger::parse(&rec.trigger) else {
            return Ok(());
        };
        let engine = &self.app().engine;
        let customer = if kind == Trigger::CustomerErased {
            None
        } else {
            match engine.contract_customer_id(&rec.tenant, &rec.cref) {
                Ok(c) => Some(c),
                Err(VaultError::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        };
        let about = About {
            tenant: rec.tenant.clone(),
            customer,
            cref: rec.cref.clone(),
            subject: Digest::from_hex(&rec.subject)?,
        };
        match kind {
            Trigger::CustomerErased => {
                // Only an erasure the vault holds cancels (the record is
                // written before the erasure).
                if engine.contract_customer_id(&rec.tenant, &rec.cref).is_ok() {
                    return Ok(());
                }
                self.cancel_open(batch, &about, None, "sovra", 0)?;
            }
            Trigger::ConsentWithdrawn => {
                let withdrawn = self
                    .app()
                    .ledger
                    .consent_state(&about.subject)?
                    .into_iter()
                    .any(|s| {
                        s.purpose == rec.name && s.action == sovra_ledger::ConsentAction::Withdraw
                    });
                if !withdrawn {
                    return Ok(());
                }
                self.cancel_open(batch, &about, Some(&rec.name), "sovra", 0)?;
            }
            _ => {}
        }
        let contracts = self.in_force(&rec.tenant)?;
        for c in contracts
            .iter()
            .filter(|c| c.manifest.triggered_by(kind, &rec.name))
        {
            let id = self.next_id(ids).await?;
            self.run_instance(
                batch,
                id,
                c,
                &about,
                kind,
                &rec.name,
                &BTreeMap::new(),
                rec.at_ms,
                "sovra",
            )?;
        }
        Ok(())
    }

    /// Fires one due timer into `batch`.
    fn fire(&self, batch: &mut Batch, t: &rt::Timer) -> Result<()> {
        batch.raw.push((t.key.clone(), None));
        let place = (t.tenant.clone(), t.instance, t.action.clone());
        let Some(v) = self
            .app()
            .engine
            .rt_get(&action_key(&t.tenant, t.instance, &t.action))?
        else {
            return Ok(());
        };
        let mut a: ActionRec = decode("an outbox action", &v)?;
        let subject = Digest::from_hex(&a.subject)?;
        let pin = Digest::from_hex(&a.sha256)?;
        let entry = |step: ContractStep, action: &str, d: String| {
            Body::ContractEvent(ContractEvent {
                tenant: t.tenant.clone(),
                subject,
                contract: a.contract.clone(),
                version: a.version,
                contract_sha256: pin,
                instance: t.instance,
                step,
                action: action.to_owned(),
                actor: "sovra".into(),
                input_sha256: Digest::default(),
                fuel_used: 0,
                detail: d,
                lineage: Digest::default(),
            })
        };
        if t.kind == TIMER_RETRY {
            if a.state != "waiting" {
                return Ok(());
            }
            a.state = "ready".into();
            let pos = batch.entry(entry(
                ContractStep::ActionRetried,
                &t.action,
                detail(&[("attempt", (a.failures + 1).into())]),
            ));
            batch.now_ready.push(place.clone());
            batch.actions.push((place, a, None, Some(pos)));
            return Ok(());
        }
        // A deadline: an obligation not completed in time is escalated.
        if !matches!(a.state.as_str(), "ready" | "waiting") {
            return Ok(());
        }
        let target = if a.escalate_to.is_empty() {
            format!("department:{}", self.department_of(&t.tenant, &a.contract))
        } else {
            a.escalate_to.clone()
        };
        a.state = "escalated".into();
        let pos = batch.entry(entry(
            ContractStep::Escalated,
            &t.action,
            detail(&[("to", target.clone().into()), ("due_ms", a.due_ms.into())]),
        ));
        // The escalation is itself an action for a connector: tell the
        // target.
        let esc_id = format!("escalate.{}", t.action);
        let esc = follow_up(
            &a,
            "notify",
            serde_json::json!({
                "to": target,
                "template": "obligation_missed",
                "obligation": t.action,
                "due_ms": a.due_ms,
            }),
        );
        let qp = batch.entry(entry(
            ContractStep::ActionQueued,
            &esc_id,
            queued_detail(&esc),
        ));
        let esc_place = (t.tenant.clone(), t.instance, esc_id.clone());
        batch.raw.push((
            customer_action_key(&t.tenant, &subject.0, t.instance, &esc_id),
            Some(Vec::new()),
        ));
        batch.now_ready.push(esc_place.clone());
        batch.actions.push((place, a, None, Some(pos)));
        batch.actions.push((esc_place, esc, Some(qp), None));
        Ok(())
    }

    fn department_of(&self, tenant: &str, contract: &str) -> String {
        self.app()
            .engine
            .contracts(tenant, Some(contract))
            .ok()
            .and_then(|v| v.last().map(|c| c.record.department.clone()))
            .unwrap_or_default()
    }

    // ----- delivery and confirmation -----

    /// The next deliverable actions for a stream of `p`, leased to it.
    pub fn take(
        &self,
        p: &Principal,
        kinds: &[String],
        contract: &str,
        lease_ms: i64,
        max: usize,
    ) -> Result<Vec<pb::ActionDelivery>> {
        let now = now_ms();
        // Filtered on the index, so that actions this stream does not take
        // never crowd out those it does.
        let paused = self.paused_contracts(&p.tenant, now);
        let candidates: Vec<Place> = {
            let mut r = self.ready_lock();
            r.release_expired(now);
            r.candidates(&p.tenant, max * 2, |(_, _, id), m| {
                (kinds.is_empty() || kinds.contains(&m.kind))
                    && (contract.is_empty() || m.contract == contract)
                    && (!paused.contains(&m.contract)
                        || id.starts_with("manual.")
                        || id.starts_with("escalate."))
            })
        };
        let mut out = Vec::new();
        let mut delivered = Vec::new();
        for place in candidates {
            if out.len() >= max {
                break;
            }
            let Some(v) = self
                .app()
                .engine
                .rt_get(&action_key(&place.0, place.1, &place.2))?
            else {
                self.ready_lock().remove(&place);
                continue;
            };
            let mut a: ActionRec = decode("an outbox action", &v)?;
            if !matches!(a.state.as_str(), "ready" | "escalated") {
                continue;
            }
            let until = now + lease_ms;
            {
                if !self.ready_lock().lease(&place, &p.name, until) {
                    continue;
                }
            }
            let customer_id = if a.cref.is_empty() {
                String::new()
            } else {
                self.app()
                    .engine
                    .contract_customer_id(&place.0, &a.cref)
                    .unwrap_or_default()
            };
            if a.delivered_to != p.name {
                a.delivered_to = p.name.clone();
                delivered.push((action_key(&place.0, place.1, &place.2), Some(encode(&a)?)));
            }
            let mut action = action_view(&place, &a);
            action.customer_id = customer_id;
            out.push(pb::ActionDelivery {
                action: Some(action),
                lease_until_ms: until,
            });
        }
        // Who it was sent to is written (not waited for: after a crash it
        // is sent again anyway), so that only that principal completes it.
        if !delivered.is_empty() {
            self.app().engine.rt_write(&delivered)?;
        }
        Ok(out)
    }

    /// The outbox as a stream for a connector (see the proto's
    /// `WatchActions`). The stream's task holds the runtime only while it
    /// takes actions, and ends when the caller goes away.
    pub fn watch(
        &self,
        p: &Principal,
        kinds: Vec<String>,
        contract: String,
        lease_seconds: u32,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<pb::ActionDelivery>>> {
        self.app().authorize(p, PolicyAction::HandleActions)?;
        const KINDS: [&str; 7] = [
            "notify",
            "create_task",
            "request_approvals",
            "cancel_actions",
            "read_fields",
            "write_field",
            "submit_workload",
        ];
        if kinds.len() > KINDS.len() {
            return Err(VaultError::invalid(
                "kinds",
                format!("at most {} kinds", KINDS.len()),
            ));
        }
        if let Some(k) = kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
            return Err(VaultError::invalid(
                "kinds",
                format!("unknown kind `{}`; one of {}", shown(k), KINDS.join(", ")),
            ));
        }
        if contract.len() > 64 {
            return Err(VaultError::invalid("contract", "at most 64 bytes"));
        }
        let lease_ms = match lease_seconds {
            0 => DEFAULT_LEASE_MS,
            s if s > 3600 => {
                return Err(VaultError::invalid("lease_seconds", "at most 3600"));
            }
            s => i64::from(s) * 1000,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        let weak = Arc::downgrade(&self.inner);
        let mut changed = self.inner.changed.subscribe();
        let mut closing = self.inner.closing.subscribe();
        let p = p.clone();
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                // A stream whose caller went away takes nothing.
                if tx.is_closed() {
                    return;
                }
                let rt = Runtime { inner };
                let taken = rt.take(&p, &kinds, &contract, lease_ms, 16);
                drop(rt);
                let full = match taken {
                    Ok(batch) => {
                        let n = batch.len();
                        let mut left = batch.into_iter();
                        while let Some(d) = left.next() {
                            if let Err(e) = tx.send(Ok(d)).await {
                                // What was leased to this stream and not
                                // sent goes back at once, not when its
                                // lease runs out.
                                if let Some(inner) = weak.upgrade() {
                                    let mut r = inner
                                        .ready
                                        .lock()
                                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                                    for d in std::iter::once(e.0).chain(left.map(Ok)) {
                                        if let Ok(pb::ActionDelivery {
                                            action: Some(a), ..
                                        }) = d
                                        {
                                            r.unlease(&(p.tenant.clone(), a.instance, a.action_id));
                                        }
                                    }
                                }
                                return;
                            }
                        }
                        n == 16
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if full {
                    continue;
                }
                // New actions wake it; leases that ran out are found at
                // least every second.
                if *closing.borrow() {
                    return;
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return; },
                    _ = closing.changed() => return,
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {},
                    () = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }

    /// The tenant's contracts whose breaker is open at `now`.
    fn paused_contracts(&self, tenant: &str, now: i64) -> HashSet<String> {
        self.inner
            .breakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|((t, _), b)| t == tenant && b.open_until_ms > now)
            .map(|((_, c), _)| c.clone())
            .collect()
    }

    /// Loads an action for a confirmation by `p`: NOT_FOUND, ALREADY_EXISTS
    /// (completed), FAILED_PRECONDITION (cancelled, denied, failed,
    /// waiting), PERMISSION_DENIED (sent to someone else).
    fn confirmable(&self, p: &Principal, handle: &str) -> Result<(Place, ActionRec)> {
        let (instance, action) = parse_handle(handle)?;
        let place = (p.tenant.clone(), instance, action);
        let v = self
            .app()
            .engine
            .rt_get(&action_key(&place.0, place.1, &place.2))?
            .ok_or_else(|| VaultError::not_found(format!("action `{}`", shown(handle))))?;
        let a: ActionRec = decode("an outbox action", &v)?;
        match a.state.as_str() {
            "completed" => {
                return Err(VaultError::already_exists(
                    "action",
                    format!(
                    "`{}` was completed by `{}` (ledger entry {}); a completion is recorded once",
                    shown(handle),
                    a.completed_by,
                    a.last_entry
                ),
                ))
            }
            "cancelled" | "denied" | "failed" => {
                return Err(VaultError::precondition(format!(
                    "action `{}` is {} (ledger entry {}): there is nothing to confirm",
                    shown(handle),
                    a.state,
                    if a.last_entry == 0 {
                        a.queued_entry
                    } else {
                        a.last_entry
                    }
                )))
            }
            "waiting" => {
                return Err(VaultError::precondition(format!(
                    "action `{}` failed and waits for its retry; it will be delivered again",
                    shown(handle)
                )))
            }
            _ => {}
        }
        let leased_to = self.ready_lock().holder(&place).map(str::to_owned);
        let sent_to = leased_to.unwrap_or_else(|| a.delivered_to.clone());
        if sent_to != p.name {
            return Err(crate::error::PermissionDeniedError::new(
                &p.name,
                p.role.as_str(),
                if sent_to.is_empty() {
                    format!(
                        "confirm action `{}`: it was not delivered yet",
                        shown(handle)
                    )
                } else {
                    format!(
                        "confirm action `{}`: it was sent to another principal",
                        shown(handle)
                    )
                },
            )
            .into());
        }
        Ok((place, a))
    }

    /// Confirms an action (see the proto's `CompleteAction`).
    pub async fn complete(&self, p: &Principal, handle: &str) -> Result<pb::ActionOutcome> {
        self.app().authorize(p, PolicyAction::HandleActions)?;
        let guard = self.inner.lock.lock().await;
        let (place, mut a) = self.confirmable(p, handle)?;
        let now = now_ms();
        let late = a.due_ms > 0 && now > a.due_ms;
        let subject = Digest::from_hex(&a.subject)?;
        let mut batch = Batch::default();
        let mut d = vec![("by", serde_json::Value::from(p.name.clone()))];
        if late {
            d.push(("late_ms", (now - a.due_ms).into()));
        }
        let pos = batch.entry(self.action_entry(
            &place,
            &a,
            ContractStep::ActionCompleted,
            &p.name,
            detail(&d),
        )?);
        a.state = "completed".into();
        a.completed_by = p.name.clone();
        a.completed_at_ms = now;
        batch.raw.push((
            customer_action_key(&place.0, &subject.0, place.1, &place.2),
            None,
        ));
        if a.due_ms > 0 {
            batch
                .raw
                .push((rt::timer_key(a.due_ms, &place.0, place.1, &place.2), None));
        }
        batch.not_ready.push(place.clone());
        self.breaker_reset(&place.0, &a.contract);
        batch.actions.push((place.clone(), a, None, Some(pos)));
        self.close_instance_if_done(&mut batch, &place)?;
        self.apply(batch)?;
        drop(guard);
        self.app().commit().await?;
        self.publish();
        let a = self.action(&place)?;
        Ok(pb::ActionOutcome {
            entry: a.completed_entry(),
            action: Some(action_view(&place, &a)),
            late,
            retry_at_ms: 0,
            fallback_handle: String::new(),
            paused_until_ms: 0,
        })
    }

    /// Reports a failed action (see the proto's `FailAction`).
    pub async fn fail(
        &self,
        p: &Principal,
        handle: &str,
        reason: &str,
    ) -> Result<pb::ActionOutcome> {
        self.app().authorize(p, PolicyAction::HandleActions)?;
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
        let guard = self.inner.lock.lock().await;
        let (place, mut a) = self.confirmable(p, handle)?;
        let now = now_ms();
        let subject = Digest::from_hex(&a.subject)?;
        let mut batch = Batch::default();
        a.failures += 1;
        let gave_up = a.failures >= a.max_attempts;
        let mut retry_at = 0;
        let mut fallback = String::new();
        let pos = batch.entry(self.action_entry(
            &place,
            &a,
            ContractStep::ActionFailed,
            &p.name,
            detail(&[
                ("reason", reason.into()),
                ("attempt", a.failures.into()),
                ("gave_up", gave_up.into()),
            ]),
        )?);
        batch.not_ready.push(place.clone());
        if gave_up {
            // Three retries, then a person: a manual task replaces it.
            a.state = "failed".into();
            batch.raw.push((
                customer_action_key(&place.0, &subject.0, place.1, &place.2),
                None,
            ));
            if a.due_ms > 0 {
                batch
                    .raw
                    .push((rt::timer_key(a.due_ms, &place.0, place.1, &place.2), None));
            }
            fallback = self.manual_task(&mut batch, &place, &a, &subject)?;
        } else {
            a.state = "waiting".into();
            let shift = a.failures.saturating_sub(1).min(16);
            let backoff =
                i64::try_from(a.backoff_ms.saturating_mul(1u64 << shift)).unwrap_or(i64::MAX / 2);
            retry_at = now.saturating_add(backoff.max(1));
            batch.raw.push((
                rt::timer_key(retry_at, &place.0, place.1, &place.2),
                Some(vec![TIMER_RETRY]),
            ));
        }
        let paused = self.breaker_fail(&place.0, &a.contract, now);
        batch.actions.push((place.clone(), a, None, Some(pos)));
        self.apply(batch)?;
        drop(guard);
        self.app().commit().await?;
        self.publish();
        let a = self.action(&place)?;
        Ok(pb::ActionOutcome {
            entry: a.last_entry,
            action: Some(action_view(&place, &a)),
            late: false,
            retry_at_ms: retry_at,
            fallback_handle: fallback,
            paused_until_ms: paused,
        })
    }

    /// Queues the manual task that replaces an action after its last
    /// failure; returns its handle.
    fn manual_task(
        &self,
        batch: &mut Batch,
        place: &Place,
        a: &ActionRec,
        subject: &Digest,
    ) -> Result<String> {
        let assignee = if a.escalate_to.is_empty() {
            format!("department:{}", self.department_of(&place.0, &a.contract))
        } else {
            a.escalate_to.clone()
        };
        let id = format!("manual.{}", place.2);
        let manual = follow_up(
            a,
            "create_task",
            serde_json::json!({
                "assignee": assignee,
                "title": "manual_fallback",
                "replaces": place.2,
                "attempts": a.failures,
            }),
        );
        let qp = batch.entry(
            self.action_entry(
                place,
                &manual,
                ContractStep::ActionQueued,
                "sovra",
                queued_detail(&manual),
            )?
            .with_action(&id),
        );
        let mplace = (place.0.clone(), place.1, id.clone());
        batch.raw.push((
            customer_action_key(&place.0, &subject.0, place.1, &id),
            Some(Vec::new()),
        ));
        batch.now_ready.push(mplace.clone());
        batch.actions.push((mplace, manual, Some(qp), None));
        Ok(format!("{}/{id}", place.1))
    }

    fn breaker_reset(&self, tenant: &str, contract: &str) {
        self.inner
            .breakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(tenant.to_owned(), contract.to_owned()));
    }

    /// Counts a failure; returns until when the contract is paused (0: not).
    fn breaker_fail(&self, tenant: &str, contract: &str, now: i64) -> i64 {
        let limit = self
            .app()
            .engine
            .contracts(tenant, Some(contract))
            .ok()
            .and_then(|v| v.last().cloned())
            .and_then(|c| self.manifest(&c).ok())
            .map_or(5, |m| m.retry.breaker_failures.max(1));
        let mut b = self
            .inner
            .breakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let e = b
            .entry((tenant.to_owned(), contract.to_owned()))
            .or_default();
        e.failures += 1;
        if e.failures >= limit {
            e.failures = 0;
            e.open_until_ms = now + BREAKER_PAUSE_MS;
            tracing::warn!(
                tenant = %tenant,
                contract = %contract,
                failures = limit,
                "circuit breaker open: this contract's connector failed {limit} times in a row; its actions are not delivered for {} s",
                BREAKER_PAUSE_MS / 1000
            );
            return e.open_until_ms;
        }
        if e.open_until_ms > now {
            e.open_until_ms
        } else {
            0
        }
    }

    fn action_entry(
        &self,
        place: &Place,
        a: &ActionRec,
        step: ContractStep,
        actor: &str,
        d: String,
    ) -> Result<Body> {
        Ok(Body::ContractEvent(ContractEvent {
            tenant: place.0.clone(),
            subject: Digest::from_hex(&a.subject)?,
            contract: a.contract.clone(),
            version: a.version,
            contract_sha256: Digest::from_hex(&a.sha256)?,
            instance: place.1,
            step,
            action: place.2.clone(),
            actor: actor.to_owned(),
            input_sha256: Digest::default(),
            fuel_used: 0,
            detail: d,
            lineage: Digest::default(),
        }))
    }

    /// Marks the instance `done` when none of its actions stays open.
    fn close_instance_if_done(&self, batch: &mut Batch, place: &Place) -> Result<()> {
        let engine = &self.app().engine;
        let Some(v) = engine.rt_get(&instance_key(&place.0, place.1))? else {
            return Ok(());
        };
        let mut inst: InstanceRec = decode("a contract instance", &v)?;
        for (k, v) in engine.rt_scan(&actions_prefix(&place.0, place.1))? {
            let p = rt::split_action_key(&k)?;
            let a: ActionRec = match batch.actions.iter().find(|(bp, ..)| *bp == p) {
                Some((_, a, ..)) => a.clone(),
                None => decode("an outbox action", &v)?,
            };
            if a.is_open() {
                return Ok(());
            }
        }
        if inst.state == "open" {
            inst.state = "done".into();
            batch
                .raw
                .push((instance_key(&place.0, place.1), Some(encode(&inst)?)));
        }
        Ok(())
    }

    fn action(&self, place: &Place) -> Result<ActionRec> {
        let v = self
            .app()
            .engine
            .rt_get(&action_key(&place.0, place.1, &place.2))?
            .ok_or_else(|| VaultError::not_found(format!("action `{}/{}`", place.1, place.2)))?;
        decode("an outbox action", &v)
    }

    // ----- reading -----

    /// One instance with its actions.
    pub fn instance(&self, tenant: &str, id: u64) -> Result<pb::Instance> {
        let engine = &self.app().engine;
        let v = engine
            .rt_get(&instance_key(tenant, id))?
            .ok_or_else(|| VaultError::not_found(format!("instance {id}")))?;
        let inst: InstanceRec = decode("a contract instance", &v)?;
        let mut actions = Vec::new();
        for (k, v) in engine.rt_scan(&actions_prefix(tenant, id))? {
            let place = rt::split_action_key(&k)?;
            let a: ActionRec = decode("an outbox action", &v)?;
            actions.push(action_view(&place, &a));
        }
        Ok(instance_view(id, &inst, actions))
    }

    /// The tenant's instances (see the proto's `ListInstances`).
    pub fn list(&self, p: &Principal, r: &pb::ListInstancesRequest) -> Result<Vec<pb::Instance>> {
        self.app().authorize(p, PolicyAction::ReadContracts)?;
        let limit = match r.limit {
            0 => 100,
            n if n > 1000 => {
                return Err(VaultError::invalid("limit", "at most 1000"));
            }
            n => n as usize,
        };
        let cref = if r.customer_id.is_empty() {
            None
        } else {
            crate::schema::validate_id(
                "customer_id",
                &r.customer_id,
                crate::schema::MAX_CUSTOMER_ID_LEN,
            )?;
            Some(hex::encode(
                self.app().engine.cref(&p.tenant, &r.customer_id).0,
            ))
        };
        let mut out = Vec::new();
        for (k, v) in self
            .app()
            .engine
            .rt_scan_rev(&instance_prefix(&p.tenant), usize::MAX)?
        {
            let (_, id) = rt::split_instance_key(&k)?;
            let inst: InstanceRec = decode("a contract instance", &v)?;
            if (!r.contract.is_empty() && inst.contract != r.contract)
                || cref.as_ref().is_some_and(|c| *c != inst.cref)
                || (r.open_only && inst.state != "open")
            {
                continue;
            }
            out.push(self.instance(&p.tenant, id)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The instance record and the ledger entries of one instance (for the
    /// evidence report).
    pub fn instance_entries(
        &self,
        p: &Principal,
        id: u64,
    ) -> Result<(pb::Instance, Digest, Vec<u64>)> {
        self.app().authorize(p, PolicyAction::ReadContracts)?;
        let view = self.instance(&p.tenant, id)?;
        let v = self
            .app()
            .engine
            .rt_get(&instance_key(&p.tenant, id))?
            .ok_or_else(|| VaultError::not_found(format!("instance {id}")))?;
        let inst: InstanceRec = decode("a contract instance", &v)?;
        let subject = Digest::from_hex(&inst.subject)?;
        let ledger = &self.app().ledger;
        let mut entries = Vec::new();
        for i in ledger.subject_entries(&subject)? {
            if i < inst.evaluated_entry {
                continue;
            }
            if let Body::ContractEvent(ev) = ledger.entry(i)?.1.body {
                if ev.instance == id && ev.contract == inst.contract && ev.tenant == p.tenant {
                    entries.push(i);
                }
            }
        }
        Ok((view, subject, entries))
    }

    /// The evidence report of an instance (see the proto's `GetEvidence`).
    pub async fn evidence(&self, p: &Principal, instance: u64) -> Result<super::evidence::Report> {
        let (rt, p) = (self.clone(), p.clone());
        tokio::task::spawn_blocking(move || {
            super::evidence::build(&rt, &rt.app().ledger, &p, instance)
        })
        .await
        .map_err(|_| VaultError::internal("the evidence task"))?
    }

    /// How many actions wait in the outbox (ready or leased).
    pub fn outbox_len(&self) -> usize {
        self.ready_lock().len()
    }
}

/// `Body::ContractEvent` with another action id.
trait WithAction {
    fn with_action(self, id: &str) -> Self;
}

impl WithAction for Body {
    fn with_action(mut self, id: &str) -> Self {
        if let Body::ContractEvent(ev) = &mut self {
            ev.action = id.to_owned();
        }
        self
    }
}

impl ActionRec {
    fn completed_entry(&self) -> u64 {
        self.last_entry
    }
}

/// The policy principal of a contract.
pub fn contract_principal(m: &Manifest) -> sovra_policy::Principal {
    sovra_policy::Principal {
        kind: PrincipalKind::Workload,
        name: m.id.clone(),
        department: m.department.clone(),
        purposes: [m.purpose.clone()].into(),
    }
}

/// Decides one planned action for the contract's principal, as the
/// policy set says: `notify`, `create_task`, `request_approvals` and
/// `cancel_actions` on the customer (cancelling with the purpose it
/// cancels), `read_fields` (`read`/`reveal`) and `write_field` (`write`) on
/// each field, `submit_workload` (`submit_job`) on the tenant. Returns
/// whether it is allowed and the determining policies; an error is a
/// denial (with the error as its reason).
pub fn decide(
    pol: &sovra_policy::Policies,
    schema: &crate::schema::Schema,
    principal: &sovra_policy::Principal,
    tenant: &str,
    m: &Manifest,
    p: &Planned,
    customer: &CustomerAttrs,
) -> (bool, Vec<String>) {
    let purpose = match p.kind {
        "cancel_actions" => p.detail["purpose"].as_str().unwrap_or_default(),
        _ => m.purpose.as_str(),
    };
    let ctx = policy::context(purpose, 0);
    let field_names: Vec<&str> = match p.kind {
        "read_fields" => p.detail["fields"]
            .as_array()
            .map(|a| a.iter().filter_map(|f| f.as_str()).collect())
            .unwrap_or_default(),
        "write_field" => p.detail["field"].as_str().into_iter().collect(),
        _ => Vec::new(),
    };
    let decided = (|| -> std::result::Result<(bool, Vec<String>), String> {
        let mut fields = Vec::new();
        for f in &field_names {
            fields.push(&schema.field(f).map_err(|e| e.to_string())?.policy);
        }
        let scope = pol
            .scope(principal, tenant, customer, &fields)
            .map_err(|e| e.to_string())?;
        let one = |a: PolicyAction, field: Option<&str>| {
            pol.decide(&scope, a, field, &ctx)
                .map(|d| (d.allowed(), d.policies().to_vec()))
                .map_err(|e| e.to_string())
        };
        match p.kind {
            "notify" => one(PolicyAction::Notify, None),
            "create_task" => one(PolicyAction::CreateTask, None),
            "request_approvals" => one(PolicyAction::RequestApprovals, None),
            "cancel_actions" => one(PolicyAction::CancelActions, None),
            "submit_workload" => one(PolicyAction::SubmitJob, None),
            "write_field" => one(PolicyAction::Write, field_names.first().copied()),
            "read_fields" => {
                let ds = pol
                    .read_fields(&scope, &fields, &ctx)
                    .map_err(|e| e.to_string())?;
                Ok((
                    ds.iter().all(|d| d.disclosure != Disclosure::Denied),
                    ds.iter().flat_map(|d| d.determining()).collect(),
                ))
            }
            other => Err(format!("no policy action for `{other}`")),
        }
    })();
    decided.unwrap_or_else(|e| (false, vec![format!("error: {e}")]))
}

/// A new action that follows `a` (its escalation, or the manual task
/// after its last failure): same contract, customer and purpose, ready,
/// no deadline.
fn follow_up(a: &ActionRec, kind: &str, detail: serde_json::Value) -> ActionRec {
    ActionRec {
        kind: kind.into(),
        detail,
        due_ms: 0,
        escalate_to: String::new(),
        state: "ready".into(),
        failures: 0,
        queued_entry: 0,
        delivered_to: String::new(),
        completed_by: String::new(),
        completed_at_ms: 0,
        last_entry: 0,
        ..a.clone()
    }
}

/// Wipes the plaintext strings of values read.
fn wipe(fields: &mut BTreeMap<String, Scalar>) {
    for v in fields.values_mut() {
        if let Scalar::Str(t) = v {
            zeroize::Zeroize::zeroize(t);
        }
    }
}

fn scalar(v: &FieldValue) -> Scalar {
    match v {
        FieldValue::Text(t) => Scalar::Str(t.clone()),
        FieldValue::Integer(i) | FieldValue::Timestamp(i) => Scalar::Int(*i),
    }
}

/// Longest `detail` a ledger entry holds.
const MAX_DETAIL: usize = 256;

/// A step's detail as compact JSON, within [`MAX_DETAIL`] bytes: long
/// strings (a reason, a list of policies) are shortened, ending in `…`.
fn detail(pairs: &[(&str, serde_json::Value)]) -> String {
    let render = |limit: usize| {
        let m: serde_json::Map<String, serde_json::Value> = pairs
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) if s.chars().count() > limit => {
                        let mut t: String = s.chars().take(limit).collect();
                        t.push('…');
                        serde_json::Value::String(t)
                    }
                    v => v.clone(),
                };
                ((*k).to_owned(), v)
            })
            .collect();
        serde_json::Value::Object(m).to_string()
    };
    let mut limit = MAX_DETAIL;
    loop {
        let out = render(limit);
        if out.len() <= MAX_DETAIL || limit == 0 {
            return out;
        }
        limit = limit.saturating_sub((out.len() - MAX_DETAIL).max(8));
    }
}

fn queued_detail(a: &ActionRec) -> String {
    let mut pairs = vec![("kind", serde_json::Value::from(a.kind.clone()))];
    if a.due_ms > 0 {
        pairs.push(("due_ms", a.due_ms.into()));
    }
    if !a.escalate_to.is_empty() {
        pairs.push(("escalate_to", a.escalate_to.clone().into()));
    }
    pairs.push(("policies", a.policies.join(",").into()));
    detail(&pairs)
}

fn shown(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Parses `INSTANCE/ACTION_ID`.
fn parse_handle(h: &str) -> Result<(u64, String)> {
    let bad = || {
        VaultError::invalid(
            "handle",
            format!(
                "`{}` is not an action handle (`INSTANCE/ACTION_ID`, as WatchActions sent it)",
                shown(h)
            ),
        )
    };
    let (i, a) = h.split_once('/').ok_or_else(bad)?;
    let i: u64 = i.parse().map_err(|_| bad())?;
    if a.is_empty()
        || a.len() > 80
        || !a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
    {
        return Err(bad());
    }
    Ok((i, a.to_owned()))
}

fn action_name(place: &Place) -> String {
    format!(
        "outbox action {}/{} of tenant `{}`",
        place.1, place.2, place.0
    )
}

/// The `contract_event` at `index`, if that entry is one.
fn ledger_event(ledger: &sovra_ledger::Ledger, index: u64) -> Result<Option<ContractEvent>> {
    if index >= ledger.size() {
        return Ok(None);
    }
    Ok(match ledger.entry(index)?.1.body {
        Body::ContractEvent(ev) => Some(ev),
        _ => None,
    })
}

/// One outbox record against the ledger: the entry that queued it and the
/// entry of its latest step are steps of this action, and its state is the
/// one they say (a record claiming a completion the ledger does not hold
/// is refused, naming the action).
fn check_action(ledger: &sovra_ledger::Ledger, place: &Place, a: &ActionRec) -> Result<()> {
    let of_this = |index: u64, steps: &[ContractStep]| -> Result<Option<ContractEvent>> {
        Ok(ledger_event(ledger, index)?.filter(|ev| {
            ev.tenant == place.0
                && ev.instance == place.1
                && ev.action == place.2
                && ev.contract == a.contract
                && ev.contract_sha256.to_hex() == a.sha256
                && steps.contains(&ev.step)
        }))
    };
    let refuse = |what: &str, index: u64| {
        VaultError::integrity(format!(
            "{}: the vault's `contract_runtime` tree says it is {} and names ledger entry {index} as its {what}, but that entry is not (the record was altered, or the ledger replaced)",
            action_name(place),
            a.state
        ))
    };
    let queued: &[ContractStep] = if a.state == "denied" {
        &[ContractStep::ActionDenied]
    } else {
        &[ContractStep::ActionQueued]
    };
    if of_this(a.queued_entry, queued)?.is_none() {
        return Err(refuse("queuing", a.queued_entry));
    }
    let last: &[ContractStep] = match a.state.as_str() {
        "completed" => &[ContractStep::ActionCompleted],
        "cancelled" => &[ContractStep::Cancelled],
        "failed" | "waiting" => &[ContractStep::ActionFailed],
        "escalated" => &[ContractStep::Escalated],
        "ready" if a.last_entry != 0 => &[ContractStep::ActionRetried],
        "ready" | "denied" => return Ok(()),
        _ => return Err(refuse("state", a.last_entry)),
    };
    match of_this(a.last_entry, last)? {
        Some(ev) if a.state != "completed" || ev.actor == a.completed_by => Ok(()),
        _ => Err(refuse("latest step", a.last_entry)),
    }
}

fn subject_bytes(hex_subject: &str) -> Result<[u8; 32]> {
    Ok(Digest::from_hex(hex_subject)?.0)
}

/// The latest completion or cancellation of an open action the ledger
/// holds after it was queued: (step, entry, actor).
fn ledger_step(
    ledger: &sovra_ledger::Ledger,
    place: &Place,
    a: &ActionRec,
) -> Result<Option<(ContractStep, u64, String)>> {
    let subject = Digest::from_hex(&a.subject)?;
    let mut found = None;
    for i in ledger.subject_entries(&subject)? {
        if i <= a.queued_entry.max(a.last_entry) {
            continue;
        }
        if let Body::ContractEvent(ev) = ledger.entry(i)?.1.body {
            if ev.tenant == place.0
                && ev.instance == place.1
                && ev.action == place.2
                && matches!(
                    ev.step,
                    ContractStep::ActionCompleted | ContractStep::Cancelled
                )
            {
                found = Some((ev.step, i, ev.actor));
            }
        }
    }
    Ok(found)
}

fn check_signal(s: &SignalRequest) -> Result<()> {
    if !sovra_contracts::manifest::is_identifier(&s.name) {
        return Err(VaultError::invalid(
            "name",
            format!(
                "`{}` is not an identifier ([a-z][a-z0-9_]*, at most 64 bytes)",
                shown(&s.name)
            ),
        ));
    }
    crate::schema::validate_id(
        "customer_id",
        &s.customer_id,
        crate::schema::MAX_CUSTOMER_ID_LEN,
    )?;
    if !s.contract.is_empty()
        && !sovra_contracts::manifest::is_identifier(&s.contract.replace('-', "_"))
    {
        return Err(VaultError::invalid(
            "contract",
            format!("`{}` is not a contract id", shown(&s.contract)),
        ));
    }
    if s.idempotency_key.len() > MAX_KEY_LEN
        || s.idempotency_key
            .chars()
            .any(|c| c.is_control() || !c.is_ascii())
    {
        return Err(VaultError::invalid(
            "idempotency_key",
            format!("at most {MAX_KEY_LEN} printable ASCII bytes"),
        ));
    }
    let e = Event {
        kind: Trigger::Signal,
        name: s.name.clone(),
        at_ms: 0,
        attrs: s.attrs.clone(),
        fields: BTreeMap::new(),
    };
    e.check()
        .map_err(|err| VaultError::invalid("attrs", err.to_string()))
}

fn signal_digest(s: &SignalRequest) -> String {
    let v = serde_json::json!({
        "name": s.name, "customer": s.customer_id, "contract": s.contract, "attrs": s.attrs,
    });
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        v.to_string().as_bytes(),
    ))
}

fn action_view(place: &Place, a: &ActionRec) -> pb::Action {
    pb::Action {
        handle: format!("{}/{}", place.1, place.2),
        instance: place.1,
        contract: a.contract.clone(),
        action_id: place.2.clone(),
        kind: a.kind.clone(),
        detail_json: a.detail.to_string(),
        customer_id: String::new(),
        due_at_ms: a.due_ms,
        escalate_to: a.escalate_to.clone(),
        state: a.state.clone(),
        attempt: a.failures + 1,
        completed_by: a.completed_by.clone(),
        completed_at_ms: a.completed_at_ms,
        policies: a.policies.clone(),
    }
}

fn instance_view(id: u64, i: &InstanceRec, actions: Vec<pb::Action>) -> pb::Instance {
    pb::Instance {
        id,
        contract: i.contract.clone(),
        version: i.version,
        sha256: i.sha256.clone(),
        trigger: i.trigger.clone(),
        state: i.state.clone(),
        failure: i.failure.clone(),
        evaluated_entry: i.evaluated_entry,
        created_at_ms: i.created_at_ms,
        fuel_used: i.fuel_used,
        actions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_fit_a_ledger_entry() {
        let long = "policy-".repeat(80);
        let d = detail(&[
            ("reason", long.clone().into()),
            ("policies", long.into()),
            ("attempt", 3.into()),
        ]);
        assert!(d.len() <= MAX_DETAIL, "{} bytes", d.len());
        let v: serde_json::Value = serde_json::from_str(&d).unwrap();
        assert_eq!(v["attempt"], 3);
        assert!(v["reason"].as_str().unwrap().ends_with('…'));
        let short = detail(&[("by", "svc".into())]);
        assert_eq!(short, "{\"by\":\"svc\"}");
    }

    #[test]
    fn handles_parse_or_are_refused() {
        assert_eq!(
            parse_handle("12/send_link").unwrap(),
            (12, "send_link".into())
        );
        assert_eq!(
            parse_handle("3/escalate.x_y").unwrap(),
            (3, "escalate.x_y".into())
        );
        for bad in ["", "12", "/x", "x/y", "1/", "1/A", "1/a b", "-1/a", "1/a/b"] {
            assert!(parse_handle(bad).is_err(), "{bad}");
        }
    }
}
