//! Lineage: what recording costs a reveal, and how fast the per-customer
//! indexes answer for a field with 10,000 accesses.
//!
//! The engine and a real ledger in a temporary directory, no gRPC: the
//! recording a reveal adds (activity, ledger append, one sled transaction)
//! and the queries the `Lineage` service makes, each checking every activity
//! it returns against its ledger entry.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sovra_ledger::entry::{Decision, Disclosure, FieldAccess, Reveal, Write};
use sovra_ledger::{Body, Ledger, LedgerOptions, LogKey};
use sovra_proto::lineage::v1 as lpb;
use sovra_vault::crypto::keys::RootKey;
use sovra_vault::engine::{Engine, Source, WriteLineage};
use sovra_vault::lineage::{transformation, Agent};
use sovra_vault::schema::{RawValue, Schema};

const ACCESSES: usize = 10_000;

fn reveal_activity(agent: &Agent) -> lpb::Activity {
    let mut a = agent.activity(lpb::ActivityKind::Reveal, "default");
    a.used = ["phone", "budget"]
        .iter()
        .map(|f| lpb::Usage {
            field: (*f).into(),
            version: 1,
            transformation: Some(transformation(
                lpb::TransformationType::Direct,
                lpb::TransformationSubtype::Identity,
                *f == "budget",
                "",
            )),
            disclosure: if *f == "budget" {
                "masked"
            } else {
                "plaintext"
            }
            .into(),
        })
        .collect();
    a
}

fn record(engine: &Engine, ledger: &Ledger, agent: &Agent, customer: &str) {
    engine
        .record_access(
            "default",
            customer,
            reveal_activity(agent),
            |subject, hash| {
                let a = ledger.append(&[Body::FieldRevealed(Reveal {
                    tenant: "default".into(),
                    subject: *subject,
                    actor: agent.name.clone(),
                    role: agent.role.clone(),
                    purpose: agent.purpose.clone(),
                    decision: Decision::Allowed,
                    reason: String::new(),
                    fields: vec![
                        FieldAccess {
                            field: "phone".into(),
                            disclosure: Disclosure::Plaintext,
                        },
                        FieldAccess {
                            field: "budget".into(),
                            disclosure: Disclosure::Masked,
                        },
                    ],
                    lineage: *hash,
                })])?;
                Ok(a[0].index)
            },
        )
        .unwrap();
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(
        &dir.path().join("vault"),
        RootKey::generate(),
        Schema::default_crm(),
    )
    .unwrap();
    let ledger = Ledger::open(
        &dir.path().join("ledger"),
        LogKey::from_seed("sovra.bench/lineage", &[7; 32]).unwrap(),
        LedgerOptions::default(),
    )
    .unwrap();
    let agent = Agent {
        name: "bench".into(),
        role: "service".into(),
        purpose: "customer_service".into(),
        policies: vec!["service-read".into(), "service-reveal".into()],
    };
    let schema = engine.schema();
    let phone = schema.field("phone").unwrap();
    let budget = schema.field("budget").unwrap();
    let values = [
        (
            phone,
            schema
                .normalise(phone, RawValue::Text("+8613800138000".into()))
                .unwrap(),
        ),
        (
            budget,
            schema
                .normalise(budget, RawValue::Integer(100_000))
                .unwrap(),
        ),
    ];
    let src = Source {
        channel: "web_form".into(),
        collector: "bench".into(),
        consent_ref: String::new(),
    };
    for customer in ["busy", "quiet"] {
        engine
            .put(
                "default",
                customer,
                &values,
                &src,
                WriteLineage {
                    agent: &agent,
                    transformed: &[],
                    anchor: Box::new(|subject, hash, fields| {
                        let a = ledger.append(&[Body::FieldsWritten(Write {
                            tenant: "default".into(),
                            subject: *subject,
                            actor: "bench".into(),
                            channel: "web_form".into(),
                            fields,
                            lineage: *hash,
                        })])?;
                        Ok(a[0].index)
                    }),
                },
                None,
            )
            .unwrap();
    }
    for _ in 0..ACCESSES {
        record(&engine, &ledger, &agent, "busy");
    }
    engine.store().flush().unwrap();
    ledger.flush().unwrap();
    let busy_all = engine
        .accesses(&ledger, "default", "busy", "phone", (0, 0), 1000, "")
        .unwrap();
    assert_eq!(busy_all.accesses.len(), 1000);
    let last_ms = busy_all.accesses[999].activity.as_ref().unwrap().time_ms;

    let mut g = c.benchmark_group("lineage");
    g.throughput(Throughput::Elements(1));
    // What a reveal's recording costs on top of the read (not durable: the
    // commit's flush runs beside the ledger's, which the read paid before).
    g.bench_function("record_reveal_2_fields", |b| {
        b.iter(|| record(&engine, &ledger, &agent, "quiet"))
    });
    g.bench_function("field_lineage_phone", |b| {
        b.iter(|| {
            engine
                .field_lineage(&ledger, "default", "busy", "phone")
                .unwrap()
        })
    });
    g.bench_function("accesses_first_page_of_100_of_10k", |b| {
        b.iter(|| {
            engine
                .accesses(&ledger, "default", "busy", "phone", (0, 0), 100, "")
                .unwrap()
        })
    });
    g.bench_function("accesses_time_range_page_of_100_of_10k", |b| {
        b.iter(|| {
            engine
                .accesses(&ledger, "default", "busy", "phone", (last_ms, 0), 100, "")
                .unwrap()
        })
    });
    g.bench_function("derived_phone_none", |b| {
        b.iter(|| engine.derived(&ledger, "default", "busy", "phone").unwrap())
    });
    g.sample_size(10);
    g.bench_function("accesses_all_10k_in_pages_of_1000", |b| {
        b.iter(|| {
            let mut token = String::new();
            let mut n = 0;
            loop {
                let page = engine
                    .accesses(&ledger, "default", "busy", "phone", (0, 0), 1000, &token)
                    .unwrap();
                n += page.accesses.len();
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            assert!(n >= ACCESSES);
            n
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
