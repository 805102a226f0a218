//! gRPC round trips on loopback against the embedded server: put and get of
//! one 10-field record, and a one-field get.

// Benchmark harness code: a failed setup should abort the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sovra_proto::vault::v1 as pb;
use sovra_vault::client;
use sovra_vault::synthetic;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let (srv, mut cl) = rt.block_on(async {
        let e = sovra_benches::embedded()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let cl = client::connect(&e.url, Some(&e.service_token), None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (e, cl)
    });
    let people = synthetic::generate(3, 1000);
    let ten = |p: &synthetic::Customer, id: String| {
        let mut r = p.to_request("bench");
        r.fields.remove("whitepaper_dwell_s");
        r.customer_id = id;
        r
    };
    rt.block_on(async {
        for p in &people {
            cl.put_record(ten(p, p.id.clone()))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    });
    let names: Vec<String> = ten(&people[0], String::new())
        .fields
        .keys()
        .cloned()
        .collect();
    let mut g = c.benchmark_group("grpc");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("put_record_10_fields", |b| {
        b.to_async(&rt).iter(|| {
            i += 1;
            let mut cl = cl.clone();
            let req = ten(&people[i % people.len()], format!("b-{i}"));
            async move { cl.put_record(req).await.map(|_| ()) }
        })
    });
    g.bench_function("get_record_10_fields", |b| {
        b.to_async(&rt).iter(|| {
            i += 1;
            let mut cl = cl.clone();
            let req = pb::GetFieldsRequest {
                customer_id: people[i % people.len()].id.clone(),
                fields: names.clone(),
                purpose: "customer_service".into(),
            };
            async move {
                cl.get_fields(req)
                    .await
                    .map(|r| r.into_inner().fields.len())
            }
        })
    });
    g.bench_function("get_1_field", |b| {
        b.to_async(&rt).iter(|| {
            i += 1;
            let mut cl = cl.clone();
            let req = pb::GetFieldsRequest {
                customer_id: people[i % people.len()].id.clone(),
                fields: vec!["phone".into()],
                purpose: "customer_service".into(),
            };
            async move {
                cl.get_fields(req)
                    .await
                    .map(|r| r.into_inner().fields.len())
            }
        })
    });
    g.finish();
    rt.block_on(srv.handle.shutdown())
        .unwrap_or_else(|e| panic!("{e}"));
}

criterion_group!(benches, bench);
criterion_main!(benches);
