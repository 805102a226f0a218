//! Loading and validating a policy set.
//!
//! Guarantees: a [`Policies`] value exists only if every file parsed, every
//! policy carries a unique `@id`, no file holds a template, and the whole
//! set passed Cedar's strict validation against `sovra.cedarschema`. Every
//! problem found is reported with its file, line and column. The set's
//! SHA-256 covers the schema and every file's name and bytes, so two sets
//! with the same hash are the same policies.
//!
//! Does not guarantee: that the policies say what their authors meant; the
//! table-driven tests and `sovra policy explain` are for that.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use cedar_policy::{PolicyId, PolicySet, Schema, ValidationMode, Validator};
use miette::Diagnostic;
use sha2::{Digest, Sha256};

use crate::error::{InvalidPoliciesError, PolicyIoError, Problem, Result};

/// The Cedar schema every policy set is validated against.
pub const SCHEMA: &str = include_str!("../sovra.cedarschema");
/// The schema's file name, for messages.
pub const SCHEMA_FILE: &str = "sovra.cedarschema";

/// The default policy set, compiled in: (file name, text).
pub const DEFAULT_FILES: &[(&str, &str)] = &[
    (
        "00-purpose.cedar",
        include_str!("../default/00-purpose.cedar"),
    ),
    (
        "10-consent.cedar",
        include_str!("../default/10-consent.cedar"),
    ),
    (
        "20-sensitive.cedar",
        include_str!("../default/20-sensitive.cedar"),
    ),
    (
        "30-service.cedar",
        include_str!("../default/30-service.cedar"),
    ),
    (
        "40-officer.cedar",
        include_str!("../default/40-officer.cedar"),
    ),
    (
        "45-lineage.cedar",
        include_str!("../default/45-lineage.cedar"),
    ),
    (
        "50-partner.cedar",
        include_str!("../default/50-partner.cedar"),
    ),
    ("60-admin.cedar", include_str!("../default/60-admin.cedar")),
    (
        "70-schema.cedar",
        include_str!("../default/70-schema.cedar"),
    ),
    (
        "80-export.cedar",
        include_str!("../default/80-export.cedar"),
    ),
    (
        "90-sandbox.cedar",
        include_str!("../default/90-sandbox.cedar"),
    ),
    (
        "92-release.cedar",
        include_str!("../default/92-release.cedar"),
    ),
    (
        "95-contracts.cedar",
        include_str!("../default/95-contracts.cedar"),
    ),
];

/// Largest policy file accepted.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Most policy files in one set.
pub const MAX_FILES: usize = 256;
/// Longest policy id.
const MAX_ID_LEN: usize = 128;

/// Where a policy came from.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Its file.
    pub file: String,
    /// The line its text starts on (1-based; 0 when unknown).
    pub line: usize,
}

/// A validated policy set, ready to evaluate.
#[derive(Debug)]
pub struct Policies {
    pub(crate) set: PolicySet,
    pub(crate) schema: Schema,
    pub(crate) actions: Vec<cedar_policy::EntityUid>,
    /// The set sliced by (action, principal kind): only the policies whose
    /// scope can match. See [`Policies::slice`].
    pub(crate) sliced: Vec<PolicySet>,
    pub(crate) cache: crate::authorize::EntityCache,
    origins: BTreeMap<String, Origin>,
    files: Vec<String>,
    sha256: [u8; 32],
    warnings: Vec<String>,
}

impl Policies {
    /// The default policy set compiled into the binary.
    pub fn embedded() -> Result<Policies> {
        Policies::from_files(
            DEFAULT_FILES
                .iter()
                .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
                .collect(),
        )
    }

