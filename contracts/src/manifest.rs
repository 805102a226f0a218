//! Contract manifests: parsed from TOML, checked completely before a
//! contract can be registered or tested, every error located at
//! `file:line:column`.
//!
//! Guaranteed after [`Manifest::parse`]: identifiers are bounded
//! identifiers; every action's kind is covered by a requested capability; a
//! deadline has an escalation target and the `set_timer` capability; the
//! condition and every value expression parse and type-check against the
//! fields the contract reads (with the schema's types when one is given);
//! the guest module, if any, compiles, validates and imports only the host
//! interface ([`crate::guest`]); fuel and memory are within the crate's
//! caps. [`Manifest::hash`] pins the manifest and its guest together.
//!
//! Not guaranteed here: that policy lets the contract's principal do what
//! it asks for. Every action is decided by the vault's Cedar policies when it
//! is taken, never here.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use toml::Spanned;

use crate::condition::{CelType, Condition, FieldTypes};
use crate::error::{ContractError, ManifestError, Result};
use crate::guest::{Guest, GuestLimits};

/// Longest manifest accepted (bytes).
pub const MAX_MANIFEST_LEN: usize = 64 * 1024;
/// Longest guest module accepted (bytes, text or binary).
pub const MAX_GUEST_LEN: usize = 1024 * 1024;
/// Most actions one manifest declares.
pub const MAX_ACTIONS: usize = 32;
/// Most triggers one manifest declares.
pub const MAX_TRIGGERS: usize = 16;
/// Most fields one manifest reads.
pub const MAX_READS: usize = 32;
/// Longest deadline: 366 days.
pub const MAX_DEADLINE_MS: u64 = 366 * 24 * 3_600_000;
/// Most attempts of one action before it becomes a manual task.
pub const MAX_ATTEMPTS: u32 = 10;

/// What a contract may ask for. Each action kind needs its capability;
/// deadlines need `set_timer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// Read the fields listed in `reads` (masking and consent apply).
    ReadFields,
    /// Send a notification to the customer, a role or a department.
    Notify,
    /// Open a task for a role or a department.
    CreateTask,
    /// Write a derived field (recorded in lineage).
    WriteField,
    /// Submit a registered sandbox workload for the customer.
    SubmitWorkload,
    /// Ask for approvals before something may proceed.
    RequestApprovals,
    /// Set deadlines (and have them cancelled).
    SetTimer,
    /// Cancel the customer's pending actions of a purpose.
    CancelActions,
}

impl Capability {
    /// Every capability, in manifest spelling.
    pub const ALL: [Capability; 8] = [
        Capability::ReadFields,
        Capability::Notify,
        Capability::CreateTask,
        Capability::WriteField,
        Capability::SubmitWorkload,
        Capability::RequestApprovals,
        Capability::SetTimer,
        Capability::CancelActions,
    ];
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::ReadFields => "read_fields",
            Capability::Notify => "notify",
            Capability::CreateTask => "create_task",
            Capability::WriteField => "write_field",
            Capability::SubmitWorkload => "submit_workload",
            Capability::RequestApprovals => "request_approvals",
            Capability::SetTimer => "set_timer",
            Capability::CancelActions => "cancel_actions",
        }
    }
    /// Parses the manifest spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
    fn known() -> String {
        Self::ALL.map(Capability::as_str).join(", ")
    }
}

/// The vault events and business signals a contract can be triggered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Trigger {
    /// A business signal sent through `Contracts.Signal`; `name` is the
    /// signal's name.
    Signal,
    /// A field was written; `name`, if set, is the field.
    FieldWritten,
    /// Consent was granted; `name`, if set, is the purpose.
    ConsentGranted,
    /// Consent was withdrawn; `name`, if set, is the purpose.
    ConsentWithdrawn,
    /// The customer was erased.
    CustomerErased,
    /// A sandbox job's result was released; `name`, if set, is the
    /// workload.
    JobReleased,
}

