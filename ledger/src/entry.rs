//! Ledger entries and their canonical binary encoding (docs/ledger-format.md
//! describes it byte by byte).
//!
//! Guarantees:
//! - One entry has exactly one encoding: [`Entry::decode`] accepts only what
//!   [`Entry::encode`] produces (no trailing bytes, no overlong strings, no
//!   unknown enum values inside known kinds), so the Merkle leaf hash of an
//!   entry identifies it.
//! - Decoding never panics and never allocates more than the input's length
//!   implies.
//! - Entries carry no personal data by construction: the customer appears
//!   only as a [`Pseudonym`] and evidence only as a SHA-256 digest. Free-text
//!   fields are bounded identifiers (purposes, channels, principal names).
//!
//! Not guaranteed: that the strings callers put in are not personal data; the
//! vault validates them as identifiers before they get here.

use serde::Serialize;

use crate::error::{LedgerError, Result};

/// Version byte that starts every entry this crate appends.
pub const FORMAT_VERSION: u8 = 2;
/// The oldest format still read: version 1, before lineage anchors (no
/// `lineage` digest in kinds 3 and 4; kinds 7 and 8 unknown).
pub const OLDEST_FORMAT_VERSION: u8 = 1;
/// Longest encoded entry accepted.
pub const MAX_ENTRY_LEN: usize = 64 * 1024;
/// Longest string inside an entry.
pub const MAX_STRING_LEN: usize = 256;
/// Most fields one reveal entry lists.
pub const MAX_FIELDS: usize = 256;
const HEADER_LEN: usize = 1 + 1 + 8 + 8 + 32 + 4;
/// The highest kind byte this version knows.
pub const LAST_KNOWN_KIND: u8 = 10;

/// The highest kind byte format `version` defines.
fn last_kind(version: u8) -> u8 {
    if version >= 2 {
        LAST_KNOWN_KIND
    } else {
        6
    }
}

/// Whether `c` is a Unicode bidirectional formatting character (UAX #9:
/// the embeddings, overrides and isolates, and the implicit marks).
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// A 32-byte value shown as hex (hashes, pseudonyms).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Parses exactly 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| {
            LedgerError::invalid(format!("digest `{s:.80}`: expected 64 hex digits"))
        })?;
        Ok(Self(out))
    }
    /// Takes exactly 32 bytes.
    pub fn from_slice(what: &str, b: &[u8]) -> Result<Self> {
        <[u8; 32]>::try_from(b).map(Self).map_err(|_| {
            LedgerError::invalid(format!("{what}: expected 32 bytes, got {}", b.len()))
        })
    }
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

/// A customer's pseudonym: an HMAC of the customer id under a per-customer
/// salt the vault destroys at erasure. Not personal data once the salt is
/// gone; until then only the vault can link it to the customer.
pub type Pseudonym = Digest;

/// Whether a consent entry grants or withdraws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentAction {
    /// Consent given.
    Grant,
    /// Consent withdrawn.
    Withdraw,
}

/// A consent grant or withdrawal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Consent {
    /// Tenant the customer belongs to.
    pub tenant: String,
    /// The customer.
    pub subject: Pseudonym,
    /// The purpose consented to (or withdrawn).
    pub purpose: String,
    /// Collection channel (web, call-centre, branch…).
    pub channel: String,
    /// Legal basis (GDPR Art. 6 / PIPL Art. 13 term).
    pub legal_basis: String,
    /// Version of the privacy notice shown.
    pub notice_version: String,
    /// SHA-256 of the evidence (signed form, recording); never the evidence.
    pub evidence_sha256: Digest,
    /// Principal that recorded it.
    pub actor: String,
}

/// The outcome of an access decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The access went ahead.
    Allowed,
    /// The access was refused.
    Denied,
}

/// How one field was disclosed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Disclosure {
    /// The plaintext value was returned.
    Plaintext,
    /// Only a masked form was returned.
    Masked,
    /// Nothing of the value was returned.
    Withheld,
}

/// One field of a reveal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldAccess {
    /// The schema field name.
    pub field: String,
    /// How it was disclosed.
    pub disclosure: Disclosure,
}

/// A read of field values (allowed or denied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reveal {
    /// Tenant.
    pub tenant: String,
    /// The customer; all zero for a read refused before the customer was
    /// looked up (the entry then says nothing of whether it exists).
    pub subject: Pseudonym,
    /// Principal that asked.
    pub actor: String,
    /// Its role.
    pub role: String,
    /// Declared purpose.
    pub purpose: String,
    /// Outcome.
    pub decision: Decision,
    /// Why (policy ids, or the consent entry that refused it); may be empty.
    pub reason: String,
    /// Fields and how each was disclosed.
    pub fields: Vec<FieldAccess>,
    /// SHA-256 of the lineage activity that recorded this read (zero if
    /// none): the anchor that makes the vault's lineage record tamper-evident.
    pub lineage: Digest,
}

/// A crypto-shredding erasure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Erasure {
    /// Tenant.
    pub tenant: String,
    /// The customer (its salt is destroyed by this erasure).
    pub subject: Pseudonym,
    /// Principal that ordered it.
    pub actor: String,
    /// SHA-256 of the lineage activity that recorded the erasure.
    pub lineage: Digest,
}

/// One field version a write produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WrittenField {
    /// The schema field name.
    pub field: String,
    /// The value version the write created.
    pub version: u64,
}

