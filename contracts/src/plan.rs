//! One evaluation of a contract on one event, and the dry run of a
//! sequence of events (`sovra contract test`).
//!
//! An evaluation is a pure function of the manifest, the event and the
//! host's time: trigger, then condition, then guest, then the declared and
//! emitted actions with their due times. It takes no action: the host
//! decides each action with its policies and records it before anything is
//! done. The dry run keeps obligations in memory: a completion line keeps
//! one; one not completed by its deadline is reported as escalated.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::condition::{Inputs, Scalar};
use crate::error::{ContractError, EventError, GuestError, GuestFault, Result};
use crate::manifest::{
    is_identifier, parse_duration, Action, ActionKind, Capability, Manifest, Target, Trigger,
    MAX_DEADLINE_MS,
};

/// Most attributes one event carries.
pub const MAX_ATTRS: usize = 32;
/// Longest string attribute or field value given to a contract.
pub const MAX_VALUE_LEN: usize = 256;

/// An event a contract may be triggered by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: Trigger,
    /// The signal, field, purpose or workload it is about ("" for an
    /// erasure).
    pub name: String,
    /// When (host time, ms since the epoch).
    pub at_ms: i64,
    /// Its attributes (signals carry the caller's; vault events carry none).
    pub attrs: BTreeMap<String, Scalar>,
    /// The values of the fields the contract reads, as policy disclosed
    /// them to its principal (absent when withheld).
    pub fields: BTreeMap<String, Scalar>,
}

