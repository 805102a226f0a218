//! The tenant schema: which fields exist, their types, sensitivity, blind
//! indexes, masks and limits, declared in TOML rather than code.
//!
//! Guarantees: every value that reaches storage has passed
//! [`Schema::normalise`]: its field is declared, its type matches, it is
//! normalised (phone to E.164, email to lower case, GB/T 4754 code to upper
//! case) and within the field's size or range limit. Values live in
//! [`FieldValue`], which zeroizes on drop and never prints its contents.
//!
//! Does not guarantee: that a value is true, only that it is well-formed.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Result, VaultError};

/// The default CRM customer schema shipped with Sovra.
pub const DEFAULT_SCHEMA: &str = include_str!("../schema/crm_customer.toml");

/// A field's value type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// UTF-8 text.
    String,
    /// A signed 64-bit integer.
    Integer,
    /// Milliseconds since the Unix epoch.
    Timestamp,
}

impl FieldType {
    /// The name used in schema files and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Integer => "integer",
            FieldType::Timestamp => "timestamp",
        }
    }
}

/// How sensitive a field is; the access rules key on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sensitivity {
    /// May be shown to anyone authorised to read the record.
    Public,
    /// Business data without direct personal reference.
    Internal,
    /// Personal data.
    Personal,
    /// Special or high-risk personal data (national id, finances).
    Sensitive,
}

impl Sensitivity {
    /// The name used in schema files and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Sensitivity::Public => "public",
            Sensitivity::Internal => "internal",
            Sensitivity::Personal => "personal",
            Sensitivity::Sensitive => "sensitive",
        }
    }
}

/// Normalisation applied to string fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Trimmed text.
    #[default]
    Plain,
    /// A phone number, normalised to E.164.
    Phone,
    /// An email address, normalised to lower case.
    Email,
    /// A GB/T 4754-2017 industry classification code (e.g. `I65`, `C3911`).
    Gbt4754,
}

impl Format {
    fn as_str(self) -> &'static str {
        match self {
            Format::Plain => "plain",
            Format::Phone => "phone",
            Format::Email => "email",
            Format::Gbt4754 => "gbt4754",
        }
    }
}

/// How a value is shown when it is not revealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    /// Shown as is (only for public data).
    None,
    /// Replaced by `[redacted]`.
    Redact,
    /// Only the first `n` characters shown.
    First(u8),
    /// Only the last `n` characters shown.
    Last(u8),
    /// First character of the local part and the domain shown.
    Email,
}

impl Mask {
    fn parse(s: &str) -> Option<Mask> {
        match s {
            "none" => Some(Mask::None),
            "redact" => Some(Mask::Redact),
            "email" => Some(Mask::Email),
            _ => {
                let (kind, n) = if let Some(n) = s.strip_prefix("first") {
                    (true, n)
                } else {
                    (false, s.strip_prefix("last")?)
                };
                let n: u8 = n.parse().ok().filter(|n| (1..=16).contains(n))?;
                Some(if kind { Mask::First(n) } else { Mask::Last(n) })
            }
        }
    }

    /// The name used in schema files and the API.
    pub fn name(&self) -> String {
        match self {
            Mask::None => "none".into(),
            Mask::Redact => "redact".into(),
            Mask::Email => "email".into(),
            Mask::First(n) => format!("first{n}"),
            Mask::Last(n) => format!("last{n}"),
        }
    }

    /// Applies the mask. Hides at least half of any value so that a short
    /// value is never shown whole by `firstN`/`lastN`.
    pub fn apply(&self, value: &FieldValue) -> String {
        let text = Zeroizing::new(value.display_string());
        let chars: Vec<char> = text.chars().collect();
        let shown_max = chars.len() / 2;
        match *self {
            Mask::None => text.to_string(),
            Mask::Redact => "[redacted]".into(),
            Mask::First(n) => {
                let k = usize::from(n).min(shown_max);
                let mut s: String = chars[..k].iter().collect();
                s.extend(std::iter::repeat_n('*', chars.len() - k));
                s
            }
            Mask::Last(n) => {
                let k = usize::from(n).min(shown_max);
                let mut s: String = std::iter::repeat_n('*', chars.len() - k).collect();
                s.extend(&chars[chars.len() - k..]);
                s
            }
            Mask::Email => match text.split_once('@') {
                Some((local, domain)) => {
                    let first: String = local.chars().take(1).collect();
                    format!("{first}***@{domain}")
                }
                None => "[redacted]".into(),
            },
        }
    }
}