    /// Loads every `*.cedar` file of `dir` (other files are ignored), in
    /// name order.
    pub fn load_dir(dir: &Path) -> Result<Policies> {
        let rd = std::fs::read_dir(dir).map_err(|e| PolicyIoError::new(dir, e))?;
        let mut paths = Vec::new();
        for e in rd {
            let e = e.map_err(|e| PolicyIoError::new(dir, e))?;
            let p = e.path();
            if p.extension().is_some_and(|x| x == "cedar") && p.is_file() {
                paths.push(p);
            }
        }
        if paths.len() > MAX_FILES {
            return Err(PolicyIoError::new(
                dir,
                format!("{} policy files; the limit is {MAX_FILES}", paths.len()),
            )
            .into());
        }
        paths.sort();
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let meta = std::fs::metadata(&p).map_err(|e| PolicyIoError::new(&p, e))?;
            if meta.len() > MAX_FILE_BYTES as u64 {
                return Err(PolicyIoError::new(
                    &p,
                    format!("{} bytes; the limit is {MAX_FILE_BYTES}", meta.len()),
                )
                .into());
            }
            let bytes = std::fs::read(&p).map_err(|e| PolicyIoError::new(&p, e))?;
            let text = String::from_utf8(bytes)
                .map_err(|e| PolicyIoError::new(&p, format!("not UTF-8 text ({e})")))?;
            let name = p
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            files.push((name, text));
        }
        Policies::from_files(files)
    }

    /// Parses and validates a set given as (file name, text) pairs.
    pub fn from_files(files: Vec<(String, String)>) -> Result<Policies> {
        let schema = parse_schema()?;
        let mut problems = check_file_count(&files)?;
        let mut collected = Collected::new();
        for (fi, (file, text)) in files.iter().enumerate() {
            collected.add_file(fi, file, text, &mut problems);
        }
        let Collected {
            set,
            origins,
            texts,
            hasher,
        } = collected;
        if problems.is_empty() {
            problems.extend(validation_errors(&schema, &set, &files, &texts));
        }
        if !problems.is_empty() {
            return Err(InvalidPoliciesError::new(problems).into());
        }
        let warnings = validation_warnings(&schema, &set, &files, &texts);
        let mut actions = Vec::with_capacity(crate::Action::ALL.len());
        for a in crate::Action::ALL {
            actions.push(crate::authorize::action_uid(a)?);
        }
        let sliced = slice(&set, &actions)?;
        let policies = Policies {
            set,
            schema,
            actions,
            sliced,
            // Conservative: a mention anywhere (even in a comment) keys
            // cached decisions on the time.
            cache: crate::authorize::EntityCache::new(
                files.iter().any(|(_, t)| t.contains("time_ms")),
            ),
            origins,
            files: files.into_iter().map(|(f, _)| f).collect(),
            sha256: hasher.finalize().into(),
            warnings,
        };
        policies.self_check()?;
        Ok(policies)
    }

    /// Hex SHA-256 of the set (schema, file names and contents).
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// The files the set was loaded from, in load order.
    pub fn files(&self) -> &[String] {
        &self.files
    }

    /// Policy ids with their origin, by id.
    pub fn policies(&self) -> impl Iterator<Item = (&str, &Origin)> {
        self.origins.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The ids of the policies whose text reads attribute `attr` of any
    /// entity (`.attr` or `["attr"]`), sorted. An over-approximation of
    /// "the decision may depend on `attr`": a policy not listed cannot
    /// read it.
    pub fn policies_reading(&self, attr: &str) -> Vec<String> {
        let dotted = format!(".{attr}");
        let indexed = format!("[\"{attr}\"]");
        let mut ids: Vec<String> = self
            .set
            .policies()
            .filter(|p| {
                let text = p.to_string();
                text.match_indices(&dotted).any(|(i, _)| {
                    // `.kind` but not `.kinds`.
                    !text[i + dotted.len()..]
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
                }) || text.contains(&indexed)
            })
            .filter_map(|p| p.annotation("id").map(str::to_owned))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.origins.len()
    }

    /// Whether the set holds no policies (never true for a loaded set).
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// Validator warnings (e.g. a policy that can never apply), located.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// The compiled-in schema, parsed.
fn parse_schema() -> Result<Schema> {
    let (schema, _) = Schema::from_cedarschema_str(SCHEMA).map_err(|e| {
        InvalidPoliciesError::new(vec![Problem::new(
            SCHEMA_FILE,
            SCHEMA,
            first_offset(&e),
            e.to_string(),
        )])
    })?;
    Ok(schema)
}

/// The problems with the number of files: none is one problem (returned
/// for the caller to report with the others), too many an error at once.
fn check_file_count(files: &[(String, String)]) -> Result<Vec<Problem>> {
    let mut problems = Vec::new();
    if files.is_empty() {
        problems.push(Problem::new(
            "(policy directory)",
            "",
            None,
            "no `.cedar` files: with no policies everything would be denied".into(),
        ));
    }
    if files.len() > MAX_FILES {
        problems.push(Problem::new(
            "(policy directory)",
            "",
            None,
            format!("{} files; the limit is {MAX_FILES}", files.len()),
        ));
        return Err(InvalidPoliciesError::new(problems).into());
    }
    Ok(problems)
}

/// The policies of the files read so far, where each came from, and the
/// hash of everything read.
struct Collected {
    set: PolicySet,
    origins: BTreeMap<String, Origin>,
    // For validation messages: policy id -> (file, text).
    texts: BTreeMap<String, usize>,
    hasher: Sha256,
}

impl Collected {
    /// Nothing read yet; the hash covers the schema.
    fn new() -> Collected {
        let mut hasher = Sha256::new();
        hasher.update(b"sovra-policy-set v1\n");
        hash_part(&mut hasher, SCHEMA_FILE.as_bytes());
        hash_part(&mut hasher, SCHEMA.as_bytes());
        Collected {
            set: PolicySet::new(),
            origins: BTreeMap::new(),
            texts: BTreeMap::new(),
            hasher,
        }
    }

    /// Hashes file `fi` and adds its policies, recording what is wrong with
    /// it in `problems`.
    fn add_file(&mut self, fi: usize, file: &str, text: &str, problems: &mut Vec<Problem>) {
        hash_part(&mut self.hasher, file.as_bytes());
        hash_part(&mut self.hasher, text.as_bytes());
        if text.len() > MAX_FILE_BYTES {
            problems.push(Problem::new(
                file,
                "",
                None,
                format!("{} bytes; the limit is {MAX_FILE_BYTES}", text.len()),
            ));
            return;
        }
        let parsed = match PolicySet::from_str(text) {
            Ok(s) => s,
            Err(errs) => {
                for e in errs.iter() {
                    problems.push(Problem::new(file, text, first_offset(e), e.to_string()));
                }
                return;
            }
        };
        if parsed.templates().next().is_some() {
            problems.push(Problem::new(
                file,
                text,
                None,
                "templates (policies with ?principal or ?resource slots) are not supported".into(),
            ));
        }
        for p in parsed.policies() {
            self.add_policy(fi, file, text, p, problems);
        }
    }

    /// Adds one policy of file `fi` under its `@id`, if it has a valid one
    /// no other policy has taken.
    fn add_policy(
        &mut self,
        fi: usize,
        file: &str,
        text: &str,
        p: &cedar_policy::Policy,
        problems: &mut Vec<Problem>,
    ) {
        let start = policy_offset(p, text);
        let Some(id) = p.annotation("id") else {
            problems.push(Problem::new(
                file,
                text,
                start,
                "policy has no `@id(\"...\")` annotation; every policy needs a unique id".into(),
            ));
            return;
        };
        if !is_policy_id(id) {
            problems.push(Problem::new(
                file,
                text,
                start,
                format!(
                    "policy id must be 1 to {MAX_ID_LEN} characters of A-Z, a-z, 0-9, `-`, `_`, `.`"
                ),
            ));
            return;
        }
        if let Some(o) = self.origins.get(id) {
            problems.push(Problem::new(
                file,
                text,
                start,
                format!(
                    "duplicate policy id `{id}` (first in {}:{})",
                    o.file, o.line
                ),
            ));
            return;
        }
        let line = Problem::new(file, text, start, String::new()).line();
        self.origins.insert(
            id.to_owned(),
            Origin {
                file: file.to_owned(),
                line,
            },
        );
        self.texts.insert(id.to_owned(), fi);
        if let Err(e) = self.set.add(p.new_id(PolicyId::new(id))) {
            problems.push(Problem::new(file, text, start, e.to_string()));
        }
    }
}

/// Whether `id` is 1 to [`MAX_ID_LEN`] characters of A-Z, a-z, 0-9, `-`,
/// `_`, `.`.
fn is_policy_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The file (name, text) policy `id` came from, for messages.
fn source_of<'a>(
    files: &'a [(String, String)],
    texts: &BTreeMap<String, usize>,
    id: &str,
) -> (&'a str, &'a str) {
    texts
        .get(id)
        .and_then(|i| files.get(*i))
        .map_or(("(unknown file)", ""), |(f, t)| (f.as_str(), t.as_str()))
}

