//! Lineage answers as text for a terminal: a tree from the current version
//! back to the origin, access lists and derivations. Shows what the answers
//! hold (keyed hashes, pseudonym-free activities), so it prints no value.

use std::fmt::Write as _;

use sovra_proto::lineage::v1 as pb;

use crate::lineage::openlineage::rfc3339_ms as time;
use crate::lineage::{subtype_name, type_name};

fn short(hash: &str) -> String {
    match hash.get(..16) {
        Some(head) if hash.len() > 16 => format!("{head}…"),
        _ => hash.to_owned(),
    }
}

/// The activity kind as a word.
pub fn kind(k: i32) -> &'static str {
    use pb::ActivityKind as K;
    match K::try_from(k).unwrap_or(K::Unspecified) {
        K::Collect => "collected",
        K::Update => "updated",
        K::Transform => "transformed",
        K::Compute => "computed",
        K::Reveal => "read",
        K::Export => "exported",
        K::Erase => "erased",
        K::Unspecified => "unknown",
    }
}

fn decision(d: i32) -> &'static str {
    if d == pb::Decision::Denied as i32 {
        "DENIED"
    } else {
        "allowed"
    }
}

fn transformation(t: Option<&pb::Transformation>) -> String {
    let Some(t) = t else {
        return String::new();
    };
    let mut s = format!("{} {}", type_name(t), subtype_name(t));
    if t.masking {
        s.push_str(" masked");
    }
    if !t.description.is_empty() {
        let _ = write!(s, " ({})", t.description);
    }
    s
}

fn agent(a: &pb::Activity) -> String {
    let mut s = format!("by {} ({})", a.agent, a.role);
    if !a.purpose.is_empty() {
        let _ = write!(s, " for {}", a.purpose);
    }
    let _ = write!(s, ", {}", decision(a.decision));
    if !a.policies.is_empty() {
        let _ = write!(s, " by {}", a.policies.join(", "));
    }
    if !a.job_id.is_empty() {
        let _ = write!(s, ", job {} (spec {})", a.job_id, short(&a.spec_sha256));
    }
    s
}

/// The lineage of one field: newest version first, down to the origin.
pub fn field_tree(customer: &str, l: &pb::FieldLineage) -> String {
    let mut out = format!("{} of customer {customer}\n", l.field);
    let n = l.versions.len();
    for (i, v) in l.versions.iter().rev().enumerate() {
        let last = i + 1 == n;
        let (branch, cont) = if last {
            ("└─", "   ")
        } else {
            ("├─", "│  ")
        };
        let origin = if v.version == 1 { "  (origin)" } else { "" };
        let _ = writeln!(
            out,
            "{branch} v{}  value hash {}{origin}",
            v.version,
            short(&v.value_hash)
        );
        if let Some(a) = &v.generated_by {
            let _ = write!(out, "{cont}  {} {}", kind(a.kind), time(a.time_ms));
            if let Some(o) = &a.origin {
                let _ = write!(out, " via {} (collector {}", o.channel, o.collector);
                if !o.consent_ref.is_empty() {
                    let _ = write!(out, ", consent {}", o.consent_ref);
                }
                out.push(')');
            }
            out.push('\n');
            let _ = writeln!(out, "{cont}  {}", agent(a));
            if let Some(g) = a.generated.iter().find(|g| g.field == l.field) {
                let t = transformation(g.transformation.as_ref());
                if !t.is_empty() {
                    let _ = writeln!(out, "{cont}  transformation: {t}");
                }
            }
        }
        for d in &v.derived_from {
            let _ = writeln!(
                out,
                "{cont}  derived from {} v{}: {}",
                d.field,
                d.version,
                transformation(d.transformation.as_ref())
            );
        }
    }
    out
}

/// Accesses, one per line, oldest first.
pub fn accesses(field: &str, list: &[pb::AnchoredActivity]) -> String {
    let mut out = String::new();
    for a in list {
        let Some(act) = &a.activity else { continue };
        let how = act
            .used
            .iter()
            .find(|u| u.field == field)
            .map_or("", |u| u.disclosure.as_str());
        let _ = writeln!(
            out,
            "{}  {:<9} {:<9} {}  [ledger entry {}]",
            time(act.time_ms),
            kind(act.kind),
            how,
            agent(act),
            a.ledger_index
        );
    }
    if out.is_empty() {
        out.push_str("(no accesses in the range)\n");
    }
    out
}

/// What was computed from a field.
pub fn derived(field: &str, list: &[pb::AnchoredActivity]) -> String {
    let mut out = String::new();
    for a in list {
        let Some(act) = &a.activity else { continue };
        let _ = writeln!(
            out,
            "{}  {}  [ledger entry {}]",
            time(act.time_ms),
            agent(act),
            a.ledger_index
        );
        for g in &act.generated {
            let how = g
                .derived_from
                .iter()
                .find(|d| d.field == field)
                .map(|d| transformation(d.transformation.as_ref()))
                .unwrap_or_default();
            let scope = if act.subject.is_empty() {
                format!("aggregate over {} customers", act.cohort_size)
            } else {
                format!("v{}", g.version)
            };
            let _ = writeln!(out, "  → {} {scope}: {how}", g.field);
        }
    }
    if out.is_empty() {
        let _ = writeln!(out, "(nothing was computed from {field})");
    }
    out
}