/// A field value, normalised. Zeroized on drop; `Debug` shows no content.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub enum FieldValue {
    /// A string value.
    Text(String),
    /// An integer value.
    Integer(i64),
    /// A timestamp (ms since the Unix epoch).
    Timestamp(i64),
}

impl fmt::Debug for FieldValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            FieldValue::Text(_) => "Text",
            FieldValue::Integer(_) => "Integer",
            FieldValue::Timestamp(_) => "Timestamp",
        };
        write!(f, "FieldValue::{kind}(<redacted>)")
    }
}

impl FieldValue {
    /// The canonical bytes sealed in storage: a type tag then the payload.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::new());
        match self {
            FieldValue::Text(s) => {
                out.push(1);
                out.extend_from_slice(s.as_bytes());
            }
            FieldValue::Integer(i) => {
                out.push(2);
                out.extend_from_slice(&i.to_be_bytes());
            }
            FieldValue::Timestamp(t) => {
                out.push(3);
                out.extend_from_slice(&t.to_be_bytes());
            }
        }
        out
    }

    /// Parses [`FieldValue::to_bytes`] output; `None` if malformed.
    pub fn from_bytes(bytes: &[u8]) -> Option<FieldValue> {
        let (tag, rest) = bytes.split_first()?;
        match tag {
            1 => std::str::from_utf8(rest)
                .ok()
                .map(|s| FieldValue::Text(s.to_owned())),
            2 => Some(FieldValue::Integer(i64::from_be_bytes(
                rest.try_into().ok()?,
            ))),
            3 => Some(FieldValue::Timestamp(i64::from_be_bytes(
                rest.try_into().ok()?,
            ))),
            _ => None,
        }
    }

    /// The bytes the blind index hashes: the normalised value without tag.
    pub fn index_bytes(&self) -> Zeroizing<Vec<u8>> {
        let b = self.to_bytes();
        Zeroizing::new(b[1..].to_vec())
    }

    /// A display form, for masking.
    fn display_string(&self) -> String {
        match self {
            FieldValue::Text(s) => s.clone(),
            FieldValue::Integer(i) | FieldValue::Timestamp(i) => i.to_string(),
        }
    }
}

/// One declared field.
#[derive(Debug, Clone)]
pub struct FieldDef {
    /// The field's name.
    pub name: String,
    /// Its type.
    pub ty: FieldType,
    /// Its sensitivity class.
    pub sensitivity: Sensitivity,
    /// Whether a blind index is kept.
    pub indexed: bool,
    /// Its mask.
    pub mask: Mask,
    /// For strings: maximum length in bytes after normalisation.
    pub max_len: u32,
    /// For strings: normalisation.
    pub format: Format,
    /// For integers and timestamps: inclusive range.
    pub min: i64,
    /// See `min`.
    pub max: i64,
    /// Human description.
    pub description: String,
    /// The department that owns the field ("" for none; never "" for
    /// sensitive fields).
    pub department: String,
    /// The purposes the field may be used for.
    pub purposes: BTreeSet<String>,
    /// The field as the policy engine sees it.
    pub policy: sovra_policy::FieldAttrs,
    /// Set for integer fields that are also model features: kept as TFHE
    /// ciphertexts for the sandbox, quantised.
    pub feature: Option<FeatureQuant>,
}

/// How an integer field is quantised as a model feature: value / quantum,
/// capped at max (values are never negative: features need min ≥ 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureQuant {
    /// Units per step (10,000 for a budget in units of 10,000 CNY).
    pub quantum: i64,
    /// Largest quantised value (values above are capped).
    #[serde(default = "default_feature_max")]
    pub max: u32,
}

