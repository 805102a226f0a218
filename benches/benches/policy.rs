//! Authorization cost with the default policy set: per field and per
//! 10-field read (building the request's entities plus a `reveal` and, where
//! that is denied, a `read` decision per field), and loading the set.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use sovra_policy::{Context, CustomerAttrs, FieldAttrs, Policies, Principal, PrincipalKind};

fn field(name: &str, sensitivity: &str, department: &str) -> FieldAttrs {
    FieldAttrs {
        name: name.into(),
        sensitivity: sensitivity.into(),
        department: department.into(),
        purposes: ["customer_service", "billing", "marketing", "sales_followup"]
            .map(String::from)
            .into(),
    }
}

fn bench(c: &mut Criterion) {
    let pol = Policies::embedded().expect("default policies");
    let svc = Principal {
        kind: PrincipalKind::Service,
        name: "crm-backend".into(),
        department: "sales".into(),
        purposes: ["customer_service", "marketing", "billing"]
            .map(String::from)
            .into(),
    };
    let customer = CustomerAttrs {
        consents: ["marketing".to_string()].into(),
        withdrawn: ["analytics".to_string()].into(),
        kind: "enterprise".into(),
        contract_value: 120_000,
    };
    // The default schema's mix: personal, sensitive and internal fields.
    let fields = [
        field("name", "personal", ""),
        field("phone", "personal", ""),
        field("email", "personal", ""),
        field("national_id", "sensitive", "legal"),
        field("company", "internal", ""),
        field("industry_code", "internal", ""),
        field("region", "internal", ""),
        field("budget", "sensitive", "finance"),
        field("purchase_count", "internal", ""),
        field("last_contact_ms", "internal", ""),
    ];
    let ten: Vec<&FieldAttrs> = fields.iter().collect();
    let one = vec![&fields[1]];
    let ctx = Context {
        purpose: "customer_service".into(),
        time_ms: 1_764_000_000_000,
        approvals: 0,
        cohort_size: 0,
    };
    let mut g = c.benchmark_group("policy");
    g.bench_function("authorize_1_field", |b| {
        b.iter(|| {
            let scope = pol.scope(&svc, "default", &customer, &one).expect("scope");
            black_box(pol.read_fields(&scope, &one, &ctx).expect("decide"))
        })
    });
    g.bench_function("authorize_10_fields", |b| {
        b.iter(|| {
            let scope = pol.scope(&svc, "default", &customer, &ten).expect("scope");
            black_box(pol.read_fields(&scope, &ten, &ctx).expect("decide"))
        })
    });
    let scope = pol.scope(&svc, "default", &customer, &one).expect("scope");
    g.bench_function("decide_reveal_1_field_prebuilt_scope", |b| {
        b.iter(|| black_box(pol.read_fields(&scope, &one, &ctx).expect("decide")))
    });
    g.bench_function("load_default_set", |b| {
        b.iter(|| black_box(Policies::embedded().expect("load")))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