impl Trigger {
    /// Every trigger, in manifest spelling.
    pub const ALL: [Trigger; 6] = [
        Trigger::Signal,
        Trigger::FieldWritten,
        Trigger::ConsentGranted,
        Trigger::ConsentWithdrawn,
        Trigger::CustomerErased,
        Trigger::JobReleased,
    ];
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::FieldWritten => "field_written",
            Trigger::ConsentGranted => "consent_granted",
            Trigger::ConsentWithdrawn => "consent_withdrawn",
            Trigger::CustomerErased => "customer_erased",
            Trigger::JobReleased => "job_released",
        }
    }
    /// Parses the manifest spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// Who an action is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// The customer the event is about.
    Customer,
    /// Every principal of a role (`role:officer`).
    Role(String),
    /// A department (`department:delivery`).
    Department(String),
}

impl Target {
    /// Parses `customer`, `role:NAME` or `department:NAME`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "`{s:.80}` is not a target: expected `customer`, `role:NAME` or `department:NAME`"
            )
        };
        if s == "customer" {
            return Ok(Target::Customer);
        }
        let (kind, name) = s.split_once(':').ok_or_else(bad)?;
        if !is_identifier(name) {
            return Err(bad());
        }
        match kind {
            "role" => Ok(Target::Role(name.to_owned())),
            "department" => Ok(Target::Department(name.to_owned())),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Customer => f.write_str("customer"),
            Target::Role(r) => write!(f, "role:{r}"),
            Target::Department(d) => write!(f, "department:{d}"),
        }
    }
}

/// What an action does.
#[derive(Debug, Clone)]
pub enum ActionKind {
    /// Notify `to` with a template.
    Notify {
        /// Recipient.
        to: Target,
        /// The connector's template id.
        template: String,
    },
    /// Open a task.
    CreateTask {
        /// Who it is for.
        assignee: Target,
        /// Its title (an identifier-like short text).
        title: String,
    },
    /// Write a derived field with a value computed by a CEL expression.
    WriteField {
        /// The field.
        field: String,
        /// The value.
        value: Condition,
    },
    /// Submit a registered sandbox workload for the customer.
    SubmitWorkload {
        /// The workload id.
        workload: String,
    },
    /// Ask `count` distinct principals of `of` to approve.
    RequestApprovals {
        /// How many approvals.
        count: u32,
        /// Who may approve.
        of: Target,
    },
    /// Read fields (they go to the connector that performs the contract's
    /// actions, as policy discloses them).
    ReadFields {
        /// The fields.
        fields: Vec<String>,
    },
    /// Cancel the customer's pending actions of every contract with this
    /// purpose.
    CancelActions {
        /// The purpose.
        purpose: String,
    },
}

impl ActionKind {
    /// The capability it needs.
    pub fn capability(&self) -> Capability {
        match self {
            ActionKind::Notify { .. } => Capability::Notify,
            ActionKind::CreateTask { .. } => Capability::CreateTask,
            ActionKind::WriteField { .. } => Capability::WriteField,
            ActionKind::SubmitWorkload { .. } => Capability::SubmitWorkload,
            ActionKind::RequestApprovals { .. } => Capability::RequestApprovals,
            ActionKind::ReadFields { .. } => Capability::ReadFields,
            ActionKind::CancelActions { .. } => Capability::CancelActions,
        }
    }
    /// The manifest spelling of the kind.
    pub fn name(&self) -> &'static str {
        self.capability().as_str()
    }
}

/// One declared action; with a deadline it is an obligation.
#[derive(Debug, Clone)]
pub struct Action {
    /// Unique within the contract.
    pub id: String,
    /// What it does.
    pub kind: ActionKind,
    /// Milliseconds after the trigger by which it must be completed.
    pub deadline_ms: Option<u64>,
    /// Who is told (a task is opened for them) when the deadline passes.
    pub escalate_to: Option<Target>,
}

/// Retries of a failed action, then a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all (the first included) before a manual task opens.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubled for each later one.
    pub backoff_ms: u64,
    /// Consecutive connector failures that pause the contract.
    pub breaker_failures: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_ms: 1_000,
            breaker_failures: 5,
        }
    }
}