fn default_feature_max() -> u32 {
    1023
}

/// The largest quantised value a feature may declare.
pub const MAX_FEATURE_VALUE: u32 = 65_535;

impl FeatureQuant {
    /// The quantised value of `v`.
    pub fn quantise(&self, v: i64) -> i64 {
        (v.max(0) / self.quantum.max(1)).min(i64::from(self.max))
    }
}

/// A tenant schema.
#[derive(Debug, Clone)]
pub struct Schema {
    name: String,
    version: u32,
    default_region: phonenumber::country::Id,
    purposes: BTreeSet<String>,
    fields: Vec<FieldDef>,
    by_name: HashMap<String, usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    name: String,
    version: u32,
    #[serde(default = "default_region")]
    default_phone_region: String,
    purposes: Vec<String>,
    fields: Vec<RawField>,
}

fn default_region() -> String {
    "CN".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    name: String,
    #[serde(rename = "type")]
    ty: FieldType,
    sensitivity: Sensitivity,
    #[serde(default)]
    indexed: bool,
    #[serde(default = "default_mask")]
    mask: String,
    max_len: Option<u32>,
    #[serde(default)]
    format: Format,
    min: Option<i64>,
    max: Option<i64>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    department: String,
    purposes: Option<Vec<String>>,
    feature: Option<FeatureQuant>,
}

fn default_mask() -> String {
    "redact".into()
}

/// Longest string value any schema may allow.
pub const MAX_STRING_LEN: u32 = 64 * 1024;
/// Most fields a schema may declare.
pub const MAX_FIELDS: usize = 256;

pub(crate) fn is_identifier(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && s.as_bytes()[0].is_ascii_lowercase()
}

impl Schema {
    /// Parses and validates a schema. `origin` names the source in errors.
    /// The model features the sandbox may compute on, with their largest
    /// quantised values.
    pub fn feature_catalog(&self) -> Vec<sovra_sandbox::FeatureInfo> {
        self.fields
            .iter()
            .filter_map(|f| {
                f.feature.map(|q| sovra_sandbox::FeatureInfo {
                    name: f.name.clone(),
                    max: q.max,
                })
            })
            .collect()
    }

    pub fn parse(text: &str, origin: &str) -> Result<Schema> {
        let raw: RawSchema = toml::from_str(text)
            .map_err(|e| VaultError::config(origin, format!("invalid schema: {e}")))?;
        let bad = |msg: String| VaultError::config(origin, msg);
        let default_region: phonenumber::country::Id =
            raw.default_phone_region.parse().map_err(|_| {
                bad(format!(
                    "unknown default_phone_region `{}`",
                    raw.default_phone_region
                ))
            })?;
        if raw.fields.is_empty() || raw.fields.len() > MAX_FIELDS {
            return Err(bad(format!("a schema declares 1 to {MAX_FIELDS} fields")));
        }
        let mut purposes = BTreeSet::new();
        for p in raw.purposes {
            if !is_identifier(&p, 64) {
                return Err(bad(format!(
                    "purpose `{p}` must be 1 to 64 characters of [a-z0-9_], starting with a letter"
                )));
            }
            purposes.insert(p);
        }
        if purposes.is_empty() {
            return Err(bad("a schema declares at least one purpose".into()));
        }
        let mut fields: Vec<FieldDef> = Vec::new();
        let mut by_name = HashMap::new();
        for f in raw.fields {
            let def = field_def(f, &purposes, origin)?;
            if by_name.insert(def.name.clone(), fields.len()).is_some() {
                return Err(bad(format!("field `{}` is declared twice", def.name)));
            }
            fields.push(def);
        }
        if fields.iter().filter(|f| f.feature.is_some()).count() > 64 {
            return Err(bad("a schema declares at most 64 model features".into()));
        }
        Ok(Schema {
            name: raw.name,
            version: raw.version,
            default_region,
            purposes,
            fields,
            by_name,
        })
    }