/// A write of field values (collection or update).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Write {
    /// Tenant.
    pub tenant: String,
    /// The customer.
    pub subject: Pseudonym,
    /// Principal that wrote.
    pub actor: String,
    /// Collection channel.
    pub channel: String,
    /// The field versions written.
    pub fields: Vec<WrittenField>,
    /// SHA-256 of the lineage activity that recorded the write.
    pub lineage: Digest,
}

/// A sandbox job whose output was released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobRun {
    /// Tenant.
    pub tenant: String,
    /// Principal the output was released to.
    pub actor: String,
    /// The job id.
    pub job_id: String,
    /// SHA-256 of the job spec.
    pub spec_sha256: Digest,
    /// The job's purpose.
    pub purpose: String,
    /// Customers in the cohort.
    pub cohort_size: u64,
    /// SHA-256 of the released output.
    pub output_sha256: Digest,
    /// SHA-256 of the lineage activity that recorded the job.
    pub lineage: Digest,
}

/// A tenant key rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRotation {
    /// Tenant.
    pub tenant: String,
    /// Principal that ordered it.
    pub actor: String,
    /// Version active before.
    pub from_version: u32,
    /// Version active after.
    pub to_version: u32,
}

/// A retirement of tenant key versions: versions below `to_min_version`
/// can no longer unwrap data keys. Written before the change takes effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRetirement {
    /// Tenant.
    pub tenant: String,
    /// Principal that ordered it.
    pub actor: String,
    /// The lowest usable version before.
    pub from_min_version: u32,
    /// The lowest usable version after.
    pub to_min_version: u32,
    /// Whether it was forced while data keys were still wrapped under the
    /// retired versions.
    pub forced: bool,
    /// Data keys still wrapped under the retired versions (their data
    /// becomes unreadable); 0 unless forced.
    pub data_keys_lost: u64,
}

/// A change of the active policy set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyChange {
    /// Principal (or `startup`) that installed it.
    pub actor: String,
    /// SHA-256 of the policy set.
    pub policy_sha256: Digest,
    /// Short description (file names, reason).
    pub summary: String,
}

/// What happened in a contract's life (kind 10's `step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ContractStep {
    /// A contract (version, pin) was registered.
    Registered,
    /// A contract was disabled.
    Disabled,
    /// An event triggered the contract and it was evaluated (`input_sha256`,
    /// `fuel_used`; `detail` says the condition's result).
    Evaluated,
    /// An action was decided allowed and queued for its connector (`detail`:
    /// the decision and the determining policies).
    ActionQueued,
    /// An action was decided denied and not taken (`detail`: why).
    ActionDenied,
    /// A connector completed an action.
    ActionCompleted,
    /// A connector reported an action failed (`detail`: why).
    ActionFailed,
    /// A failed action was scheduled again.
    ActionRetried,
    /// An obligation's deadline passed before it was completed (`detail`:
    /// who was told).
    Escalated,
    /// A pending action or deadline was cancelled (`detail`: why).
    Cancelled,
    /// An evaluation failed (a guest out of fuel, a trap; `detail`: why).
    Failed,
}

impl ContractStep {
    fn code(self) -> u8 {
        match self {
            ContractStep::Registered => 1,
            ContractStep::Disabled => 2,
            ContractStep::Evaluated => 3,
            ContractStep::ActionQueued => 4,
            ContractStep::ActionDenied => 5,
            ContractStep::ActionCompleted => 6,
            ContractStep::ActionFailed => 7,
            ContractStep::ActionRetried => 8,
            ContractStep::Escalated => 9,
            ContractStep::Cancelled => 10,
            ContractStep::Failed => 11,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => ContractStep::Registered,
            2 => ContractStep::Disabled,
            3 => ContractStep::Evaluated,
            4 => ContractStep::ActionQueued,
            5 => ContractStep::ActionDenied,
            6 => ContractStep::ActionCompleted,
            7 => ContractStep::ActionFailed,
            8 => ContractStep::ActionRetried,
            9 => ContractStep::Escalated,
            10 => ContractStep::Cancelled,
            11 => ContractStep::Failed,
            _ => return None,
        })
    }
}

/// One step of a CRM contract: its registration, an evaluation, an action
/// and what became of it. Its subject comes right after the tenant, as in
/// kinds 1–4 and 8, so a verifier can place it on a customer's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContractEvent {
    /// Tenant.
    pub tenant: String,
    /// The customer the step concerns; for registration and disabling the
    /// contract's registry subject (docs/ledger-format.md, kind 10); all
    /// zero for another step about no one customer.
    pub subject: Pseudonym,
    /// The contract's id.
    pub contract: String,
    /// Its version.
    pub version: u32,
    /// Its pin (SHA-256 of the manifest and the guest).
    pub contract_sha256: Digest,
    /// The instance (one triggering event's evaluation and its actions);
    /// 0 for registration and disabling.
    pub instance: u64,
    /// What happened.
    pub step: ContractStep,
    /// The action's id ("" when the step is not about one action).
    pub action: String,
    /// The principal that caused the step (the registering admin, the
    /// signalling service, the completing connector, or the contract's own
    /// workload principal).
    pub actor: String,
    /// SHA-256 of the evaluation's inputs (zero when none).
    pub input_sha256: Digest,
    /// Fuel the guest used (0 without a guest).
    pub fuel_used: u64,
    /// Decision and determining policies, or the reason.
    pub detail: String,
    /// SHA-256 of the lineage activity that recorded the step (zero if none).
    pub lineage: Digest,
}