/// A checked contract manifest.
#[derive(Debug)]
pub struct Manifest {
    /// Identifier.
    pub id: String,
    /// Version (a change registers a new version).
    pub version: u32,
    /// The purpose its principal acts for.
    pub purpose: String,
    /// The department its principal belongs to.
    pub department: String,
    /// Free description.
    pub description: String,
    /// What triggers it: the kind and, optionally, the name it must match.
    pub triggers: Vec<(Trigger, Option<String>)>,
    /// Condition over `event`, `fields` and `now_ms` (none: always).
    pub condition: Option<Condition>,
    /// Fields it may read.
    pub reads: Vec<String>,
    /// What it may ask for.
    pub capabilities: BTreeSet<Capability>,
    /// Declared actions.
    pub actions: Vec<Action>,
    /// Retry and circuit-breaker settings.
    pub retry: Retry,
    /// Its guest module, compiled and checked.
    pub guest: Option<Guest>,
    hash: [u8; 32],
}

// --- the TOML shape ------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    id: Spanned<String>,
    version: Spanned<i64>,
    purpose: Spanned<String>,
    department: Spanned<String>,
    #[serde(default)]
    description: Option<Spanned<String>>,
    #[serde(default)]
    condition: Option<Spanned<String>>,
    #[serde(default)]
    reads: Vec<Spanned<String>>,
    #[serde(default)]
    capabilities: Vec<Spanned<String>>,
    #[serde(default)]
    triggers: Vec<Spanned<RawTrigger>>,
    #[serde(default)]
    actions: Vec<Spanned<RawAction>>,
    #[serde(default)]
    retry: Option<Spanned<RawRetry>>,
    #[serde(default)]
    guest: Option<Spanned<RawGuest>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    on: Spanned<String>,
    #[serde(default)]
    name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    id: Spanned<String>,
    kind: Spanned<String>,
    #[serde(default)]
    to: Option<Spanned<String>>,
    #[serde(default)]
    template: Option<Spanned<String>>,
    #[serde(default)]
    assignee: Option<Spanned<String>>,
    #[serde(default)]
    title: Option<Spanned<String>>,
    #[serde(default)]
    field: Option<Spanned<String>>,
    #[serde(default)]
    value: Option<Spanned<String>>,
    #[serde(default)]
    workload: Option<Spanned<String>>,
    #[serde(default)]
    count: Option<Spanned<i64>>,
    #[serde(default)]
    of: Option<Spanned<String>>,
    #[serde(default)]
    fields: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    purpose: Option<Spanned<String>>,
    #[serde(default)]
    deadline: Option<Spanned<String>>,
    #[serde(default)]
    escalate_to: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default)]
    max_attempts: Option<Spanned<i64>>,
    #[serde(default)]
    backoff_ms: Option<Spanned<i64>>,
    #[serde(default)]
    breaker_failures: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuest {
    module: Spanned<String>,
    #[serde(default)]
    fuel: Option<Spanned<i64>>,
    #[serde(default)]
    memory_pages: Option<Spanned<i64>>,
}

/// Where errors are located: the file's name and text.
struct Source<'a> {
    file: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn at(&self, span: Range<usize>, message: impl Into<String>) -> ContractError {
        let (line, column) = line_col(self.text, span.start);
        ManifestError::new(self.file, line, column, message).into()
    }
    fn whole(&self, message: impl Into<String>) -> ContractError {
        ManifestError::new(self.file, 0, 0, message).into()
    }
    fn ident(&self, what: &str, s: &Spanned<String>) -> Result<String> {
        if is_identifier(s.get_ref()) {
            Ok(s.get_ref().clone())
        } else {
            Err(self.at(
                s.span(),
                format!(
                    "{what} `{:.80}` is not an identifier (1 to 64 of a-z, A-Z, 0-9, `_ . : -`, starting with a letter)",
                    s.get_ref()
                ),
            ))
        }
    }
    fn int(&self, what: &str, v: &Spanned<i64>, min: i64, max: i64) -> Result<i64> {
        let n = *v.get_ref();
        if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(self.at(
                v.span(),
                format!("{what} is {n}: it must be {min} to {max}"),
            ))
        }
    }
}

/// The 1-based line and column of byte `offset` of `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Whether `s` is a bare file name: no separator, not `.` or `..`, at
/// most 255 bytes, no control character.
pub fn is_bare_file_name(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && !s.contains(['/', '\\'])
        && s != "."
        && s != ".."
        && !s.chars().any(char::is_control)
}

/// Whether `s` is a bounded identifier: 1 to 64 of letters, digits and
/// `_ . : -`, starting with a letter.
pub fn is_identifier(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
}

