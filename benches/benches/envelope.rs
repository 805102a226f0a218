//! Field encryption and decryption, data-key wrapping and blind-index tokens.

// Benchmark harness code: a failed setup should abort the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sovra_vault::crypto::envelope::{open, seal, FieldContext, Provenance};
use sovra_vault::crypto::keys::{DataKey, KeyPlace, KeyRing, RootKey};
use sovra_vault::crypto::shred::Pad;

fn bench(c: &mut Criterion) {
    let dek = DataKey::generate();
    let cipher = dek.cipher();
    let ctx = FieldContext {
        tenant: "default",
        customer: "cust-000001",
        field: "phone",
        version: 3,
        dek_version: 1,
        // As the vault writes (record format 2): provenance bound too.
        provenance: Some(Provenance {
            channel: "web",
            collector: "crm",
            consent_ref: "consent-2026-01",
            collected_at_ms: 1_780_000_000_000,
            index_token: &[0x5a; 32],
        }),
    };
    let value = b"\x01+8613800138000";
    let sealed = seal(&cipher, &ctx, value).unwrap_or_else(|e| panic!("{e}"));
    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(1));
    g.bench_function("seal_field_15B", |b| b.iter(|| seal(&cipher, &ctx, value)));
    g.bench_function("open_field_15B", |b| {
        b.iter(|| open(&cipher, &ctx, &sealed.nonce, &sealed.ciphertext))
    });
    g.bench_function("data_key_cipher_init", |b| b.iter(|| dek.cipher()));
    let ring = KeyRing::new(RootKey::generate());
    let kek = ring.kek("default", 1);
    let pad = Pad::from_bytes_for_tests([7u8; 32]);
    let place = KeyPlace {
        tenant: "default",
        customer: "cust-000001",
        slot: 1,
        dek_version: 1,
    };
    let wrapped = ring
        .wrap(&kek, &place, &dek, &pad, 0)
        .unwrap_or_else(|e| panic!("{e}"));
    g.bench_function("unwrap_data_key", |b| {
        b.iter(|| ring.unwrap("default", "cust-000001", &wrapped, &pad))
    });
    let ik = ring.index_key("default");
    g.bench_function("blind_index_token", |b| {
        b.iter(|| ik.token("phone", b"+8613800138000"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