/// The kind-specific body of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// Kind 1.
    ConsentGranted(Consent),
    /// Kind 2.
    ConsentWithdrawn(Consent),
    /// Kind 3.
    FieldRevealed(Reveal),
    /// Kind 4.
    CustomerErased(Erasure),
    /// Kind 5.
    TenantKeyRotated(KeyRotation),
    /// Kind 6.
    PolicyChanged(PolicyChange),
    /// Kind 7.
    JobRun(JobRun),
    /// Kind 8.
    FieldsWritten(Write),
    /// Kind 9.
    TenantKeyRetired(KeyRetirement),
    /// Kind 10.
    ContractEvent(ContractEvent),
    /// A kind this version does not know: kept as bytes so that old
    /// verifiers still verify newer logs.
    Unknown {
        /// The kind byte.
        code: u8,
        /// The raw body, hex in JSON.
        #[serde(serialize_with = "hex_bytes")]
        body: Vec<u8>,
    },
}

fn hex_bytes<S: serde::Serializer>(b: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(b))
}

impl Body {
    /// The kind byte.
    pub fn code(&self) -> u8 {
        match self {
            Body::ConsentGranted(_) => 1,
            Body::ConsentWithdrawn(_) => 2,
            Body::FieldRevealed(_) => 3,
            Body::CustomerErased(_) => 4,
            Body::TenantKeyRotated(_) => 5,
            Body::PolicyChanged(_) => 6,
            Body::JobRun(_) => 7,
            Body::FieldsWritten(_) => 8,
            Body::TenantKeyRetired(_) => 9,
            Body::ContractEvent(_) => 10,
            Body::Unknown { code, .. } => *code,
        }
    }

    /// The customer this entry is about, if any.
    pub fn subject(&self) -> Option<&Pseudonym> {
        match self {
            Body::ConsentGranted(c) | Body::ConsentWithdrawn(c) => Some(&c.subject),
            Body::FieldRevealed(r) => Some(&r.subject),
            Body::CustomerErased(e) => Some(&e.subject),
            Body::FieldsWritten(w) => Some(&w.subject),
            Body::ContractEvent(c) if c.subject.0 != [0; 32] => Some(&c.subject),
            _ => None,
        }
    }

    /// The tenant this entry belongs to; `None` for server-wide entries
    /// (policy changes, which govern every tenant) and for kinds this
    /// version does not know.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Body::ConsentGranted(c) | Body::ConsentWithdrawn(c) => Some(&c.tenant),
            Body::FieldRevealed(r) => Some(&r.tenant),
            Body::CustomerErased(e) => Some(&e.tenant),
            Body::TenantKeyRotated(k) => Some(&k.tenant),
            Body::TenantKeyRetired(k) => Some(&k.tenant),
            Body::JobRun(j) => Some(&j.tenant),
            Body::FieldsWritten(w) => Some(&w.tenant),
            Body::ContractEvent(c) => Some(&c.tenant),
            Body::PolicyChanged(_) | Body::Unknown { .. } => None,
        }
    }

    /// Whether a principal of `tenant` may read this entry: its own
    /// tenant's entries and the server-wide policy changes. Entries of
    /// other tenants, and kinds this version cannot attribute, are not.
    pub fn visible_to(&self, tenant: &str) -> bool {
        match self.tenant() {
            Some(t) => t == tenant,
            None => matches!(self, Body::PolicyChanged(_)),
        }
    }

    /// The lineage activity this entry anchors, if any.
    pub fn lineage(&self) -> Option<&Digest> {
        let d = match self {
            Body::FieldRevealed(r) => &r.lineage,
            Body::CustomerErased(e) => &e.lineage,
            Body::JobRun(j) => &j.lineage,
            Body::FieldsWritten(w) => &w.lineage,
            Body::ContractEvent(c) => &c.lineage,
            _ => return None,
        };
        (d.0 != [0; 32]).then_some(d)
    }

    /// The consent this entry sets, if it is a consent entry.
    pub fn consent(&self) -> Option<(&Consent, ConsentAction)> {
        match self {
            Body::ConsentGranted(c) => Some((c, ConsentAction::Grant)),
            Body::ConsentWithdrawn(c) => Some((c, ConsentAction::Withdraw)),
            _ => None,
        }
    }

    fn encode_into(&self, w: &mut Writer, version: u8) -> Result<()> {
        if self.code() > last_kind(version) && !matches!(self, Body::Unknown { .. }) {
            return Err(LedgerError::invalid(format!(
                "entry: kind {} does not exist in format {version}",
                self.code()
            )));
        }
        match self {
            Body::ConsentGranted(c) | Body::ConsentWithdrawn(c) => encode_consent(w, c),
            Body::FieldRevealed(r) => encode_reveal(w, r, version),
            Body::CustomerErased(e) => encode_erasure(w, e, version),
            Body::JobRun(j) => encode_job_run(w, j),
            Body::FieldsWritten(x) => encode_write(w, x),
            Body::TenantKeyRotated(k) => encode_key_rotation(w, k),
            Body::TenantKeyRetired(k) => encode_key_retirement(w, k),
            Body::PolicyChanged(p) => encode_policy_change(w, p),
            Body::ContractEvent(c) => encode_contract_event(w, c),
            Body::Unknown { code, body } => encode_unknown(w, *code, body, version),
        }
    }

    fn decode(code: u8, b: &[u8], version: u8) -> Result<Body> {
        let mut r = Reader { b, at: 0 };
        let body = match code {
            1 | 2 => {
                let c = decode_consent(&mut r)?;
                if code == 1 {
                    Body::ConsentGranted(c)
                } else {
                    Body::ConsentWithdrawn(c)
                }
            }
            3 => Body::FieldRevealed(decode_reveal(&mut r, version)?),
            4 => Body::CustomerErased(decode_erasure(&mut r, version)?),
            7 if version >= 2 => Body::JobRun(decode_job_run(&mut r)?),
            8 if version >= 2 => Body::FieldsWritten(decode_write(&mut r)?),
            5 => Body::TenantKeyRotated(decode_key_rotation(&mut r)?),
            9 if version >= 2 => Body::TenantKeyRetired(decode_key_retirement(&mut r)?),
            6 => Body::PolicyChanged(decode_policy_change(&mut r)?),
            10 if version >= 2 => Body::ContractEvent(decode_contract_event(&mut r)?),
            0 => return Err(malformed("kind 0 is not a kind".to_string())),
            code => {
                r.at = b.len();
                Body::Unknown {
                    code,
                    body: b.to_vec(),
                }
            }
        };
        if r.at != b.len() {
            return Err(malformed(format!(
                "{} trailing bytes after the body",
                b.len() - r.at
            )));
        }
        Ok(body)
    }
}