/// Parses a duration: a positive integer and a unit (`ms`, `s`, `m`, `h`,
/// `d`), e.g. `72h`, `300ms`.
pub fn parse_duration(s: &str) -> Option<u64> {
    let digits = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit_ms).filter(|&ms| ms > 0)
}

impl Manifest {
    /// Parses and checks a manifest. `file` names it in errors; `guest` is
    /// the content of the module the manifest names in `[guest] module`
    /// (WebAssembly text or binary), if any; `fields` gives the schema's
    /// field types (or says every field is unknown-typed).
    pub fn parse(
        file: &str,
        text: &str,
        guest: Option<&[u8]>,
        fields: &dyn FieldTypes,
    ) -> Result<Manifest> {
        let src = Source { file, text };
        if text.len() > MAX_MANIFEST_LEN {
            return Err(src.whole(format!(
                "the manifest is {} bytes; at most {MAX_MANIFEST_LEN} are accepted",
                text.len()
            )));
        }
        let raw: RawManifest = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_owned();
            match e.span() {
                Some(s) => src.at(s, msg),
                None => src.whole(msg),
            }
        })?;
        let id = src.ident("id", &raw.id)?;
        let version = src.int("version", &raw.version, 1, i64::from(u32::MAX))? as u32;
        let purpose = src.ident("purpose", &raw.purpose)?;
        let department = src.ident("department", &raw.department)?;
        let description = match &raw.description {
            Some(d)
                if d.get_ref().chars().count() > 512
                    || d.get_ref().chars().any(char::is_control) =>
            {
                return Err(src.at(
                    d.span(),
                    "description: at most 512 characters, no control characters",
                ))
            }
            Some(d) => d.get_ref().clone(),
            None => String::new(),
        };

        let capabilities = Self::capabilities(&src, &raw)?;
        let triggers = Self::triggers(&src, &raw)?;
        let reads = Self::reads(&src, &raw, fields, &capabilities)?;
        let readable = Readable {
            reads: &reads,
            fields,
        };

        let condition = match &raw.condition {
            Some(c) => Some(
                Condition::compile(c.get_ref(), &readable, CelType::Bool)
                    .map_err(|e| src.at(c.span(), format!("condition: {}", e.message())))?,
            ),
            None => None,
        };

        if raw.actions.len() > MAX_ACTIONS {
            return Err(src.whole(format!("at most {MAX_ACTIONS} actions")));
        }
        let mut actions: Vec<Action> = Vec::new();
        for a in &raw.actions {
            let action = parse_action(&src, a, &readable, &reads, &capabilities)?;
            if actions.iter().any(|b| b.id == action.id) {
                return Err(src.at(
                    a.get_ref().id.span(),
                    format!("action id `{}` is used twice", action.id),
                ));
            }
            actions.push(action);
        }

        let retry = Self::retry(&src, &raw)?;
        let guest = Self::guest(&src, &raw, guest)?;
        let hash = pin(text.as_bytes(), guest.as_ref().map(Guest::wasm));
        Ok(Manifest {
            id,
            version,
            purpose,
            department,
            description,
            triggers,
            condition,
            reads,
            capabilities,
            actions,
            retry,
            guest,
            hash,
        })
    }

    fn capabilities(src: &Source<'_>, raw: &RawManifest) -> Result<BTreeSet<Capability>> {
        let mut capabilities = BTreeSet::new();
        for c in &raw.capabilities {
            let cap = Capability::parse(c.get_ref()).ok_or_else(|| {
                src.at(
                    c.span(),
                    format!(
                        "unknown capability `{:.64}` (known: {})",
                        c.get_ref(),
                        Capability::known()
                    ),
                )
            })?;
            if !capabilities.insert(cap) {
                return Err(src.at(
                    c.span(),
                    format!("capability `{}` is listed twice", cap.as_str()),
                ));
            }
        }

        Ok(capabilities)
    }

    fn triggers(src: &Source<'_>, raw: &RawManifest) -> Result<Vec<(Trigger, Option<String>)>> {
        if raw.triggers.is_empty() {
            return Err(src.whole("no `[[triggers]]`: a contract needs at least one"));
        }
        if raw.triggers.len() > MAX_TRIGGERS {
            return Err(src.whole(format!("at most {MAX_TRIGGERS} triggers")));
        }
        let mut triggers = Vec::new();
        for t in &raw.triggers {
            let t = t.get_ref();
            let kind = Trigger::parse(t.on.get_ref()).ok_or_else(|| {
                let known: Vec<&str> = Trigger::ALL.iter().map(|t| t.as_str()).collect();
                src.at(
                    t.on.span(),
                    format!(
                        "unknown trigger `{:.64}` (known: {})",
                        t.on.get_ref(),
                        known.join(", ")
                    ),
                )
            })?;
            let name = t
                .name
                .as_ref()
                .map(|n| src.ident("trigger name", n))
                .transpose()?;
            if kind == Trigger::Signal && name.is_none() {
                return Err(src.at(
                    t.on.span(),
                    "a `signal` trigger needs `name`, the signal it waits for",
                ));
            }
            if kind == Trigger::CustomerErased && name.is_some() {
                return Err(src.at(t.on.span(), "a `customer_erased` trigger takes no `name`"));
            }
            triggers.push((kind, name));
        }

        Ok(triggers)
    }

    fn reads(
        src: &Source<'_>,
        raw: &RawManifest,
        fields: &dyn FieldTypes,
        capabilities: &BTreeSet<Capability>,
    ) -> Result<Vec<String>> {
        if raw.reads.len() > MAX_READS {
            return Err(src.whole(format!("at most {MAX_READS} fields in `reads`")));
        }
        let mut reads = Vec::new();
        for r in &raw.reads {
            let name = src.ident("field", r)?;
            if !fields.exists(&name) {
                return Err(src.at(
                    r.span(),
                    format!("`reads` names `{name}`, which the schema does not define"),
                ));
            }
            if reads.contains(&name) {
                return Err(src.at(r.span(), format!("`reads` lists `{name}` twice")));
            }
            reads.push(name);
        }
        if !reads.is_empty() && !capabilities.contains(&Capability::ReadFields) {
            return Err(src.at(
                raw.reads[0].span(),
                "`reads` needs the `read_fields` capability: add it to `capabilities`",
            ));
        }
        Ok(reads)
    }

    fn retry(src: &Source<'_>, raw: &RawManifest) -> Result<Retry> {
        let mut retry = Retry::default();
        if let Some(r) = &raw.retry {
            let r = r.get_ref();
            if let Some(v) = &r.max_attempts {
                retry.max_attempts =
                    src.int("retry.max_attempts", v, 1, i64::from(MAX_ATTEMPTS))? as u32;
            }
            if let Some(v) = &r.backoff_ms {
                retry.backoff_ms = src.int("retry.backoff_ms", v, 0, 3_600_000)? as u64;
            }
            if let Some(v) = &r.breaker_failures {
                retry.breaker_failures = src.int("retry.breaker_failures", v, 1, 1_000)? as u32;
            }
        }

        Ok(retry)
    }

    fn guest(src: &Source<'_>, raw: &RawManifest, guest: Option<&[u8]>) -> Result<Option<Guest>> {
        let g = match (&raw.guest, guest) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(src.whole("a guest module was given, but the manifest has no `[guest]`"))
            }
            (Some(g), None) => {
                return Err(src.at(
                    g.get_ref().module.span(),
                    format!(
                        "the guest module `{:.200}` was not given",
                        g.get_ref().module.get_ref()
                    ),
                ))
            }
            (Some(g), Some(bytes)) => {
                let g = g.get_ref();
                if !is_bare_file_name(g.module.get_ref()) {
                    return Err(src.at(
                        g.module.span(),
                        "`module` is a file name beside the manifest (no folder, no `..`)",
                    ));
                }
                let mut limits = GuestLimits::default();
                if let Some(f) = &g.fuel {
                    limits.fuel = src.int("guest.fuel", f, 1, GuestLimits::MAX_FUEL as i64)? as u64;
                }
                if let Some(p) = &g.memory_pages {
                    limits.memory_pages = src.int(
                        "guest.memory_pages",
                        p,
                        1,
                        i64::from(GuestLimits::MAX_PAGES),
                    )? as u32;
                }
                if bytes.len() > MAX_GUEST_LEN {
                    return Err(src.at(
                        g.module.span(),
                        format!(
                            "the guest module is {} bytes; at most {MAX_GUEST_LEN}",
                            bytes.len()
                        ),
                    ));
                }
                Some(
                    Guest::compile(bytes, limits).map_err(|e| {
                        src.at(g.module.span(), format!("{}: {e}", g.module.get_ref()))
                    })?,
                )
            }
        };

        Ok(g)
    }

    /// Reads a manifest file and the guest module it names (relative to the
    /// manifest's folder), then [`Manifest::parse`]s them.
    pub fn load(path: &std::path::Path, fields: &dyn FieldTypes) -> Result<Manifest> {
        let file = path.display().to_string();
        let text = read_bounded(path, MAX_MANIFEST_LEN)
            .map_err(|e| ContractError::from(ManifestError::new(&file, 0, 0, e)))?;
        let text = String::from_utf8(text)
            .map_err(|_| ContractError::from(ManifestError::new(&file, 0, 0, "not UTF-8")))?;
        let module = guest_module_name(&text);
        let guest = match module {
            Some(m) if !is_bare_file_name(&m) => {
                return Err(ManifestError::new(
                    &file,
                    0,
                    0,
                    "`[guest] module` is a file name beside the manifest (no folder, no `..`)",
                )
                .into())
            }
            Some(m) => {
                let p = path.parent().unwrap_or(std::path::Path::new(".")).join(&m);
                Some(read_bounded(&p, MAX_GUEST_LEN).map_err(|e| {
                    ContractError::from(ManifestError::new(
                        &file,
                        0,
                        0,
                        format!("guest module {}: {e}", p.display()),
                    ))
                })?)
            }
            None => None,
        };
        Manifest::parse(&file, &text, guest.as_deref(), fields)
    }

    /// SHA-256 pin of the manifest's bytes and its compiled guest: the
    /// contract's identity in the ledger.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// Whether `event` (a trigger kind and its name) triggers this contract.
    pub fn triggered_by(&self, kind: Trigger, name: &str) -> bool {
        self.triggers
            .iter()
            .any(|(k, n)| *k == kind && n.as_deref().is_none_or(|n| n == name))
    }
}

