//! OpenLineage export: the tenant's aggregated field lineage as OpenLineage
//! 2-0-2 `RunEvent`s, one per job, with the `columnLineage` dataset facet
//! and Sovra's `sovra_access` run facet.
//!
//! Mapping (namespace `sovra://TENANT` throughout):
//! - `collect.CHANNEL`: input dataset `channel.CHANNEL`, output `crm.customer`,
//!   each collected field DIRECT from the same field of the channel
//!   (IDENTITY, or TRANSFORMATION where the vault normalised it);
//! - `reveal.PURPOSE` and `export.PURPOSE`: input `crm.customer`, output
//!   `purpose.PURPOSE`, each disclosed field DIRECT IDENTITY, `masking` set
//!   for masked reads;
//! - `sandbox.JOB`: input `crm.customer`, output `sandbox.JOB`, the output
//!   DIRECT TRANSFORMATION (per-customer scores) or INDIRECT AGGREGATION
//!   (aggregates) from each feature;
//! - `erase`: input `crm.customer`, no output.
//!
//! Guarantees: events are built only from [`pb::ExportLineageResponse`],
//! which holds no customer id, pseudonym, version or value hash, so no event
//! can carry one. Does not guarantee: hiding how many activities a job had
//! and when the first and last happened (the `sovra_access` facet says so).

use serde_json::{json, Map, Value};
use sovra_proto::lineage::v1 as pb;

use crate::lineage::{subtype_name, type_name};

/// The OpenLineage spec version the events follow.
pub const RUN_EVENT_SCHEMA: &str =
    "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent";
/// The column lineage facet version used.
pub const COLUMN_LINEAGE_SCHEMA: &str = "https://openlineage.io/spec/facets/1-2-0/ColumnLineageDatasetFacet.json#/$defs/ColumnLineageDatasetFacet";
/// Where the `sovra_access` facet's schema is published (docs/openlineage/).
pub const SOVRA_ACCESS_SCHEMA: &str =
    "https://example.invalid/sovra/spec/facets/1-0-0/SovraAccessRunFacet.json#/$defs/SovraAccessRunFacet";
/// The customer dataset.
pub const CUSTOMER_DATASET: &str = "crm.customer";

/// The producer URI: this crate's repository at its version.
pub fn producer() -> String {
    format!(
        "{}/tree/v{}/vault",
        env!("CARGO_PKG_REPOSITORY"),
        env!("CARGO_PKG_VERSION")
    )
}

/// `ms` since the epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn kind_name(kind: i32) -> &'static str {
    use pb::ActivityKind as K;
    match K::try_from(kind).unwrap_or(K::Unspecified) {
        K::Collect => "collect",
        K::Update => "update",
        K::Transform => "transform",
        K::Compute => "compute",
        K::Reveal => "reveal",
        K::Export => "export",
        K::Erase | K::Unspecified => "erase",
    }
}

fn dataset(namespace: &str, name: &str) -> Value {
    json!({ "namespace": namespace, "name": name })
}

/// The RunEvents of a tenant's exported lineage, one per job.
pub fn run_events(export: &pb::ExportLineageResponse) -> Vec<Value> {
    let ns = format!("sovra://{}", export.tenant);
    let producer = producer();
    export
        .jobs
        .iter()
        .map(|job| {
            let (input, output) = match job.name.split_once('.') {
                Some(("collect", channel)) => (
                    format!("channel.{channel}"),
                    Some(CUSTOMER_DATASET.to_owned()),
                ),
                Some(("reveal" | "export", purpose)) => (
                    CUSTOMER_DATASET.to_owned(),
                    Some(format!("purpose.{purpose}")),
                ),
                Some(("sandbox", j)) => (CUSTOMER_DATASET.to_owned(), Some(format!("sandbox.{j}"))),
                _ => (CUSTOMER_DATASET.to_owned(), None),
            };
            let mut fields = Map::new();
            for e in &job.edges {
                let t = e.transformation.clone().unwrap_or_default();
                let mut tr = json!({
                    "type": type_name(&t),
                    "subtype": subtype_name(&t),
                    "masking": t.masking,
                });
                if !t.description.is_empty() {
                    tr["description"] = json!(t.description);
                }
                let source_field = if e.input.is_empty() {
                    &e.output
                } else {
                    &e.input
                };
                let entry = fields
                    .entry(e.output.clone())
                    .or_insert_with(|| json!({ "inputFields": [] }));
                if let Some(list) = entry["inputFields"].as_array_mut() {
                    list.push(json!({
                        "namespace": ns,
                        "name": input,
                        "field": source_field,
                        "transformations": [tr],
                    }));
                }
            }
            let outputs: Vec<Value> = output
                .map(|name| {
                    let mut d = dataset(&ns, &name);
                    if !fields.is_empty() {
                        d["facets"] = json!({
                            "columnLineage": {
                                "_producer": producer,
                                "_schemaURL": COLUMN_LINEAGE_SCHEMA,
                                "fields": fields,
                            }
                        });
                    }
                    d
                })
                .into_iter()
                .collect();
            let decision = match (job.allowed, job.denied) {
                (_, 0) => "allowed",
                (0, _) => "denied",
                _ => "mixed",
            };
            let mut access = json!({
                "_producer": producer,
                "_schemaURL": SOVRA_ACCESS_SCHEMA,
                "kind": kind_name(job.kind),
                "purpose": job.purpose,
                "decision": decision,
                "runs": job.runs,
                "allowed": job.allowed,
                "denied": job.denied,
                "policyIds": job.policies,
                "firstEventTime": rfc3339_ms(job.first_ms),
            });
            if !job.spec_sha256.is_empty() {
                access["specSha256"] = json!(job.spec_sha256);
            }
            json!({
                "eventType": "COMPLETE",
                "eventTime": rfc3339_ms(job.last_ms),
                "producer": producer,
                "schemaURL": RUN_EVENT_SCHEMA,
                "run": {
                    "runId": uuid::Uuid::new_v4().to_string(),
                    "facets": { "sovra_access": access },
                },
                "job": { "namespace": ns, "name": job.name },
                "inputs": [dataset(&ns, &input)],
                "outputs": outputs,
            })
        })
        .collect()
}

/// The events as JSON lines.
pub fn to_json_lines(events: &[Value]) -> String {
    let mut out = String::new();
    for e in events {
        out.push_str(&e.to_string());
        out.push('\n');
    }
    out
}