/// The errors of Cedar's strict validation of `set` against `schema`.
fn validation_errors(
    schema: &Schema,
    set: &PolicySet,
    files: &[(String, String)],
    texts: &BTreeMap<String, usize>,
) -> Vec<Problem> {
    let v = Validator::new(schema.clone()).validate(set, ValidationMode::Strict);
    v.validation_errors()
        .map(|e| {
            let (file, text) = source_of(files, texts, e.policy_id().to_string().as_str());
            Problem::new(
                file,
                text,
                first_offset(e),
                format!("policy `{}`: {e}", e.policy_id()),
            )
        })
        .collect()
}

/// The warnings of Cedar's strict validation of `set` against `schema`,
/// as messages.
fn validation_warnings(
    schema: &Schema,
    set: &PolicySet,
    files: &[(String, String)],
    texts: &BTreeMap<String, usize>,
) -> Vec<String> {
    let v = Validator::new(schema.clone()).validate(set, ValidationMode::Strict);
    v.validation_warnings()
        .map(|w| {
            let (file, text) = source_of(files, texts, w.policy_id().to_string().as_str());
            Problem::new(
                file,
                text,
                first_offset(w),
                format!("policy `{}`: {w}", w.policy_id()),
            )
            .to_string()
        })
        .collect()
}