/// Writes the lineage anchor of kinds 3 and 4. Format 1 has no lineage
/// anchors: such an entry can be written again only as it was.
fn encode_anchor(w: &mut Writer, d: &Digest, version: u8) -> Result<()> {
    if version >= 2 {
        w.digest(d);
    } else if d.0 != [0; 32] {
        return Err(LedgerError::invalid(
            "entry: format 1 cannot carry a lineage anchor",
        ));
    }
    Ok(())
}

/// Kinds 1 and 2.
fn encode_consent(w: &mut Writer, c: &Consent) -> Result<()> {
    w.str("tenant", &c.tenant)?;
    w.digest(&c.subject);
    w.str("purpose", &c.purpose)?;
    w.str("channel", &c.channel)?;
    w.str("legal_basis", &c.legal_basis)?;
    w.str("notice_version", &c.notice_version)?;
    w.digest(&c.evidence_sha256);
    w.str("actor", &c.actor)?;
    Ok(())
}

/// Kind 3.
fn encode_reveal(w: &mut Writer, r: &Reveal, version: u8) -> Result<()> {
    w.str("tenant", &r.tenant)?;
    w.digest(&r.subject);
    w.str("actor", &r.actor)?;
    w.str("role", &r.role)?;
    w.str("purpose", &r.purpose)?;
    w.u8(match r.decision {
        Decision::Allowed => 1,
        Decision::Denied => 2,
    });
    w.str("reason", &r.reason)?;
    if r.fields.len() > MAX_FIELDS {
        return Err(LedgerError::invalid(format!(
            "entry: {} fields; at most {MAX_FIELDS}",
            r.fields.len()
        )));
    }
    // INVARIANT: MAX_FIELDS fits in u16.
    w.u16(r.fields.len() as u16);
    for f in &r.fields {
        w.str("field", &f.field)?;
        w.u8(match f.disclosure {
            Disclosure::Plaintext => 1,
            Disclosure::Masked => 2,
            Disclosure::Withheld => 3,
        });
    }
    encode_anchor(w, &r.lineage, version)
}

/// Kind 4.
fn encode_erasure(w: &mut Writer, e: &Erasure, version: u8) -> Result<()> {
    w.str("tenant", &e.tenant)?;
    w.digest(&e.subject);
    w.str("actor", &e.actor)?;
    encode_anchor(w, &e.lineage, version)
}

/// Kind 7.
fn encode_job_run(w: &mut Writer, j: &JobRun) -> Result<()> {
    w.str("tenant", &j.tenant)?;
    w.str("actor", &j.actor)?;
    w.str("job_id", &j.job_id)?;
    w.digest(&j.spec_sha256);
    w.str("purpose", &j.purpose)?;
    w.u64(j.cohort_size);
    w.digest(&j.output_sha256);
    w.digest(&j.lineage);
    Ok(())
}

/// Kind 10.
fn encode_contract_event(w: &mut Writer, c: &ContractEvent) -> Result<()> {
    w.str("tenant", &c.tenant)?;
    w.digest(&c.subject);
    w.str("contract", &c.contract)?;
    w.u32(c.version);
    w.digest(&c.contract_sha256);
    w.u64(c.instance);
    w.u8(c.step.code());
    w.str("action", &c.action)?;
    w.str("actor", &c.actor)?;
    w.digest(&c.input_sha256);
    w.u64(c.fuel_used);
    w.str("detail", &c.detail)?;
    w.digest(&c.lineage);
    Ok(())
}

/// Kind 8.
fn encode_write(w: &mut Writer, x: &Write) -> Result<()> {
    w.str("tenant", &x.tenant)?;
    w.digest(&x.subject);
    w.str("actor", &x.actor)?;
    w.str("channel", &x.channel)?;
    if x.fields.len() > MAX_FIELDS {
        return Err(LedgerError::invalid(format!(
            "entry: {} fields; at most {MAX_FIELDS}",
            x.fields.len()
        )));
    }
    // INVARIANT: MAX_FIELDS fits in u16.
    w.u16(x.fields.len() as u16);
    for f in &x.fields {
        w.str("field", &f.field)?;
        w.u64(f.version);
    }
    w.digest(&x.lineage);
    Ok(())
}

/// Kind 5.
fn encode_key_rotation(w: &mut Writer, k: &KeyRotation) -> Result<()> {
    w.str("tenant", &k.tenant)?;
    w.str("actor", &k.actor)?;
    w.u32(k.from_version);
    w.u32(k.to_version);
    Ok(())
}