/// The module named in `[guest] module`, read without checking the rest
/// (the full parse checks it): what a client sends beside the manifest.
pub fn guest_module_name(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct G {
        guest: Option<M>,
    }
    #[derive(Deserialize)]
    struct M {
        module: String,
    }
    toml::from_str::<G>(text).ok()?.guest.map(|g| g.module)
}

/// Reads at most `max` bytes of a file; a longer file is an error.
fn read_bounded(path: &std::path::Path, max: usize) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut buf = Vec::new();
    f.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    if buf.len() > max {
        return Err(format!("longer than {max} bytes"));
    }
    Ok(buf)
}

/// The contract's pin: SHA-256 over a domain tag, then each part as a
/// big-endian u64 length and its bytes (the manifest, then the guest's
/// WebAssembly binary or nothing).
pub fn pin(manifest: &[u8], wasm: Option<&[u8]>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"sovra-contract-v1\0");
    h.update((manifest.len() as u64).to_be_bytes());
    h.update(manifest);
    let wasm = wasm.unwrap_or_default();
    h.update((wasm.len() as u64).to_be_bytes());
    h.update(wasm);
    h.finalize().into()
}

/// The fields a contract may name in its expressions: those in `reads`,
/// typed by the schema.
struct Readable<'a> {
    reads: &'a [String],
    fields: &'a dyn FieldTypes,
}

