//! Put and get of one customer record (11 fields) through the storage layer
//! (engine over sled), without gRPC; durable put includes the group commit.

// Benchmark harness code: a failed setup should abort the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sovra_vault::crypto::keys::RootKey;
use sovra_vault::engine::{Engine, Source, WriteLineage};
use sovra_vault::lineage::Agent;
use sovra_vault::schema::{FieldDef, FieldValue, RawValue, Schema};
use sovra_vault::synthetic;

fn values<'s>(schema: &'s Schema, c: &synthetic::Customer) -> Vec<(&'s FieldDef, FieldValue)> {
    c.to_request("bench")
        .fields
        .into_iter()
        .map(|(k, v)| {
            let def = schema.field(&k).unwrap_or_else(|e| panic!("{e}"));
            let raw = match v.kind {
                Some(sovra_proto::vault::v1::value::Kind::Text(s)) => RawValue::Text(s),
                Some(sovra_proto::vault::v1::value::Kind::Integer(i)) => RawValue::Integer(i),
                Some(sovra_proto::vault::v1::value::Kind::TimestampMs(t)) => RawValue::Timestamp(t),
                None => RawValue::Missing,
            };
            (
                def,
                schema.normalise(def, raw).unwrap_or_else(|e| panic!("{e}")),
            )
        })
        .collect()
}

/// The write's lineage, anchored nowhere: these benches measure the engine
/// (lineage staging included), not the ledger append (see benches/ledger.rs).
fn lineage(agent: &Agent) -> WriteLineage<'_> {
    WriteLineage {
        agent,
        transformed: &[],
        anchor: Box::new(|_, _, _| Ok(0)),
    }
}

fn bench(c: &mut Criterion) {
    let agent = Agent {
        name: "bench".into(),
        role: "service".into(),
        ..Agent::default()
    };
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let engine = Engine::open(dir.path(), RootKey::generate(), Schema::default_crm())
        .unwrap_or_else(|e| panic!("{e}"));
    let schema = Schema::default_crm();
    let people = synthetic::generate(9, 2000);
    let src = Source {
        channel: "bench".into(),
        collector: "bench".into(),
        consent_ref: String::new(),
    };
    for p in &people {
        engine
            .put(
                "default",
                &p.id,
                &values(&schema, p),
                &src,
                lineage(&agent),
                None,
            )
            .unwrap_or_else(|e| panic!("{e}"));
    }
    engine.store().flush().unwrap_or_else(|e| panic!("{e}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut g = c.benchmark_group("storage");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    // Validation and normalisation (E.164 parsing included) on their own…
    g.bench_function("normalise_record_11_fields", |b| {
        b.iter(|| {
            i += 1;
            values(&schema, &people[i % people.len()]).len()
        })
    });
    let phone_def = schema.field("phone").unwrap();
    g.bench_function("normalise_phone", |b| {
        b.iter(|| {
            i += 1;
            schema.normalise(
                phone_def,
                RawValue::Text(people[i % people.len()].phone.clone()),
            )
        })
    });
    // …and storage on already-normalised values.
    let prepared: Vec<_> = people
        .iter()
        .take(500)
        .map(|p| values(&schema, p))
        .collect();
    g.bench_function("put_record_11_fields_unflushed", |b| {
        b.iter(|| {
            i += 1;
            let k = i % prepared.len();
            engine.put(
                "default",
                &people[k].id,
                &prepared[k],
                &src,
                lineage(&agent),
                None,
            )
        })
    });
    g.bench_function("put_record_11_fields_durable", |b| {
        b.iter(|| {
            i += 1;
            let k = i % prepared.len();
            engine
                .put(
                    "default",
                    &people[k].id,
                    &prepared[k],
                    &src,
                    lineage(&agent),
                    None,
                )
                .unwrap();
            rt.block_on(engine.commit())
        })
    });
    let phone = engine
        .schema()
        .field("phone")
        .unwrap_or_else(|e| panic!("{e}"));
    g.bench_function("get_1_field", |b| {
        b.iter(|| {
            i += 1;
            engine
                .get("default", &people[i % people.len()].id, &[phone])
                .map(|(_, v)| v.len())
        })
    });
    g.bench_function("get_11_fields", |b| {
        b.iter(|| {
            i += 1;
            engine
                .get("default", &people[i % people.len()].id, &[])
                .map(|(_, v)| v.len())
        })
    });
    let pv = FieldValue::Text(people[5].phone_e164.clone());
    g.bench_function("search_phone", |b| {
        b.iter(|| engine.search("default", phone, &pv, 10))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