/// Kind 9.
fn encode_key_retirement(w: &mut Writer, k: &KeyRetirement) -> Result<()> {
    w.str("tenant", &k.tenant)?;
    w.str("actor", &k.actor)?;
    w.u32(k.from_min_version);
    w.u32(k.to_min_version);
    w.u8(u8::from(k.forced));
    w.u64(k.data_keys_lost);
    Ok(())
}

/// Kind 6.
fn encode_policy_change(w: &mut Writer, p: &PolicyChange) -> Result<()> {
    w.str("actor", &p.actor)?;
    w.digest(&p.policy_sha256);
    w.str("summary", &p.summary)?;
    Ok(())
}

/// A kind this version does not know: its raw body, as it was read.
fn encode_unknown(w: &mut Writer, code: u8, body: &[u8], version: u8) -> Result<()> {
    let last = last_kind(version);
    if (0..=last).contains(&code) {
        return Err(LedgerError::invalid(format!(
            "entry: kind {code} is not an unknown kind (0 is invalid, 1..={last} are known)"
        )));
    }
    w.buf.extend_from_slice(body);
    Ok(())
}

/// Reads the lineage anchor of kinds 3 and 4 (zero in format 1, which has
/// none).
fn decode_anchor(r: &mut Reader<'_>, version: u8) -> Result<Digest> {
    if version >= 2 {
        r.digest("lineage")
    } else {
        Ok(Digest::default())
    }
}

/// Kinds 1 and 2.
fn decode_consent(r: &mut Reader<'_>) -> Result<Consent> {
    Ok(Consent {
        tenant: r.str("tenant")?,
        subject: r.digest("subject")?,
        purpose: r.str("purpose")?,
        channel: r.str("channel")?,
        legal_basis: r.str("legal_basis")?,
        notice_version: r.str("notice_version")?,
        evidence_sha256: r.digest("evidence_sha256")?,
        actor: r.str("actor")?,
    })
}

/// Kind 3.
fn decode_reveal(r: &mut Reader<'_>, version: u8) -> Result<Reveal> {
    let tenant = r.str("tenant")?;
    let subject = r.digest("subject")?;
    let actor = r.str("actor")?;
    let role = r.str("role")?;
    let purpose = r.str("purpose")?;
    let decision = match r.u8("decision")? {
        1 => Decision::Allowed,
        2 => Decision::Denied,
        d => return Err(malformed(format!("unknown decision {d}"))),
    };
    let reason = r.str("reason")?;
    let n = usize::from(r.u16("field count")?);
    if n > MAX_FIELDS {
        return Err(malformed(format!("{n} fields; at most {MAX_FIELDS}")));
    }
    let mut fields = Vec::with_capacity(n.min(r.b.len()));
    for _ in 0..n {
        let field = r.str("field")?;
        let disclosure = match r.u8("disclosure")? {
            1 => Disclosure::Plaintext,
            2 => Disclosure::Masked,
            3 => Disclosure::Withheld,
            d => return Err(malformed(format!("unknown disclosure {d}"))),
        };
        fields.push(FieldAccess { field, disclosure });
    }
    Ok(Reveal {
        tenant,
        subject,
        actor,
        role,
        purpose,
        decision,
        reason,
        fields,
        lineage: decode_anchor(r, version)?,
    })
}

/// Kind 4.
fn decode_erasure(r: &mut Reader<'_>, version: u8) -> Result<Erasure> {
    Ok(Erasure {
        tenant: r.str("tenant")?,
        subject: r.digest("subject")?,
        actor: r.str("actor")?,
        lineage: decode_anchor(r, version)?,
    })
}

/// Kind 7 (format 2 on).
fn decode_job_run(r: &mut Reader<'_>) -> Result<JobRun> {
    Ok(JobRun {
        tenant: r.str("tenant")?,
        actor: r.str("actor")?,
        job_id: r.str("job_id")?,
        spec_sha256: r.digest("spec_sha256")?,
        purpose: r.str("purpose")?,
        cohort_size: r.u64("cohort_size")?,
        output_sha256: r.digest("output_sha256")?,
        lineage: r.digest("lineage")?,
    })
}

/// Kind 10 (format 2 on).
fn decode_contract_event(r: &mut Reader<'_>) -> Result<ContractEvent> {
    let tenant = r.str("tenant")?;
    let subject = r.digest("subject")?;
    let contract = r.str("contract")?;
    let version = r.u32("version")?;
    let contract_sha256 = r.digest("contract_sha256")?;
    let instance = r.u64("instance")?;
    let code = r.u8("step")?;
    let step = ContractStep::from_code(code)
        .ok_or_else(|| malformed(format!("`step` is {code}; 1 to 11")))?;
    Ok(ContractEvent {
        tenant,
        subject,
        contract,
        version,
        contract_sha256,
        instance,
        step,
        action: r.str("action")?,
        actor: r.str("actor")?,
        input_sha256: r.digest("input_sha256")?,
        fuel_used: r.u64("fuel_used")?,
        detail: r.str("detail")?,
        lineage: r.digest("lineage")?,
    })
}

/// Kind 8 (format 2 on).
fn decode_write(r: &mut Reader<'_>) -> Result<Write> {
    let tenant = r.str("tenant")?;
    let subject = r.digest("subject")?;
    let actor = r.str("actor")?;
    let channel = r.str("channel")?;
    let n = usize::from(r.u16("field count")?);
    if n > MAX_FIELDS {
        return Err(malformed(format!("{n} fields; at most {MAX_FIELDS}")));
    }
    let mut fields = Vec::with_capacity(n.min(r.b.len()));
    for _ in 0..n {
        fields.push(WrittenField {
            field: r.str("field")?,
            version: r.u64("version")?,
        });
    }
    Ok(Write {
        tenant,
        subject,
        actor,
        channel,
        fields,
        lineage: r.digest("lineage")?,
    })
}