impl FieldTypes for Readable<'_> {
    fn exists(&self, name: &str) -> bool {
        self.reads.iter().any(|r| r == name)
    }
    fn field_type(&self, name: &str) -> CelType {
        self.fields.field_type(name)
    }
}

fn parse_action(
    src: &Source<'_>,
    a: &Spanned<RawAction>,
    readable: &Readable<'_>,
    reads: &[String],
    capabilities: &BTreeSet<Capability>,
) -> Result<Action> {
    let span = a.span();
    let a = a.get_ref();
    let id = src.ident("action id", &a.id)?;
    let kind = action_kind(src, a, &id, readable, reads)?;
    check_keys(src, span.clone(), a, &id, &kind)?;
    let cap = kind.capability();
    if !capabilities.contains(&cap) {
        return Err(src.at(
            a.kind.span(),
            format!(
                "action `{id}` is `{}`, which needs the `{}` capability: add it to `capabilities`",
                kind.name(),
                cap.as_str()
            ),
        ));
    }
    let (deadline_ms, escalate_to) = deadline(src, span, a, &id, capabilities)?;
    Ok(Action {
        id,
        kind,
        deadline_ms,
        escalate_to,
    })
}

/// The kind of a declared action, with its keys checked.
fn action_kind(
    src: &Source<'_>,
    a: &RawAction,
    id: &str,
    readable: &Readable<'_>,
    reads: &[String],
) -> Result<ActionKind> {
    let need = |what: &str, v: &Option<Spanned<String>>| -> Result<Spanned<String>> {
        v.clone().ok_or_else(|| {
            src.at(
                a.kind.span(),
                format!(
                    "action `{id}` of kind `{}` needs `{what}`",
                    a.kind.get_ref()
                ),
            )
        })
    };
    let target = |v: &Spanned<String>| -> Result<Target> {
        Target::parse(v.get_ref()).map_err(|e| src.at(v.span(), e))
    };
    let kind = match a.kind.get_ref().as_str() {
        "notify" => ActionKind::Notify {
            to: target(&need("to", &a.to)?)?,
            template: src.ident("template", &need("template", &a.template)?)?,
        },
        "create_task" => ActionKind::CreateTask {
            assignee: target(&need("assignee", &a.assignee)?)?,
            title: src.ident("title", &need("title", &a.title)?)?,
        },
        "write_field" => {
            let field = need("field", &a.field)?;
            let name = src.ident("field", &field)?;
            if !readable.fields.exists(&name) {
                return Err(src.at(field.span(), format!("field `{name}` is not in the schema")));
            }
            let value = need("value", &a.value)?;
            let expected = readable.fields.field_type(&name);
            let value = Condition::compile(value.get_ref(), readable, expected)
                .map_err(|e| src.at(value.span(), format!("value: {}", e.message())))?;
            ActionKind::WriteField { field: name, value }
        }
        "submit_workload" => ActionKind::SubmitWorkload {
            workload: src.ident("workload", &need("workload", &a.workload)?)?,
        },
        "request_approvals" => {
            let count = a.count.as_ref().ok_or_else(|| {
                src.at(a.kind.span(), format!("action `{id}` of kind `request_approvals` needs `count`"))
            })?;
            ActionKind::RequestApprovals {
                count: src.int("count", count, 1, 10)? as u32,
                of: target(&need("of", &a.of)?)?,
            }
        }
        "read_fields" => {
            let f = a.fields.as_ref().ok_or_else(|| {
                src.at(a.kind.span(), format!("action `{id}` of kind `read_fields` needs `fields`"))
            })?;
            for name in f.get_ref() {
                if !reads.contains(name) {
                    return Err(src.at(f.span(), format!("`{name:.64}` is not in `reads`")));
                }
            }
            if f.get_ref().is_empty() {
                return Err(src.at(f.span(), "`fields` is empty"));
            }
            ActionKind::ReadFields {
                fields: f.get_ref().clone(),
            }
        }
        "cancel_actions" => ActionKind::CancelActions {
            purpose: src.ident("purpose", &need("purpose", &a.purpose)?)?,
        },
        other => {
            return Err(src.at(
                a.kind.span(),
                format!(
                    "unknown action kind `{other:.64}` (known: notify, create_task, write_field, submit_workload, request_approvals, read_fields, cancel_actions)"
                ),
            ))
        }
    };
    Ok(kind)
}