    /// The default CRM customer schema.
    pub fn default_crm() -> Schema {
        // INVARIANT: the embedded default schema is valid; a unit test parses it.
        match Schema::parse(DEFAULT_SCHEMA, "embedded default schema") {
            Ok(s) => s,
            Err(e) => unreachable!("embedded default schema is invalid: {e}"),
        }
    }

    /// Loads a schema file.
    pub fn load(path: &Path) -> Result<Schema> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| VaultError::config(&shown, format!("cannot read schema: {e}")))?;
        Schema::parse(&text, &shown)
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The schema's version.
    pub fn version(&self) -> u32 {
        self.version
    }
    /// The fields, in declaration order.
    pub fn fields(&self) -> &[FieldDef] {
        &self.fields
    }
    /// The declared purposes.
    pub fn purposes(&self) -> impl Iterator<Item = &str> {
        self.purposes.iter().map(String::as_str)
    }

    /// Looks up a field, or fails naming it.
    pub fn field(&self, name: &str) -> Result<&FieldDef> {
        self.by_name
            .get(name)
            .map(|&i| &self.fields[i])
            .ok_or_else(|| {
                let shown: String = name.chars().take(64).collect();
                VaultError::invalid(
                    format!("fields.{shown}"),
                    "unknown field: not declared in the schema (see DescribeSchema)",
                )
            })
    }

    /// Checks that a purpose is declared.
    pub fn check_purpose(&self, purpose: &str) -> Result<()> {
        if purpose.is_empty() {
            return Err(VaultError::invalid(
                "purpose",
                "a read must declare its purpose (one of the schema's purposes)",
            ));
        }
        if !self.purposes.contains(purpose) {
            let shown: String = purpose.chars().take(64).collect();
            return Err(VaultError::invalid(
                "purpose",
                format!(
                    "unknown purpose `{shown}`; declared purposes: {}",
                    self.purposes.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Validates and normalises a typed input for `field`.
    pub fn normalise(&self, field: &FieldDef, input: RawValue) -> Result<FieldValue> {
        self.normalise_ref(field, &input)
    }

    /// [`Schema::normalise`] without taking the input, so the caller can
    /// tell whether normalisation changed it.
    pub fn normalise_ref(&self, field: &FieldDef, input: &RawValue) -> Result<FieldValue> {
        let subject = format!("fields.{}", field.name);
        let wrong = |got: &str| {
            VaultError::invalid(
                &subject,
                format!("expected a {} value, got {got}", field.ty.as_str()),
            )
        };
        match (field.ty, input) {
            (FieldType::String, RawValue::Text(s)) => {
                let v = self.normalise_text(field, s.trim(), &subject)?;
                if v.len() > field.max_len as usize {
                    return Err(VaultError::invalid(
                        &subject,
                        format!(
                            "value is {} bytes, over the field's limit of {}",
                            v.len(),
                            field.max_len
                        ),
                    ));
                }
                Ok(FieldValue::Text(v))
            }
            (FieldType::Integer, RawValue::Integer(i))
            | (FieldType::Timestamp, RawValue::Timestamp(i)) => {
                let i = *i;
                if i < field.min || i > field.max {
                    return Err(VaultError::invalid(
                        &subject,
                        format!(
                            "value out of the field's range {}..={}",
                            field.min, field.max
                        ),
                    ));
                }
                Ok(if field.ty == FieldType::Integer {
                    FieldValue::Integer(i)
                } else {
                    FieldValue::Timestamp(i)
                })
            }
            (_, RawValue::Text(_)) => Err(wrong("text")),
            (_, RawValue::Integer(_)) => Err(wrong("integer")),
            (_, RawValue::Timestamp(_)) => Err(wrong("timestamp")),
            (_, RawValue::Missing) => Err(VaultError::invalid(
                &subject,
                "value is empty (no variant set)",
            )),
        }
    }

    fn normalise_text(&self, field: &FieldDef, s: &str, subject: &str) -> Result<String> {
        if s.is_empty() {
            return Err(VaultError::invalid(subject, "value is empty"));
        }
        // Cheap guard before parsers see hostile input.
        if s.len() > field.max_len as usize * 4 + 64 {
            return Err(VaultError::invalid(
                subject,
                format!(
                    "value is {} bytes, over the field's limit of {}",
                    s.len(),
                    field.max_len
                ),
            ));
        }
        if s.chars().any(|c| c.is_control()) {
            return Err(VaultError::invalid(
                subject,
                "value contains control characters",
            ));
        }
        match field.format {
            Format::Plain => Ok(s.to_owned()),
            Format::Email => {
                let lower = s.to_lowercase();
                let ok = match lower.split_once('@') {
                    Some((local, domain)) => {
                        !local.is_empty()
                            && local.len() <= 64
                            && !domain.contains('@')
                            && domain.contains('.')
                            && !domain.starts_with('.')
                            && !domain.ends_with('.')
                            && !domain.contains("..")
                            && !lower.chars().any(char::is_whitespace)
                    }
                    None => false,
                };
                if !ok {
                    return Err(VaultError::invalid(subject, "not a valid email address"));
                }
                Ok(lower)
            }
            Format::Phone => {
                let parsed = phonenumber::parse(Some(self.default_region), s).map_err(|_| {
                    VaultError::invalid(
                        subject,
                        "not a phone number that can be normalised to E.164",
                    )
                })?;
                if !phonenumber::is_valid(&parsed) {
                    return Err(VaultError::invalid(
                        subject,
                        "not a valid phone number for its region",
                    ));
                }
                Ok(parsed.format().mode(phonenumber::Mode::E164).to_string())
            }
            Format::Gbt4754 => {
                let up = s.to_ascii_uppercase();
                let b = up.as_bytes();
                let ok = (b'A'..=b'T').contains(&b[0])
                    && matches!(b.len(), 1 | 3 | 4 | 5)
                    && b[1..].iter().all(u8::is_ascii_digit);
                if !ok {
                    return Err(VaultError::invalid(
                        subject,
                        "not a GB/T 4754-2017 industry code (a section letter A-T, optionally followed by 2, 3 or 4 digits)",
                    ));
                }
                Ok(up)
            }
        }
    }
}

/// One field's definition, validated against the schema's purposes.
fn field_def(f: RawField, purposes: &BTreeSet<String>, origin: &str) -> Result<FieldDef> {
    let bad = |msg: String| VaultError::config(origin, msg);
    if !is_identifier(&f.name, 64) {
        return Err(bad(format!(
            "field name `{}` must be 1 to 64 characters of [a-z0-9_], starting with a letter",
            f.name
        )));
    }
    let mask = Mask::parse(&f.mask).ok_or_else(|| {
        bad(format!(
            "field `{}`: unknown mask `{}` (none, redact, email, firstN, lastN with N 1..16)",
            f.name, f.mask
        ))
    })?;
    if mask == Mask::None && f.sensitivity > Sensitivity::Internal {
        return Err(bad(format!(
            "field `{}`: mask `none` is only allowed for public or internal fields",
            f.name
        )));
    }
    let (max_len, min, max) = field_bounds(&f, &bad)?;
    if !f.department.is_empty() && !is_identifier(&f.department, 64) {
        return Err(bad(format!(
            "field `{}`: department `{}` must be 1 to 64 characters of [a-z0-9_], starting with a letter",
            f.name, f.department
        )));
    }
    // INVARIANT: sensitive fields have an owning department, so the
    // policy "revealed only to the owning department" never matches
    // a principal that has no department ("").
    if f.sensitivity == Sensitivity::Sensitive && f.department.is_empty() {
        return Err(bad(format!(
            "field `{}`: sensitive fields need an owning `department`",
            f.name
        )));
    }
    let field_purposes = field_purposes(&f, purposes, &bad)?;
    if let Some(q) = &f.feature {
        if f.ty != FieldType::Integer || min < 0 {
            return Err(bad(format!(
                "field `{}`: only integer fields with min >= 0 can be model features",
                f.name
            )));
        }
        if q.quantum < 1 || q.max == 0 || q.max > MAX_FEATURE_VALUE {
            return Err(bad(format!(
                "field `{}`: feature quantum must be >= 1 and max 1..={MAX_FEATURE_VALUE}",
                f.name
            )));
        }
    }
    Ok(FieldDef {
        name: f.name.clone(),
        ty: f.ty,
        sensitivity: f.sensitivity,
        indexed: f.indexed,
        mask,
        max_len,
        format: f.format,
        min,
        max,
        description: f.description,
        policy: sovra_policy::FieldAttrs {
            name: f.name.clone(),
            sensitivity: f.sensitivity.as_str().to_owned(),
            department: f.department.clone(),
            purposes: field_purposes.clone(),
        },
        department: f.department,
        purposes: field_purposes,
        feature: f.feature,
    })
}

/// A field's length or numeric bounds: `(max_len, min, max)`.
fn field_bounds(f: &RawField, bad: &impl Fn(String) -> VaultError) -> Result<(u32, i64, i64)> {
    Ok(match f.ty {
        FieldType::String => {
            let max_len = f
                .max_len
                .ok_or_else(|| bad(format!("field `{}`: string fields need max_len", f.name)))?;
            if max_len == 0 || max_len > MAX_STRING_LEN {
                return Err(bad(format!(
                    "field `{}`: max_len must be 1..={MAX_STRING_LEN}",
                    f.name
                )));
            }
            if f.min.is_some() || f.max.is_some() {
                return Err(bad(format!(
                    "field `{}`: min/max apply to integers only",
                    f.name
                )));
            }
            (max_len, 0, 0)
        }
        FieldType::Integer | FieldType::Timestamp => {
            if f.format != Format::Plain || f.max_len.is_some() {
                return Err(bad(format!(
                    "field `{}`: format and max_len apply to strings only",
                    f.name
                )));
            }
            let min = f.min.unwrap_or(if f.ty == FieldType::Timestamp {
                0
            } else {
                i64::MIN
            });
            let max = f.max.unwrap_or(i64::MAX);
            if min > max {
                return Err(bad(format!("field `{}`: min is above max", f.name)));
            }
            (0, min, max)
        }
    })
}

/// The purposes a field allows: the schema's, or a subset of them.
fn field_purposes(
    f: &RawField,
    purposes: &BTreeSet<String>,
    bad: &impl Fn(String) -> VaultError,
) -> Result<BTreeSet<String>> {
    Ok(match &f.purposes {
        None => purposes.clone(),
        Some(list) => {
            let mut set = BTreeSet::new();
            for p in list {
                if !purposes.contains(p) {
                    return Err(bad(format!(
                        "field `{}`: purpose `{p}` is not among the schema's purposes",
                        f.name
                    )));
                }
                set.insert(p.clone());
            }
            set
        }
    })
}

/// A value as received, before validation.
#[derive(Zeroize, ZeroizeOnDrop)]
pub enum RawValue {
    /// Text.
    Text(String),
    /// Integer.
    Integer(i64),
    /// Timestamp.
    Timestamp(i64),
    /// No variant was set.
    Missing,
}

impl FieldDef {
    /// The field's format name.
    pub fn format_name(&self) -> &'static str {
        self.format.as_str()
    }
}

/// Longest customer id accepted.
pub const MAX_CUSTOMER_ID_LEN: usize = 128;

/// Checks an id (tenant, customer, channel…): 1..=`max` bytes of
/// `[A-Za-z0-9._:-]`.
pub fn validate_id(subject: &str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(VaultError::invalid(subject, "must not be empty"));
    }
    if value.len() > max {
        return Err(VaultError::invalid(
            subject,
            format!("is {} bytes long; the limit is {max}", value.len()),
        ));
    }
    // Bidirectional controls would make one name display as another (an
    // `admin` that reads `nimda`): named, so the caller knows what to fix.
    if let Some(c) = value
        .chars()
        .find(|&c| sovra_ledger::entry::is_bidi_control(c))
    {
        return Err(VaultError::invalid(
            subject,
            format!(
                "contains U+{:04X}, a bidirectional control character that makes names display as other names; \
                 identifiers may only contain letters, digits and . _ : -",
                u32::from(c)
            ),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        return Err(VaultError::invalid(
            subject,
            "may only contain letters, digits and . _ : -",
        ));
    }
    Ok(())
}

/// Where a value was collected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    /// Collection channel.
    pub channel: String,
    /// Collector.
    pub collector: String,
    /// Consent reference (may be empty).
    pub consent_ref: String,
}

/// A decrypted field with its metadata.
#[derive(Debug)]
pub struct Revealed<'s> {
    /// The field.
    pub def: &'s FieldDef,
    /// The plaintext value (zeroized on drop).
    pub value: FieldValue,
    /// The value version.
    pub version: u64,
    /// Where it was collected.
    pub source: Source,
    /// When it was written.
    pub collected_at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Hostile input never panics: every field either normalises within
        // its limits or is rejected with an error naming it.
        #[test]
        fn normalise_never_panics(s in "\\PC{0,300}", bytes in proptest::collection::vec(any::<u8>(), 0..64), i in any::<i64>()) {
            let schema = Schema::default_crm();
            let lossy = String::from_utf8_lossy(&bytes).into_owned();
            for f in schema.fields() {
                for raw in [RawValue::Text(s.clone()), RawValue::Text(lossy.clone()), RawValue::Text(format!("+{s}")), RawValue::Integer(i), RawValue::Timestamp(i)] {
                    match schema.normalise(f, raw) {
                        Ok(v) => {
                            if let FieldValue::Text(t) = &v {
                                prop_assert!(t.len() <= f.max_len as usize);
                            }
                            prop_assert_eq!(FieldValue::from_bytes(&v.to_bytes()), Some(v.clone()));
                            let _ = f.mask.apply(&v);
                        }
                        Err(e) => prop_assert!(e.to_string().contains(&f.name)),
                    }
                }
            }
        }

        #[test]
        fn masks_never_panic_and_hide_half(s in "\\PC{0,40}", n in 1u8..16) {
            let v = FieldValue::Text(s.clone());
            for m in [Mask::First(n), Mask::Last(n)] {
                let out = m.apply(&v);
                prop_assert_eq!(out.chars().count(), s.chars().count());
                let hidden = out.chars().filter(|&c| c == '*').count();
                prop_assert!(hidden * 2 >= s.chars().count());
            }
            let _ = Mask::Email.apply(&v);
        }
    }

    #[test]
    fn default_schema_is_valid_and_complete() {
        let s = Schema::default_crm();
        for f in [
            "name",
            "phone",
            "email",
            "national_id",
            "company",
            "industry_code",
            "region",
            "budget",
            "purchase_count",
            "last_contact_ms",
            "whitepaper_dwell_s",
        ] {
            assert!(s.field(f).is_ok(), "{f}");
        }
        assert!(s.field("phone").unwrap().indexed);
    }

    #[test]
    fn normalisation() {
        let s = Schema::default_crm();
        let phone = s.field("phone").unwrap();
        let v = s
            .normalise(phone, RawValue::Text("138 0013 8000".into()))
            .unwrap();
        assert_eq!(v, FieldValue::Text("+8613800138000".into()));
        let v = s
            .normalise(phone, RawValue::Text("+86 138-0013-8000".into()))
            .unwrap();
        assert_eq!(v, FieldValue::Text("+8613800138000".into()));
        assert!(s
            .normalise(phone, RawValue::Text("not a phone".into()))
            .is_err());
        assert!(s.normalise(phone, RawValue::Text("12".into())).is_err());
        let email = s.field("email").unwrap();
        assert_eq!(
            s.normalise(email, RawValue::Text(" Li.Wei@Example.COM ".into()))
                .unwrap(),
            FieldValue::Text("li.wei@example.com".into())
        );
        for bad in ["a@b", "@x.cn", "a@@x.cn", "a b@x.cn", "ab.cn"] {
            assert!(
                s.normalise(email, RawValue::Text(bad.into())).is_err(),
                "{bad}"
            );
        }
        let ind = s.field("industry_code").unwrap();
        assert_eq!(
            s.normalise(ind, RawValue::Text("i65".into())).unwrap(),
            FieldValue::Text("I65".into())
        );
        for bad in ["Z1", "I6", "I123456", "65"] {
            assert!(
                s.normalise(ind, RawValue::Text(bad.into())).is_err(),
                "{bad}"
            );
        }
        let budget = s.field("budget").unwrap();
        assert!(s.normalise(budget, RawValue::Text("5".into())).is_err());
        assert!(s.normalise(budget, RawValue::Integer(-1)).is_err());
        assert!(s.normalise(budget, RawValue::Integer(500_000)).is_ok());
        let name = s.field("name").unwrap();
        let e = s
            .normalise(name, RawValue::Text("x".repeat(1000)))
            .unwrap_err();
        assert!(e.to_string().contains("fields.name"), "{e}");
        assert!(s.normalise(name, RawValue::Text("a\u{0}b".into())).is_err());
        assert!(s.normalise(name, RawValue::Missing).is_err());
    }

    #[test]
    fn masks() {
        let v = FieldValue::Text("+8613800138000".into());
        assert_eq!(Mask::Last(4).apply(&v), "**********8000");
        assert_eq!(
            Mask::First(1).apply(&FieldValue::Text("Wang".into())),
            "W***"
        );
        assert_eq!(Mask::Last(4).apply(&FieldValue::Text("abc".into())), "**c");
        assert_eq!(
            Mask::Email.apply(&FieldValue::Text("li@x.cn".into())),
            "l***@x.cn"
        );
        assert_eq!(Mask::Redact.apply(&FieldValue::Integer(5)), "[redacted]");
        assert_eq!(Mask::Last(4).apply(&FieldValue::Text("".into())), "");
        assert_eq!(
            Mask::Last(2).apply(&FieldValue::Text("日本語電話".into())),
            "***電話"
        );
    }

    #[test]
    fn value_encoding_roundtrip() {
        for v in [
            FieldValue::Text("héllo".into()),
            FieldValue::Integer(-5),
            FieldValue::Timestamp(1),
        ] {
            assert_eq!(FieldValue::from_bytes(&v.to_bytes()), Some(v.clone()));
        }
        assert!(FieldValue::from_bytes(&[]).is_none());
        assert!(FieldValue::from_bytes(&[2, 1]).is_none());
        assert!(FieldValue::from_bytes(&[1, 0xff]).is_none());
        assert!(FieldValue::from_bytes(&[9]).is_none());
        assert!(!format!("{:?}", FieldValue::Text("secret".into())).contains("secret"));
    }

    #[test]
    fn bad_schemas_are_rejected_with_reasons() {
        let ok_field = "[[fields]]\nname='a'\ntype='string'\nsensitivity='personal'\nmax_len=10\n";
        let base = format!("name='x'\nversion=1\npurposes=['p']\n{ok_field}");
        assert!(Schema::parse(&base, "t").is_ok());
        for (bad, needle) in [
            ("name='x'\nversion=1\npurposes=['p']\n", "fields"),
            (&format!("{base}{ok_field}") as &str, "declared twice"),
            (&base.replace("max_len=10", "max_len=0"), "max_len"),
            (&base.replace("type='string'", "type='blob'"), "blob"),
            (&base.replace("name='a'", "name='A b'"), "field name"),
            (
                &base.replace("max_len=10", "max_len=10\nmask='last99'"),
                "mask",
            ),
            (
                &base.replace("max_len=10", "max_len=10\nmask='none'"),
                "mask `none`",
            ),
            (&base.replace("purposes=['p']", "purposes=[]"), "purpose"),
            (&format!("{base}bogus=1\n"), "bogus"),
        ] {
            let e = Schema::parse(bad, "schema.toml").unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("schema.toml"), "{e}");
        }
    }
}