impl Event {
    /// Checks the bounds of a caller-supplied event.
    pub fn check(&self) -> std::result::Result<(), EventError> {
        if self.kind != Trigger::CustomerErased && !is_identifier(&self.name) {
            return Err(EventError::new(
                0,
                format!("name `{:.64}` is not an identifier", self.name),
            ));
        }
        for (what, map) in [("attribute", &self.attrs), ("field", &self.fields)] {
            if map.len() > MAX_ATTRS {
                return Err(EventError::new(
                    0,
                    format!("{} {what}s; at most {MAX_ATTRS}", map.len()),
                ));
            }
            for (k, v) in map {
                if !is_identifier(k) {
                    return Err(EventError::new(
                        0,
                        format!("{what} name `{k:.64}` is not an identifier"),
                    ));
                }
                if let Scalar::Str(s) = v {
                    if s.len() > MAX_VALUE_LEN || s.chars().any(char::is_control) {
                        return Err(EventError::new(
                            0,
                            format!(
                                "{what} `{k}`: at most {MAX_VALUE_LEN} bytes, no control characters"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// SHA-256 of the event's canonical JSON (its kind, name, time,
    /// attributes and field values): the evaluation's input digest, which
    /// shows what was decided on without holding it. Offline only: such
    /// inputs are guessable (a score, a customer kind), so the evidence the
    /// server writes must key this digest with an erasable key, never
    /// write it bare.
    pub fn digest(&self) -> [u8; 32] {
        let v = serde_json::json!({
            "kind": self.kind.as_str(),
            "name": self.name,
            "at_ms": self.at_ms,
            "attrs": self.attrs,
            "fields": self.fields,
        });
        // serde_json's maps are sorted (no `preserve_order`), so this is
        // canonical for these inputs.
        Sha256::digest(v.to_string().as_bytes()).into()
    }
}

/// One action an evaluation asks for.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    /// The action's id (declared, or given by the guest).
    pub id: String,
    /// Its kind, as a capability name.
    pub kind: &'static str,
    /// Its parameters.
    pub detail: serde_json::Value,
    /// When it must be completed by (absent: no deadline).
    pub due_ms: Option<i64>,
    /// Who is told if it is not.
    pub escalate_to: Option<String>,
    /// Whether the guest emitted it.
    pub from_guest: bool,
    /// The policy decision for the contract's principal, when a decider
    /// was given (a denied action is not taken and sets no deadline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<ActionDecision>,
}

/// A policy decision on one action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActionDecision {
    /// Whether it may be taken.
    pub allowed: bool,
    /// The determining policies (the permits that allowed it, or the
    /// forbids that denied it).
    pub policies: Vec<String>,
}

/// What a policy decision may know of the customer an event is about, as
/// an events file gives it (`"customer": {...}`); the vault takes the same
/// from the ledger's consent view and the record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerFacts {
    /// Purposes with consent in force.
    #[serde(default)]
    pub consents: BTreeSet<String>,
    /// Purposes whose consent was withdrawn.
    #[serde(default)]
    pub withdrawn: BTreeSet<String>,
    /// The customer's kind (`government`, …).
    #[serde(default)]
    pub kind: String,
    /// The customer's contract value.
    #[serde(default)]
    pub contract_value: i64,
}

/// Decides one planned action for the contract's principal.
pub type Decider<'a> = dyn FnMut(&Planned, &CustomerFacts) -> ActionDecision + 'a;

/// What one evaluation gave.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// Whether a trigger matched.
    pub triggered: bool,
    /// The condition's result (absent: not triggered, or no condition).
    pub condition: Option<bool>,
    /// Fuel the guest used (0 without a guest).
    pub fuel_used: u64,
    /// SHA-256 of the inputs, hex.
    pub input_digest: String,
    /// The actions, declared first, then the guest's.
    pub actions: Vec<Planned>,
}

/// Evaluates `m` on `event` at host time `now_ms`.
pub fn evaluate(m: &Manifest, event: &Event, now_ms: i64) -> Result<Evaluation> {
    event.check()?;
    // The digest covers what the contract sees: its readable fields only.
    let seen = Event {
        fields: event
            .fields
            .iter()
            .filter(|(k, _)| m.reads.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        ..event.clone()
    };
    let digest = hex::encode(seen.digest());
    if !m.triggered_by(event.kind, &event.name) {
        return Ok(Evaluation {
            triggered: false,
            condition: None,
            fuel_used: 0,
            input_digest: digest,
            actions: Vec::new(),
        });
    }
    // The contract sees only the fields it reads.
    let fields: BTreeMap<String, Scalar> = event
        .fields
        .iter()
        .filter(|(k, _)| m.reads.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let inputs = Inputs {
        kind: event.kind.as_str(),
        name: &event.name,
        at_ms: event.at_ms,
        attrs: Some(&event.attrs),
        fields: Some(&fields),
        now_ms,
    };
    let condition = match &m.condition {
        Some(c) => Some(c.holds(&inputs)?),
        None => None,
    };
    if condition == Some(false) {
        return Ok(Evaluation {
            triggered: true,
            condition,
            fuel_used: 0,
            input_digest: digest,
            actions: Vec::new(),
        });
    }
    let mut actions = Vec::new();
    for a in &m.actions {
        actions.push(plan(a, &inputs, event.at_ms, false)?);
    }
    let mut fuel_used = 0;
    if let Some(g) = &m.guest {
        let mut given = event.attrs.clone();
        given.extend(fields.clone());
        given.insert("now_ms".into(), Scalar::Int(now_ms));
        given.insert("at_ms".into(), Scalar::Int(event.at_ms));
        let out = g.run(&given)?;
        fuel_used = out.fuel_used;
        for v in out.actions {
            let a = guest_action(m, &v).map_err(|e| e.with_fuel(fuel_used))?;
            if actions.iter().any(|p: &Planned| p.id == a.id) {
                return Err(GuestError::new(
                    GuestFault::BadAction,
                    format!(
                        "the guest emitted action id `{}` twice (or a declared one)",
                        a.id
                    ),
                )
                .with_fuel(fuel_used)
                .into());
            }
            actions.push(plan(&a, &inputs, event.at_ms, true)?);
        }
    }
    Ok(Evaluation {
        triggered: true,
        condition,
        fuel_used,
        input_digest: digest,
        actions,
    })
}

fn plan(a: &Action, inputs: &Inputs<'_>, at_ms: i64, from_guest: bool) -> Result<Planned> {
    let detail = match &a.kind {
        ActionKind::Notify { to, template } => {
            serde_json::json!({ "to": to.to_string(), "template": template })
        }
        ActionKind::CreateTask { assignee, title } => {
            serde_json::json!({ "assignee": assignee.to_string(), "title": title })
        }
        ActionKind::WriteField { field, value } => {
            serde_json::json!({ "field": field, "value": value.eval(inputs)? })
        }
        ActionKind::SubmitWorkload { workload } => serde_json::json!({ "workload": workload }),
        ActionKind::RequestApprovals { count, of } => {
            serde_json::json!({ "count": count, "of": of.to_string() })
        }
        ActionKind::ReadFields { fields } => serde_json::json!({ "fields": fields }),
        ActionKind::CancelActions { purpose } => serde_json::json!({ "purpose": purpose }),
    };
    let due_ms = a
        .deadline_ms
        .map(|d| at_ms.saturating_add(i64::try_from(d).unwrap_or(i64::MAX)));
    Ok(Planned {
        id: a.id.clone(),
        kind: a.kind.name(),
        detail,
        due_ms,
        escalate_to: a.escalate_to.as_ref().map(Target::to_string),
        from_guest,
        decision: None,
    })
}

/// Checks an action a guest emitted against the contract's capabilities.
fn guest_action(m: &Manifest, v: &serde_json::Value) -> std::result::Result<Action, GuestError> {
    let bad = |msg: String| GuestError::new(GuestFault::BadAction, msg);
    let obj = v.as_object().ok_or_else(|| bad("not an object".into()))?;
    let s = |k: &str| -> std::result::Result<String, GuestError> {
        obj.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("an emitted action needs the string `{k}`")))
    };
    let id = s("id")?;
    if !is_identifier(&id) {
        return Err(bad(format!("action id `{id:.64}` is not an identifier")));
    }
    let ident = |k: &str| -> std::result::Result<String, GuestError> {
        let x = s(k)?;
        if is_identifier(&x) {
            Ok(x)
        } else {
            Err(bad(format!("`{k}` of action `{id}` is not an identifier")))
        }
    };
    let target =
        |k: &str| -> std::result::Result<Target, GuestError> { Target::parse(&s(k)?).map_err(bad) };
    let kind_name = s("kind")?;
    let (kind, keys): (ActionKind, &[&str]) = match kind_name.as_str() {
        "notify" => (
            ActionKind::Notify {
                to: target("to")?,
                template: ident("template")?,
            },
            &["to", "template"],
        ),
        "create_task" => (
            ActionKind::CreateTask {
                assignee: target("assignee")?,
                title: ident("title")?,
            },
            &["assignee", "title"],
        ),
        "submit_workload" => (
            ActionKind::SubmitWorkload {
                workload: ident("workload")?,
            },
            &["workload"],
        ),
        "request_approvals" => {
            let count = obj
                .get("count")
                .and_then(serde_json::Value::as_u64)
                .filter(|c| (1..=10).contains(c))
                .ok_or_else(|| bad("`count` must be 1 to 10".into()))?;
            (
                ActionKind::RequestApprovals {
                    count: count as u32,
                    of: target("of")?,
                },
                &["count", "of"],
            )
        }
        "cancel_actions" => (
            ActionKind::CancelActions {
                purpose: ident("purpose")?,
            },
            &["purpose"],
        ),
        other => {
            return Err(bad(format!(
                "a guest cannot emit `{other:.64}` (it may emit notify, create_task, submit_workload, request_approvals, cancel_actions)"
            )))
        }
    };
    for k in obj.keys() {
        if !["id", "kind", "deadline", "escalate_to"].contains(&k.as_str())
            && !keys.contains(&k.as_str())
        {
            return Err(bad(format!("action `{id}`: unknown key `{k:.64}`")));
        }
    }
    let cap = kind.capability();
    if !m.capabilities.contains(&cap) {
        return Err(bad(format!(
            "action `{id}` is `{}`, which the contract's capabilities do not include",
            cap.as_str()
        )));
    }
    let deadline_ms = match obj.get("deadline") {
        Some(d) => {
            let ms = d
                .as_str()
                .and_then(parse_duration)
                .filter(|&ms| ms <= MAX_DEADLINE_MS)
                .ok_or_else(|| bad(format!("action `{id}`: bad deadline")))?;
            if !m.capabilities.contains(&Capability::SetTimer) {
                return Err(bad(format!(
                    "action `{id}` sets a deadline without the `set_timer` capability"
                )));
            }
            Some(ms)
        }
        None => None,
    };
    let escalate_to = match obj.get("escalate_to") {
        Some(_) => Some(target("escalate_to")?),
        None => None,
    };
    if deadline_ms.is_some() != escalate_to.is_some() {
        return Err(bad(format!(
            "action `{id}`: `deadline` and `escalate_to` go together"
        )));
    }
    Ok(Action {
        id,
        kind,
        deadline_ms,
        escalate_to,
    })
}

/// One line of an events file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine {
    at_ms: i64,
    #[serde(default)]
    on: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    attrs: BTreeMap<String, Scalar>,
    #[serde(default)]
    fields: BTreeMap<String, Scalar>,
    #[serde(default)]
    complete: Option<String>,
    #[serde(default)]
    customer: Option<CustomerFacts>,
}

/// What happened to one obligation in a dry run.
#[derive(Debug, Clone, Serialize)]
pub struct Obligation {
    /// The evaluation (0-based index of the triggering line's evaluation)
    /// it came from.
    pub instance: usize,
    /// The action.
    pub action: String,
    /// When it was due.
    pub due_ms: i64,
    /// `kept` (completed in time), `escalated` (due passed first) or
    /// `pending` (not yet due at the end of the run).
    pub outcome: &'static str,
    /// When it was completed or escalated.
    pub at_ms: Option<i64>,
    /// Who was told, for an escalation.
    pub escalated_to: Option<String>,
    /// When an escalated obligation was completed after all (late).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_late_ms: Option<i64>,
    /// The action's place in its evaluation (reports keep that order).
    #[serde(skip)]
    position: usize,
}

/// One line of the dry run's report.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The events file's line.
    pub line: usize,
    /// When.
    pub at_ms: i64,
    /// The evaluation (for an event line).
    pub evaluation: Option<Evaluation>,
    /// Why the evaluation failed (for an event line), e.g. a guest fault.
    pub error: Option<String>,
    /// The action it completed (for a completion line).
    pub completed: Option<String>,
}

/// A dry run's report.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    /// The contract's id, version and pin.
    pub contract: String,
    /// The pin, hex.
    pub hash: String,
    /// Each line's result.
    pub steps: Vec<Step>,
    /// Each obligation's outcome at the end.
    pub obligations: Vec<Obligation>,
}

/// Runs `m` over an events file (JSON lines: an event `{"at_ms", "on",
/// "name", "attrs", "fields", "customer"}` or a completion `{"at_ms",
/// "complete": ACTION_ID}`), in order, up to `until_ms` (default: the last
/// line's time), taking every action. Nothing leaves the process.
pub fn dry_run(m: &Manifest, events: &str, until_ms: Option<i64>) -> Result<DryRun> {
    dry_run_decided(m, events, until_ms, None)
}

/// [`dry_run`], with each action decided by `decide` first: a denied
/// action is reported with its decision and not taken (it sets no
/// deadline).
pub fn dry_run_decided(
    m: &Manifest,
    events: &str,
    until_ms: Option<i64>,
    mut decide: Option<&mut Decider<'_>>,
) -> Result<DryRun> {
    let mut steps = Vec::new();
    let mut open: Vec<Obligation> = Vec::new();
    let mut done: Vec<Obligation> = Vec::new();
    let mut instances = 0;
    let mut last = i64::MIN;
    for (i, text) in events.lines().enumerate() {
        let line = i + 1;
        if text.trim().is_empty() || text.trim_start().starts_with('#') {
            continue;
        }
        let l: EventLine = serde_json::from_str(text)
            .map_err(|e| ContractError::from(EventError::new(line, e.to_string())))?;
        if l.at_ms < last {
            return Err(EventError::new(line, "lines must be in time order").into());
        }
        last = l.at_ms;
        escalate_due(&mut open, &mut done, l.at_ms);
        if let Some(id) = l.complete.clone() {
            steps.push(complete(&mut open, &mut done, line, &l, id)?);
            continue;
        }
        let on = l.on.ok_or_else(|| {
            ContractError::from(EventError::new(line, "an event line needs `on`"))
        })?;
        let kind = Trigger::parse(&on).ok_or_else(|| {
            ContractError::from(EventError::new(line, format!("unknown event `{on:.64}`")))
        })?;
        let event = Event {
            kind,
            name: l.name.unwrap_or_default(),
            at_ms: l.at_ms,
            attrs: l.attrs,
            fields: l.fields,
        };
        event
            .check()
            .map_err(|e| EventError::new(line, e.message()))?;
        let customer = l.customer.unwrap_or_default();
        match evaluate(m, &event, l.at_ms) {
            Ok(mut ev) => {
                if let Some(d) = decide.as_deref_mut() {
                    for p in &mut ev.actions {
                        p.decision = Some(d(p, &customer));
                    }
                }
                if ev.triggered && !ev.actions.is_empty() {
                    for (position, p) in ev.actions.iter().enumerate() {
                        let denied = p.decision.as_ref().is_some_and(|d| !d.allowed);
                        if let (Some(due), false) = (p.due_ms, denied) {
                            open.push(Obligation {
                                position,
                                instance: instances,
                                action: p.id.clone(),
                                due_ms: due,
                                outcome: "pending",
                                at_ms: None,
                                escalated_to: p.escalate_to.clone(),
                                completed_late_ms: None,
                            });
                        }
                    }
                    instances += 1;
                }
                steps.push(Step {
                    line,
                    at_ms: l.at_ms,
                    evaluation: Some(ev),
                    error: None,
                    completed: None,
                });
            }
            // A failing instance (a guest out of fuel, a condition on a
            // wrong-typed attribute) is a result of the run, not an error of
            // the file.
            Err(e @ (ContractError::Guest(_) | ContractError::Condition(_))) => steps.push(Step {
                line,
                at_ms: l.at_ms,
                evaluation: None,
                error: Some(e.to_string()),
                completed: None,
            }),
            Err(e) => return Err(e),
        }
    }
    escalate_due(&mut open, &mut done, until_ms.unwrap_or(last));
    done.extend(open);
    done.sort_by_key(|o| (o.instance, o.position));
    Ok(DryRun {
        contract: format!("{} v{}", m.id, m.version),
        hash: hex::encode(m.hash()),
        steps,
        obligations: done,
    })
}

/// A completion line: keeps the oldest pending obligation of its action.
fn complete(
    open: &mut Vec<Obligation>,
    done: &mut Vec<Obligation>,
    line: usize,
    l: &EventLine,
    id: String,
) -> Result<Step> {
    if l.on.is_some()
        || l.name.is_some()
        || !l.attrs.is_empty()
        || !l.fields.is_empty()
        || l.customer.is_some()
    {
        return Err(
            EventError::new(line, "a completion line has only `at_ms` and `complete`").into(),
        );
    }
    if !open.iter().any(|o| o.action == id) {
        // Completed after its deadline: it was escalated; the completion
        // is recorded on it, late.
        if let Some(o) = done
            .iter_mut()
            .find(|o| o.action == id && o.outcome == "escalated" && o.completed_late_ms.is_none())
        {
            o.completed_late_ms = Some(l.at_ms);
            return Ok(Step {
                line,
                at_ms: l.at_ms,
                evaluation: None,
                error: None,
                completed: Some(id),
            });
        }
    }
    let pos = open.iter().position(|o| o.action == id).ok_or_else(|| {
        ContractError::from(EventError::new(
            line,
            format!("no pending obligation `{id:.64}`"),
        ))
    })?;
    let mut o = open.remove(pos);
    o.outcome = "kept";
    o.at_ms = Some(l.at_ms);
    done.push(o);
    Ok(Step {
        line,
        at_ms: l.at_ms,
        evaluation: None,
        error: None,
        completed: Some(id),
    })
}

/// Moves every open obligation due before `now` to `done`, escalated.
fn escalate_due(open: &mut Vec<Obligation>, done: &mut Vec<Obligation>, now: i64) {
    let (due, keep): (Vec<Obligation>, Vec<Obligation>) =
        open.drain(..).partition(|o| o.due_ms < now);
    *open = keep;
    for mut o in due {
        o.outcome = "escalated";
        o.at_ms = Some(o.due_ms);
        done.push(o);
    }
}