/// Kind 5.
fn decode_key_rotation(r: &mut Reader<'_>) -> Result<KeyRotation> {
    Ok(KeyRotation {
        tenant: r.str("tenant")?,
        actor: r.str("actor")?,
        from_version: r.u32("from_version")?,
        to_version: r.u32("to_version")?,
    })
}

/// Kind 9 (format 2 on).
fn decode_key_retirement(r: &mut Reader<'_>) -> Result<KeyRetirement> {
    Ok(KeyRetirement {
        tenant: r.str("tenant")?,
        actor: r.str("actor")?,
        from_min_version: r.u32("from_min_version")?,
        to_min_version: r.u32("to_min_version")?,
        forced: match r.u8("forced")? {
            0 => false,
            1 => true,
            b => return Err(malformed(format!("`forced` is {b}; 0 or 1"))),
        },
        data_keys_lost: r.u64("data_keys_lost")?,
    })
}

/// Kind 6.
fn decode_policy_change(r: &mut Reader<'_>) -> Result<PolicyChange> {
    Ok(PolicyChange {
        actor: r.str("actor")?,
        policy_sha256: r.digest("policy_sha256")?,
        summary: r.str("summary")?,
    })
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// The format it is encoded in: [`FORMAT_VERSION`] for every entry this
    /// build appends; [`OLDEST_FORMAT_VERSION`] for entries read from a log
    /// written before lineage anchors.
    pub format: u8,
    /// Position in the log (0-based); equals its Merkle leaf index.
    pub seq: u64,
    /// When it was appended (ms since the Unix epoch).
    pub timestamp_ms: u64,
    /// RFC 9162 leaf hash of the previous entry; zero for the first.
    pub prev_hash: Digest,
    /// What happened.
    #[serde(flatten)]
    pub body: Body,
}

fn malformed(m: String) -> LedgerError {
    LedgerError::invalid(format!("entry encoding: {m}"))
}

impl Entry {
    /// The canonical encoding.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut w = Writer {
            buf: Vec::with_capacity(160),
        };
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&self.format) {
            return Err(LedgerError::invalid(format!(
                "entry: format version {}; this build writes {OLDEST_FORMAT_VERSION}..={FORMAT_VERSION}",
                self.format
            )));
        }
        w.u8(self.format);
        w.u8(self.body.code());
        w.u64(self.seq);
        w.u64(self.timestamp_ms);
        w.digest(&self.prev_hash);
        w.u32(0); // body length, patched below
        self.body.encode_into(&mut w, self.format)?;
        let body_len = w.buf.len() - HEADER_LEN;
        if w.buf.len() > MAX_ENTRY_LEN {
            return Err(LedgerError::invalid(format!(
                "entry: {} bytes encoded; at most {MAX_ENTRY_LEN}",
                w.buf.len()
            )));
        }
        // INVARIANT: body_len <= MAX_ENTRY_LEN, far below u32::MAX.
        w.buf[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&(body_len as u32).to_be_bytes());
        Ok(w.buf)
    }

    /// Decodes an entry, accepting only the canonical encoding.
    pub fn decode(b: &[u8]) -> Result<Entry> {
        if b.len() > MAX_ENTRY_LEN {
            return Err(malformed(format!(
                "{} bytes; at most {MAX_ENTRY_LEN}",
                b.len()
            )));
        }
        if b.len() < HEADER_LEN {
            return Err(malformed(format!(
                "{} bytes is shorter than the {HEADER_LEN}-byte header",
                b.len()
            )));
        }
        let mut r = Reader { b, at: 0 };
        let version = r.u8("version")?;
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(malformed(format!(
                "format version {version}; this build reads versions {OLDEST_FORMAT_VERSION}..={FORMAT_VERSION}"
            )));
        }
        let code = r.u8("kind")?;
        let seq = r.u64("seq")?;
        let timestamp_ms = r.u64("timestamp")?;
        let prev_hash = r.digest("prev_hash")?;
        let len = r.u32("body length")? as usize;
        if len != b.len() - HEADER_LEN {
            return Err(malformed(format!(
                "body length says {len} bytes but {} follow",
                b.len() - HEADER_LEN
            )));
        }
        let body = Body::decode(code, &b[HEADER_LEN..], version)?;
        Ok(Entry {
            format: version,
            seq,
            timestamp_ms,
            prev_hash,
            body,
        })
    }
}

struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    fn digest(&mut self, d: &Digest) {
        self.buf.extend_from_slice(&d.0);
    }
    fn str(&mut self, what: &str, s: &str) -> Result<()> {
        if s.len() > MAX_STRING_LEN {
            return Err(LedgerError::invalid(format!(
                "entry field `{what}`: {} bytes; at most {MAX_STRING_LEN}",
                s.len()
            )));
        }
        if s.chars().any(char::is_control) {
            return Err(LedgerError::invalid(format!(
                "entry field `{what}`: control characters are not allowed"
            )));
        }
        // Bidirectional controls make a name display as another (an
        // `admin` that reads `nimda`): refused in what the log records.
        if let Some(c) = s.chars().find(|&c| is_bidi_control(c)) {
            return Err(LedgerError::invalid(format!(
                "entry field `{what}`: bidirectional control U+{:04X} is not allowed",
                u32::from(c)
            )));
        }
        // INVARIANT: MAX_STRING_LEN fits in u16.
        self.u16(s.len() as u16);
        self.buf.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, what: &str, n: usize) -> Result<&[u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| malformed(format!("truncated at `{what}`")))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(what, 1)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        let s = self.take(what, 2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let s = self.take(what, 4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let s = self.take(what, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    fn digest(&mut self, what: &str) -> Result<Digest> {
        let s = self.take(what, 32)?;
        let mut a = [0u8; 32];
        a.copy_from_slice(s);
        Ok(Digest(a))
    }
    fn str(&mut self, what: &str) -> Result<String> {
        let n = usize::from(self.u16(what)?);
        if n > MAX_STRING_LEN {
            return Err(malformed(format!(
                "`{what}` is {n} bytes; at most {MAX_STRING_LEN}"
            )));
        }
        let s = self.take(what, n)?;
        let s = std::str::from_utf8(s).map_err(|_| malformed(format!("`{what}` is not UTF-8")))?;
        if s.chars().any(char::is_control) {
            return Err(malformed(format!("`{what}` holds control characters")));
        }
        Ok(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn consent(purpose: &str) -> Body {
        Body::ConsentGranted(Consent {
            tenant: "acme".into(),
            subject: Digest([7; 32]),
            purpose: purpose.into(),
            channel: "web".into(),
            legal_basis: "consent".into(),
            notice_version: "2026-01".into(),
            evidence_sha256: Digest([9; 32]),
            actor: "crm".into(),
        })
    }

    #[test]
    fn round_trips_every_kind() {
        let bodies = vec![
            consent("marketing"),
            Body::FieldRevealed(Reveal {
                tenant: "acme".into(),
                subject: Digest([1; 32]),
                actor: "crm".into(),
                role: "service".into(),
                purpose: "support".into(),
                decision: Decision::Allowed,
                reason: String::new(),
                fields: vec![
                    FieldAccess {
                        field: "phone".into(),
                        disclosure: Disclosure::Plaintext,
                    },
                    FieldAccess {
                        field: "national_id".into(),
                        disclosure: Disclosure::Masked,
                    },
                ],
                lineage: Digest([5; 32]),
            }),
            Body::CustomerErased(Erasure {
                tenant: "acme".into(),
                subject: Digest([2; 32]),
                actor: "admin".into(),
                lineage: Digest([6; 32]),
            }),
            Body::JobRun(JobRun {
                tenant: "acme".into(),
                actor: "crm".into(),
                job_id: "job-1".into(),
                spec_sha256: Digest([7; 32]),
                purpose: "lead_scoring".into(),
                cohort_size: 42,
                output_sha256: Digest([8; 32]),
                lineage: Digest([9; 32]),
            }),
            Body::FieldsWritten(Write {
                tenant: "acme".into(),
                subject: Digest([3; 32]),
                actor: "crm".into(),
                channel: "web".into(),
                fields: vec![WrittenField {
                    field: "phone".into(),
                    version: 2,
                }],
                lineage: Digest([4; 32]),
            }),
            Body::TenantKeyRotated(KeyRotation {
                tenant: "acme".into(),
                actor: "admin".into(),
                from_version: 1,
                to_version: 2,
            }),
            Body::PolicyChanged(PolicyChange {
                actor: "startup".into(),
                policy_sha256: Digest([3; 32]),
                summary: "default".into(),
            }),
            Body::TenantKeyRetired(KeyRetirement {
                tenant: "acme".into(),
                actor: "admin".into(),
                from_min_version: 1,
                to_min_version: 3,
                forced: true,
                data_keys_lost: 12,
            }),
            Body::ContractEvent(ContractEvent {
                tenant: "acme".into(),
                subject: Digest([4; 32]),
                contract: "poc-activation".into(),
                version: 2,
                contract_sha256: Digest([5; 32]),
                instance: 17,
                step: ContractStep::Escalated,
                action: "raise_receivable".into(),
                actor: "poc-activation".into(),
                input_sha256: Digest([6; 32]),
                fuel_used: 1234,
                detail: "department:customer_success_director".into(),
                lineage: Digest([7; 32]),
            }),
            Body::Unknown {
                code: 200,
                body: vec![1, 2, 3],
            },
        ];
        for (i, body) in bodies.into_iter().enumerate() {
            let e = Entry {
                format: FORMAT_VERSION,
                seq: i as u64,
                timestamp_ms: 1_700_000_000_000,
                prev_hash: Digest([i as u8; 32]),
                body,
            };
            let b = e.encode().unwrap();
            assert_eq!(Entry::decode(&b).unwrap(), e);
        }
    }

    #[test]
    fn a_contract_event_has_its_subject_after_the_tenant_and_a_bounded_step() {
        let ev = ContractEvent {
            tenant: "acme".into(),
            subject: Digest([9; 32]),
            contract: "c".into(),
            version: 1,
            contract_sha256: Digest([1; 32]),
            instance: 0,
            step: ContractStep::Registered,
            action: String::new(),
            actor: "admin".into(),
            input_sha256: Digest::default(),
            fuel_used: 0,
            detail: String::new(),
            lineage: Digest::default(),
        };
        let e = Entry {
            format: FORMAT_VERSION,
            seq: 0,
            timestamp_ms: 1,
            prev_hash: Digest::default(),
            body: Body::ContractEvent(ev.clone()),
        };
        let b = e.encode().unwrap();
        // The subject sits where kinds 1-4 and 8 keep theirs: after the
        // header and the tenant string (2-byte length, "acme").
        assert_eq!(&b[HEADER_LEN + 6..HEADER_LEN + 38], &[9; 32]);
        assert_eq!(e.body.subject(), Some(&Digest([9; 32])));
        // The step byte: after tenant, subject, contract ("c"), version,
        // pin and instance.
        let step_at = HEADER_LEN + 6 + 32 + 3 + 4 + 32 + 8;
        assert_eq!(b[step_at], 1);
        for bad in [0u8, 12, 255] {
            let mut m = b.clone();
            m[step_at] = bad;
            let err = Entry::decode(&m).unwrap_err().to_string();
            assert!(err.contains("`step`"), "{err}");
        }
        // No customer: no subject.
        let none = Body::ContractEvent(ContractEvent {
            subject: Digest::default(),
            ..ev
        });
        assert_eq!(none.subject(), None);
        assert_eq!(none.tenant(), Some("acme"));
        assert!(none.visible_to("acme") && !none.visible_to("other"));
    }

    #[test]
    fn rejects_non_canonical_and_hostile_bytes() {
        let e = Entry {
            format: FORMAT_VERSION,
            seq: 3,
            timestamp_ms: 5,
            prev_hash: Digest::default(),
            body: consent("marketing"),
        };
        let b = e.encode().unwrap();
        let mut trailing = b.clone();
        trailing.push(0);
        assert!(Entry::decode(&trailing).is_err());
        assert!(Entry::decode(&b[..b.len() - 1]).is_err());
        let mut v3 = b.clone();
        v3[0] = 3;
        assert!(Entry::decode(&v3)
            .unwrap_err()
            .to_string()
            .contains("version 3"));
        let mut v0 = b.clone();
        v0[0] = 0;
        assert!(Entry::decode(&v0).is_err());
        let mut k0 = b.clone();
        k0[1] = 0;
        assert!(Entry::decode(&k0).is_err());
        assert!(Entry::decode(&[]).is_err());
        assert!(Entry::decode(&vec![1u8; MAX_ENTRY_LEN + 1]).is_err());
        // A string longer than the limit cannot be written.
        assert!(Entry {
            body: consent(&"x".repeat(MAX_STRING_LEN + 1)),
            ..e.clone()
        }
        .encode()
        .is_err());
        assert!(Entry {
            body: consent("a\nb"),
            ..e
        }
        .encode()
        .is_err());
    }

    #[test]
    fn format_1_entries_still_read_and_reencode_byte_for_byte() {
        let reveal = Body::FieldRevealed(Reveal {
            tenant: "acme".into(),
            subject: Digest([1; 32]),
            actor: "crm".into(),
            role: "service".into(),
            purpose: "support".into(),
            decision: Decision::Allowed,
            reason: String::new(),
            fields: vec![FieldAccess {
                field: "phone".into(),
                disclosure: Disclosure::Plaintext,
            }],
            lineage: Digest::default(),
        });
        let erase = Body::CustomerErased(Erasure {
            tenant: "acme".into(),
            subject: Digest([2; 32]),
            actor: "admin".into(),
            lineage: Digest::default(),
        });
        for body in [reveal.clone(), erase, consent("marketing")] {
            let e = Entry {
                format: 1,
                seq: 4,
                timestamp_ms: 5,
                prev_hash: Digest([6; 32]),
                body,
            };
            let b = e.encode().unwrap();
            assert_eq!(b[0], 1);
            let d = Entry::decode(&b).unwrap();
            assert_eq!(d, e);
            assert_eq!(d.encode().unwrap(), b);
            // The same body in format 2 is 32 bytes longer for kinds 3 and 4.
            let v2 = Entry {
                format: 2,
                ..e.clone()
            }
            .encode()
            .unwrap();
            assert!(v2.len() == b.len() || v2.len() == b.len() + 32);
        }
        // Format 1 knows no anchors and no kinds 7 and 8.
        let anchored = match reveal {
            Body::FieldRevealed(r) => Body::FieldRevealed(Reveal {
                lineage: Digest([9; 32]),
                ..r
            }),
            b => b,
        };
        let e = Entry {
            format: 1,
            seq: 0,
            timestamp_ms: 0,
            prev_hash: Digest::default(),
            body: anchored,
        };
        assert!(e.encode().is_err());
        let mut k8 = Entry {
            format: 2,
            seq: 0,
            timestamp_ms: 0,
            prev_hash: Digest::default(),
            body: Body::FieldsWritten(Write {
                tenant: "acme".into(),
                subject: Digest([3; 32]),
                actor: "crm".into(),
                channel: "web".into(),
                fields: vec![],
                lineage: Digest([4; 32]),
            }),
        }
        .encode()
        .unwrap();
        assert!(Entry {
            format: 1,
            ..Entry::decode(&k8).unwrap()
        }
        .encode()
        .is_err());
        // Read as format 1, kind 8 is an unknown kind, kept as bytes.
        k8[0] = 1;
        assert!(matches!(
            Entry::decode(&k8).unwrap().body,
            Body::Unknown { code: 8, .. }
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Entry::decode(&bytes);
        }

        #[test]
        fn decode_of_mutated_entry_is_canonical_or_error(i in 0usize..150, bit in 0u8..8, purpose in "[a-z_]{1,40}") {
            let e = Entry { format: FORMAT_VERSION, seq: 1, timestamp_ms: 2, prev_hash: Digest([4; 32]), body: consent(&purpose) };
            let mut b = e.encode().unwrap();
            let i = i % b.len();
            b[i] ^= 1 << bit;
            if let Ok(d) = Entry::decode(&b) {
                // Whatever decodes re-encodes to the same bytes.
                prop_assert_eq!(d.encode().unwrap(), b);
            }
        }
    }
}