/// Index of the (action, principal kind) slice.
pub(crate) fn slice_index(action: crate::Action, kind: crate::PrincipalKind) -> usize {
    let k = crate::PrincipalKind::ALL
        .iter()
        .position(|x| *x == kind)
        .unwrap_or(0);
    action.index() * crate::PrincipalKind::ALL.len() + k
}

/// Splits the set by the scope of each policy, so that a request evaluates
/// only the policies that can apply to its action and principal type (Cedar
/// evaluates every policy of the set it is given, about 2 µs each).
///
/// INVARIANT: the schema declares no action groups and no principal
/// parents, so `action in [A, B]` holds exactly for A and B, and
/// `principal in P` / `principal == P` only for principals of P's type. A
/// policy left out of a slice could therefore never be satisfied by a
/// request in it, and each slice decides exactly as the whole set does
/// (a unit test compares them).
fn slice(set: &PolicySet, actions: &[cedar_policy::EntityUid]) -> Result<Vec<PolicySet>> {
    use cedar_policy::{ActionConstraint, PrincipalConstraint};
    let mut out = Vec::new();
    for (ai, a) in crate::Action::ALL.iter().enumerate() {
        let auid = &actions[ai.min(actions.len().saturating_sub(1))];
        for k in crate::PrincipalKind::ALL {
            debug_assert_eq!(out.len(), slice_index(*a, k));
            let ty = format!("Sovra::{}", k.type_name());
            let mut part = PolicySet::new();
            for p in set.policies() {
                let action_ok = match p.action_constraint() {
                    ActionConstraint::Any => true,
                    ActionConstraint::Eq(u) => &u == auid,
                    ActionConstraint::In(us) => us.iter().any(|u| u == auid),
                };
                let principal_ok = match p.principal_constraint() {
                    PrincipalConstraint::Any => true,
                    PrincipalConstraint::Is(t) | PrincipalConstraint::IsIn(t, _) => {
                        t.to_string() == ty
                    }
                    PrincipalConstraint::Eq(u) | PrincipalConstraint::In(u) => {
                        u.type_name().to_string() == ty
                    }
                };
                if action_ok && principal_ok {
                    part.add(p.clone()).map_err(|e| {
                        InvalidPoliciesError::new(vec![Problem::new(
                            "(policy set)",
                            "",
                            None,
                            e.to_string(),
                        )])
                    })?;
                }
            }
            out.push(part);
        }
    }
    Ok(out)
}

fn hash_part(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// The offset of a diagnostic's first label, if it has one.
fn first_offset(d: &dyn Diagnostic) -> Option<usize> {
    d.labels()
        .and_then(|mut l| l.next())
        .map(|l| l.offset())
        .or_else(|| d.related().and_then(|mut r| r.find_map(first_offset)))
}

/// Where a parsed policy's text starts in its file. Cedar does not expose a
/// policy's source span, but a policy parsed from text displays as that
/// text, so it can be found again.
fn policy_offset(p: &cedar_policy::Policy, text: &str) -> Option<usize> {
    let shown = p.to_string();
    let shown = shown.trim();
    if shown.is_empty() {
        return None;
    }
    text.find(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_set_is_valid_and_stable() {
        let a = Policies::embedded().unwrap();
        let b = Policies::embedded().unwrap();
        assert_eq!(a.sha256_hex(), b.sha256_hex());
        assert!(a.len() >= 15, "{}", a.len());
        assert!(a.warnings().is_empty(), "{:?}", a.warnings());
        for (id, o) in a.policies() {
            assert!(o.line > 0, "{id} has no line");
        }
    }
}