/// Keys that belong to other kinds are mistakes, not silently ignored.
fn check_keys(
    src: &Source<'_>,
    span: Range<usize>,
    a: &RawAction,
    id: &str,
    kind: &ActionKind,
) -> Result<()> {
    let stray: &[(&str, bool)] = &[
        (
            "to",
            a.to.is_some() && !matches!(kind, ActionKind::Notify { .. }),
        ),
        (
            "template",
            a.template.is_some() && !matches!(kind, ActionKind::Notify { .. }),
        ),
        (
            "assignee",
            a.assignee.is_some() && !matches!(kind, ActionKind::CreateTask { .. }),
        ),
        (
            "title",
            a.title.is_some() && !matches!(kind, ActionKind::CreateTask { .. }),
        ),
        (
            "field",
            a.field.is_some() && !matches!(kind, ActionKind::WriteField { .. }),
        ),
        (
            "value",
            a.value.is_some() && !matches!(kind, ActionKind::WriteField { .. }),
        ),
        (
            "workload",
            a.workload.is_some() && !matches!(kind, ActionKind::SubmitWorkload { .. }),
        ),
        (
            "count",
            a.count.is_some() && !matches!(kind, ActionKind::RequestApprovals { .. }),
        ),
        (
            "of",
            a.of.is_some() && !matches!(kind, ActionKind::RequestApprovals { .. }),
        ),
        (
            "fields",
            a.fields.is_some() && !matches!(kind, ActionKind::ReadFields { .. }),
        ),
        (
            "purpose",
            a.purpose.is_some() && !matches!(kind, ActionKind::CancelActions { .. }),
        ),
    ];
    if let Some((key, _)) = stray.iter().find(|(_, s)| *s) {
        return Err(src.at(
            span,
            format!(
                "action `{id}`: `{key}` does not apply to kind `{}`",
                kind.name()
            ),
        ));
    }
    Ok(())
}

