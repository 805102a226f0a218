//! CRM contracts, offline: checking a manifest (with and without a guest
//! to compile) and evaluating one on an event: a contract without a
//! condition, one with a two-field CEL condition, and one whose WebAssembly
//! guest decides (its fuel is reported by the tests, not here).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use sovra_contracts::crm::CONTRACTS;
use sovra_contracts::{evaluate, Event, Manifest, Scalar, Trigger};

fn bench(c: &mut Criterion) {
    let types = sovra_vault::contracts::field_types(&sovra_vault::schema::Schema::default_crm());
    let load = |i: usize| {
        let s = CONTRACTS[i];
        Manifest::parse(s.file, s.manifest, s.guest.map(str::as_bytes), &types).unwrap()
    };
    let (poc, gov, lead) = (load(0), load(1), load(2));

    c.bench_function("contracts/check_manifest_poc", |b| {
        let s = CONTRACTS[0];
        b.iter(|| Manifest::parse(s.file, black_box(s.manifest), None, &types).unwrap())
    });
    c.bench_function("contracts/check_manifest_with_guest", |b| {
        let s = CONTRACTS[2];
        b.iter(|| {
            Manifest::parse(
                s.file,
                black_box(s.manifest),
                s.guest.map(str::as_bytes),
                &types,
            )
            .unwrap()
        })
    });

    let event = |kind, name: &str, attrs: &[(&str, Scalar)], fields: &[(&str, Scalar)]| Event {
        kind,
        name: name.into(),
        at_ms: 1_700_000_000_000,
        attrs: attrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        fields: fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    };
    let signed = event(Trigger::Signal, "poc_report_signed", &[], &[]);
    let export = event(
        Trigger::Signal,
        "export_requested",
        &[],
        &[
            ("customer_kind", Scalar::Str("government".into())),
            ("contract_value", Scalar::Int(7_500_000)),
        ],
    );
    let scored = event(
        Trigger::JobReleased,
        "lead_scoring",
        &[("score", Scalar::Int(812))],
        &[],
    );

    c.bench_function("contracts/evaluate_no_condition_3_actions", |b| {
        b.iter(|| evaluate(&poc, black_box(&signed), 1).unwrap())
    });
    c.bench_function("contracts/evaluate_cel_condition", |b| {
        b.iter(|| evaluate(&gov, black_box(&export), 1).unwrap())
    });
    c.bench_function("contracts/evaluate_wasm_guest", |b| {
        b.iter(|| evaluate(&lead, black_box(&scored), 1).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