/// An action's deadline and escalation: both or neither.
fn deadline(
    src: &Source<'_>,
    span: Range<usize>,
    a: &RawAction,
    id: &str,
    capabilities: &BTreeSet<Capability>,
) -> Result<(Option<u64>, Option<Target>)> {
    let deadline_ms = match &a.deadline {
        Some(d) => {
            let ms = parse_duration(d.get_ref())
                .filter(|&ms| ms <= MAX_DEADLINE_MS)
                .ok_or_else(|| {
                    src.at(
                        d.span(),
                        format!(
                            "deadline `{:.32}`: expected a positive number and a unit (ms, s, m, h, d), at most 366d",
                            d.get_ref()
                        ),
                    )
                })?;
            if !capabilities.contains(&Capability::SetTimer) {
                return Err(src.at(
                    d.span(),
                    "a deadline needs the `set_timer` capability: add it to `capabilities`",
                ));
            }
            Some(ms)
        }
        None => None,
    };
    let escalate_to = a
        .escalate_to
        .as_ref()
        .map(|v| Target::parse(v.get_ref()).map_err(|e| src.at(v.span(), e)))
        .transpose()?;
    match (deadline_ms, &escalate_to, &a.escalate_to) {
        (Some(_), None, _) => {
            return Err(src.at(
                span,
                format!(
                "action `{id}` has a deadline but no `escalate_to`: who is told when it is missed?"
            ),
            ))
        }
        (None, Some(_), Some(e)) => {
            return Err(src.at(
                e.span(),
                format!("action `{id}` has `escalate_to` but no `deadline`"),
            ))
        }
        _ => {}
    }
    Ok((deadline_ms, escalate_to))
}

/// Field types from a schema: a map of name to CEL type.
impl FieldTypes for BTreeMap<String, CelType> {
    fn exists(&self, name: &str) -> bool {
        self.contains_key(name)
    }
    fn field_type(&self, name: &str) -> CelType {
        self.get(name).cloned().unwrap_or(CelType::Dyn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("72h"), Some(72 * 3_600_000));
        assert_eq!(parse_duration("300ms"), Some(300));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("h"), None);
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("99999999999999999999d"), None);
        assert_eq!(parse_duration("5w"), None);
    }

    #[test]
    fn lines_and_columns() {
        assert_eq!(line_col("a\nbc\nd", 0), (1, 1));
        assert_eq!(line_col("a\nbc\nd", 3), (2, 2));
        assert_eq!(line_col("a\nbc\nd", 99), (3, 2));
    }

    #[test]
    fn targets() {
        assert_eq!(Target::parse("customer"), Ok(Target::Customer));
        assert_eq!(
            Target::parse("role:officer"),
            Ok(Target::Role("officer".into()))
        );
        assert!(Target::parse("team:x").is_err());
        assert!(Target::parse("role:").is_err());
        assert!(Target::parse("role:a b").is_err());
    }
}
