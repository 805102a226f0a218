//! Field lineage through the `Lineage` gRPC service: what was done to a
//! customer's fields comes back in order, to the origin; erasure leaves no
//! trace of the customer in the lineage store; a tampered record is caught
//! against the ledger; bad input and the wrong roles get clear errors; the
//! OpenLineage export validates against the official schemas and names no
//! customer.

use prost::Message;
use sovra_proto::lineage::v1 as lpb;
use sovra_proto::vault::v1 as pb;
use sovra_vault::client::{self, LineageClient};
use sovra_vault::lineage::StoredActivity;
use tonic::Code;

use sovra_testkit::*;

const CUSTOMER: &str = "lineage-customer-0001";
const OTHER: &str = "lineage-customer-0002";
const PHONE_TYPED: &str = "+86 138-0013-8000";
const PHONE_V1: &str = "+8613800138000";
const PHONE_V2: &str = "+8613900001111";
const EMAIL: &str = "lineage.person@example.org";

async fn lineage_client(srv: &Running, token: &str) -> LineageClient {
    client::connect_lineage(&srv.url, Some(token), None)
        .await
        .unwrap()
}

fn field_req(customer: &str, field: &str) -> lpb::GetFieldLineageRequest {
    lpb::GetFieldLineageRequest {
        customer_id: customer.into(),
        field: field.into(),
    }
}

fn accesses_req(customer: &str, field: &str) -> lpb::ListAccessesRequest {
    lpb::ListAccessesRequest {
        customer_id: customer.into(),
        field: field.into(),
        ..Default::default()
    }
}

fn derived_req(customer: &str, field: &str) -> lpb::GetDerivedRequest {
    lpb::GetDerivedRequest {
        customer_id: customer.into(),
        field: field.into(),
    }
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    r.map(|_| ()).unwrap_err()
}

fn act(a: &lpb::AnchoredActivity) -> &lpb::Activity {
    a.activity.as_ref().unwrap()
}

/// Writes, updates and reads the customer; returns the denied read's
/// status message.
async fn history(srv: &Running, env: &Env) -> String {
    let mut svc = srv.client(Some(&env.service)).await;
    svc.put_record(put(
        CUSTOMER,
        &[
            ("phone", text(PHONE_TYPED)),
            ("email", text(EMAIL)),
            ("budget", int(100_000)),
        ],
    ))
    .await
    .unwrap();
    svc.put_record(put(OTHER, &[("phone", text("+8613700000002"))]))
        .await
        .unwrap();
    let mut update = put(
        CUSTOMER,
        &[("phone", text(PHONE_V2)), ("budget", int(200_000))],
    );
    update.source = Some(pb::CollectionSource {
        channel: "call_centre".into(),
        collector: "agent-desk".into(),
        consent_ref: String::new(),
    });
    svc.put_record(update).await.unwrap();
    let r = svc
        .get_fields(get(CUSTOMER, &["phone", "budget"], "customer_service"))
        .await
        .unwrap()
        .into_inner();
    assert!(revealed(&r.fields[0]).is_some(), "phone is revealed");
    assert!(masked(&r.fields[1]).is_some(), "budget is masked");
    // No consent for marketing: refused, and recorded as an attempted use.
    svc.get_fields(get(CUSTOMER, &["phone"], "marketing"))
        .await
        .unwrap_err()
        .message()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lineage_follows_every_write_and_read_back_to_the_origin() {
    let env = Env::new();
    let srv = env.start().await;
    let denied = history(&srv, &env).await;
    let mut dpo = lineage_client(&srv, &env.officer).await;

    // The phone: collected through the web form (normalised), then updated
    // through the call centre (already E.164: identity).
    let l = dpo
        .get_field_lineage(field_req(CUSTOMER, "phone"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.field, "phone");
    let versions: Vec<u64> = l.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, [1, 2]);
    let (v1, v2) = (&l.versions[0], &l.versions[1]);
    assert_eq!(v1.value_hash.len(), 64);
    assert_ne!(v1.value_hash, v2.value_hash);
    let g1 = v1.generated_by.as_ref().unwrap();
    assert_eq!(g1.kind, lpb::ActivityKind::Collect as i32);
    assert_eq!(g1.agent, "svc");
    assert_eq!(g1.role, "service");
    assert_eq!(g1.decision, lpb::Decision::Allowed as i32);
    assert!(!g1.policies.is_empty(), "the write's determining policies");
    let o1 = g1.origin.as_ref().unwrap();
    assert_eq!(
        (
            o1.channel.as_str(),
            o1.collector.as_str(),
            o1.consent_ref.as_str()
        ),
        ("web_form", "test", "consent-1")
    );
    let t1 = g1.generated.iter().find(|g| g.field == "phone").unwrap();
    assert_eq!(
        t1.transformation.as_ref().unwrap().subtype,
        lpb::TransformationSubtype::Transformation as i32,
        "the typed number was normalised"
    );
    let g2 = v2.generated_by.as_ref().unwrap();
    assert_eq!(g2.kind, lpb::ActivityKind::Update as i32);
    assert_eq!(g2.origin.as_ref().unwrap().channel, "call_centre");
    let t2 = g2.generated.iter().find(|g| g.field == "phone").unwrap();
    assert_eq!(
        t2.transformation.as_ref().unwrap().subtype,
        lpb::TransformationSubtype::Identity as i32
    );
    assert!(g1.time_ms <= g2.time_ms);
    // The budget shares the activities, with its own versions.
    let b = dpo
        .get_field_lineage(field_req(CUSTOMER, "budget"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.versions.len(), 2);
    // A field the customer never had.
    let s = dpo
        .get_field_lineage(field_req(OTHER, "budget"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");

    // Accesses to the phone: the reveal, then the refused marketing read,
    // each with purpose, decision and policies.
    let a = dpo
        .list_accesses(accesses_req(CUSTOMER, "phone"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.accesses.len(), 2, "{a:?}");
    assert!(a.next_page_token.is_empty());
    let (r1, r2) = (act(&a.accesses[0]), act(&a.accesses[1]));
    assert_eq!(r1.kind, lpb::ActivityKind::Reveal as i32);
    assert_eq!(r1.purpose, "customer_service");
    assert_eq!(r1.decision, lpb::Decision::Allowed as i32);
    assert!(r1.policies.iter().any(|p| p == "service-reveal"), "{r1:?}");
    let u1 = r1.used.iter().find(|u| u.field == "phone").unwrap();
    assert_eq!((u1.version, u1.disclosure.as_str()), (2, "plaintext"));
    assert_eq!(r2.purpose, "marketing");
    assert_eq!(r2.decision, lpb::Decision::Denied as i32);
    assert!(!r2.policies.is_empty());
    for p in &r2.policies {
        assert!(denied.contains(p.as_str()), "{p} named in `{denied}`");
    }
    assert_eq!(r2.used[0].disclosure, "withheld");
    assert!(a.accesses[0].ledger_index < a.accesses[1].ledger_index);
    assert_eq!(a.accesses[0].activity_sha256.len(), 64);
    // The budget was only ever seen masked.
    let ab = dpo
        .list_accesses(accesses_req(CUSTOMER, "budget"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ab.accesses.len(), 1);
    let ub = &act(&ab.accesses[0]).used[1];
    assert_eq!(ub.field, "budget");
    assert_eq!(ub.disclosure, "masked");
    assert!(ub.transformation.as_ref().unwrap().masking);

    // Time range and paging.
    let later = lpb::ListAccessesRequest {
        from_ms: r2.time_ms,
        ..accesses_req(CUSTOMER, "phone")
    };
    let only = dpo.list_accesses(later).await.unwrap().into_inner();
    assert_eq!(only.accesses.len(), 1);
    assert_eq!(act(&only.accesses[0]).purpose, "marketing");
    let p1 = dpo
        .list_accesses(lpb::ListAccessesRequest {
            limit: 1,
            ..accesses_req(CUSTOMER, "phone")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.accesses.len(), 1);
    assert!(!p1.next_page_token.is_empty());
    let p2 = dpo
        .list_accesses(lpb::ListAccessesRequest {
            limit: 1,
            page_token: p1.next_page_token.clone(),
            ..accesses_req(CUSTOMER, "phone")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.accesses, a.accesses[1..]);
    // A token past the range, or from before it, cannot widen it.
    for token in ["ff".repeat(16), "00".repeat(16)] {
        let r = dpo
            .list_accesses(lpb::ListAccessesRequest {
                from_ms: r2.time_ms,
                page_token: token,
                ..accesses_req(CUSTOMER, "phone")
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.accesses.len() <= 1);
        assert!(r.accesses.iter().all(|a| act(a).purpose == "marketing"));
    }
    // Nothing computed from it yet (the sandbox records through
    // `lineage::Recorder`, tested in the library's own tests).
    let d = dpo
        .get_derived(derived_req(CUSTOMER, "phone"))
        .await
        .unwrap()
        .into_inner();
    assert!(d.derived.is_empty());

    // Admins read lineage too.
    let mut adm_l = lineage_client(&srv, &env.admin).await;
    adm_l
        .get_field_lineage(field_req(CUSTOMER, "phone"))
        .await
        .unwrap();

    // A read that finds none of the fields asked for is recorded too (and
    // must not outlive the erasure below).
    let mut svc = srv.client(Some(&env.service)).await;
    let none = svc
        .get_fields(get(CUSTOMER, &["company"], "customer_service"))
        .await
        .unwrap()
        .into_inner();
    assert!(none.fields.is_empty());

    // Erasure: queries about the customer are NOT_FOUND.
    let mut adm = srv.client(Some(&env.admin)).await;
    let receipt = adm
        .erase_customer(pb::EraseCustomerRequest {
            customer_id: CUSTOMER.into(),
            reason: "gdpr_art17".into(),
        })
        .await
        .unwrap()
        .into_inner();
    for s in [
        dpo.get_field_lineage(field_req(CUSTOMER, "phone"))
            .await
            .unwrap_err(),
        dpo.list_accesses(accesses_req(CUSTOMER, "phone"))
            .await
            .unwrap_err(),
        dpo.get_derived(derived_req(CUSTOMER, "phone"))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
    }
    // The other customer's lineage is untouched.
    let other = dpo
        .get_field_lineage(field_req(OTHER, "phone"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.versions.len(), 1);
    // Aggregate lineage of the field remains, the erasure included.
    let e = dpo
        .export_lineage(lpb::ExportLineageRequest {})
        .await
        .unwrap()
        .into_inner();
    let job = |name: &str| e.jobs.iter().find(|j| j.name == name).cloned();
    let web = job("collect.web_form").unwrap();
    assert_eq!(web.runs, 2, "both customers' collections");
    assert!(web.edges.iter().any(|x| x.output == "email"));
    let cc = job("collect.call_centre").unwrap();
    assert_eq!(cc.runs, 1);
    let reveal = job("reveal.customer_service").unwrap();
    assert_eq!(
        (reveal.runs, reveal.allowed),
        (2, 2),
        "the reveal and the empty read"
    );
    let mk = job("reveal.marketing").unwrap();
    assert_eq!((mk.runs, mk.denied), (1, 1));
    let erase = job("erase").unwrap();
    assert_eq!((erase.runs, erase.purpose.as_str()), (1, "gdpr_art17"));
    assert!(erase.edges.iter().any(|x| x.output == "phone"));
    let export_text = format!("{e:?}");
    assert!(!export_text.contains(CUSTOMER));
    assert!(!export_text.contains(&receipt.subject));
    srv.stop().await;

    // No trace of the customer in the lineage store: not the id, not the
    // pseudonym, not a value, not a value hash.
    let pseudonym = hex::decode(&receipt.subject).unwrap();
    let mut needles: Vec<Vec<u8>> = vec![
        CUSTOMER.as_bytes().to_vec(),
        pseudonym.clone(),
        receipt.subject.as_bytes().to_vec(),
        PHONE_V1.as_bytes().to_vec(),
        PHONE_V2.as_bytes().to_vec(),
        PHONE_TYPED.as_bytes().to_vec(),
        EMAIL.as_bytes().to_vec(),
    ];
    for v in l.versions.iter().chain(b.versions.iter()) {
        needles.push(v.value_hash.as_bytes().to_vec());
        needles.push(hex::decode(&v.value_hash).unwrap());
    }
    let db = open_raw(&env.data_dir());
    let mut scanned = 0;
    // One tree in four key spaces (see lineage.rs).
    for tree in ["lineage"] {
        for item in db.open_tree(tree).unwrap().iter() {
            let (k, v) = item.unwrap();
            for bytes in [&k[..], &v[..]] {
                scanned += bytes.len();
                for n in &needles {
                    assert!(
                        !bytes.windows(n.len()).any(|w| w == n.as_slice()),
                        "tree {tree} still holds a trace of the erased customer"
                    );
                }
            }
        }
    }
    assert!(
        scanned > 1000,
        "the other customer's and aggregate lineage remain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_lineage_record_is_detected_against_the_ledger() {
    let env = Env::new();
    let srv = env.start().await;
    history(&srv, &env).await;
    srv.stop().await;

    // Rewrite the purpose of every reveal of the phone, as someone covering
    // a use would, keeping each record's ledger index.
    {
        let db = open_raw(&env.data_dir());
        let t = db.open_tree("lineage").unwrap();
        let mut changed = 0;
        // Activities are the `A` key space (see lineage.rs).
        for item in t.scan_prefix(b"A") {
            let (k, v) = item.unwrap();
            let mut stored = StoredActivity::decode(&v[..]).unwrap();
            let mut a = lpb::Activity::decode(&stored.body[..]).unwrap();
            if a.purpose == "marketing" {
                a.purpose = "customer_service".into();
                stored.body = a.encode_to_vec();
                t.insert(k, stored.encode_to_vec()).unwrap();
                changed += 1;
            }
        }
        assert_eq!(changed, 1);
        db.flush().unwrap();
    }
    let srv = env.start().await;
    let mut dpo = lineage_client(&srv, &env.officer).await;
    let s = dpo
        .list_accesses(accesses_req(CUSTOMER, "phone"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::DataLoss, "{s:?}");
    assert!(s.message().contains("ledger entry"), "{}", s.message());
    // The untouched chain still answers.
    dpo.get_field_lineage(field_req(CUSTOMER, "phone"))
        .await
        .unwrap();
    srv.stop().await;

    // Pointing a record at another entry does not help either.
    {
        let db = open_raw(&env.data_dir());
        let t = db.open_tree("lineage").unwrap();
        // Activities are the `A` key space (see lineage.rs).
        for item in t.scan_prefix(b"A") {
            let (k, v) = item.unwrap();
            let mut stored = StoredActivity::decode(&v[..]).unwrap();
            let a = lpb::Activity::decode(&stored.body[..]).unwrap();
            if a.kind == lpb::ActivityKind::Collect as i32 && !a.subject.is_empty() {
                stored.ledger_index += 1;
                t.insert(k, stored.encode_to_vec()).unwrap();
            }
        }
        db.flush().unwrap();
    }
    let srv = env.start().await;
    let mut dpo = lineage_client(&srv, &env.officer).await;
    let s = dpo
        .get_field_lineage(field_req(CUSTOMER, "phone"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::DataLoss, "{s:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lineage_bad_input_and_wrong_roles() {
    let env = Env::new();
    let srv = env.start().await;
    history(&srv, &env).await;
    let mut dpo = lineage_client(&srv, &env.officer).await;

    // Unknown customer, unknown field, malformed names.
    let s = code(dpo.get_field_lineage(field_req("nobody", "phone")).await);
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let s = code(
        dpo.get_field_lineage(field_req(CUSTOMER, "shoe_size"))
            .await,
    );
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    for (customer, field) in [
        ("", "phone"),
        ("bad id!", "phone"),
        (&"x".repeat(10_000)[..], "phone"),
        (CUSTOMER, ""),
        (CUSTOMER, "ph\0ne"),
        (CUSTOMER, &"f".repeat(5_000)[..]),
    ] {
        let s = code(dpo.get_field_lineage(field_req(customer, field)).await);
        assert_eq!(
            s.code(),
            Code::InvalidArgument,
            "{customer:.20} {field:.20}: {s:?}"
        );
        assert!(s.message().len() < 400, "messages stay short");
        let s = code(dpo.get_derived(derived_req(customer, field)).await);
        assert_eq!(s.code(), Code::InvalidArgument);
    }

    // Reversed, empty, negative and absurd ranges; page limits and tokens.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for (from_ms, to_ms, limit, token, what) in [
        (now, now - 1000, 0, "", "reversed"),
        (now, now, 0, "", "empty"),
        (-1, 0, 0, "", "before the epoch"),
        (0, -5, 0, "", "end before the epoch"),
        (0, i64::MAX, 0, "", "the end of time"),
        (i64::MIN, i64::MAX, 0, "", "everything"),
        (0, 0, 1001, "", "page too large"),
        (0, 0, 0, "zz", "garbage token"),
        (0, 0, 0, &"0".repeat(10_000)[..], "huge token"),
    ] {
        let s = code(
            dpo.list_accesses(lpb::ListAccessesRequest {
                from_ms,
                to_ms,
                limit,
                page_token: token.into(),
                ..accesses_req(CUSTOMER, "phone")
            })
            .await,
        );
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        assert!(s.message().len() < 400);
    }

    // Services and partners may not read lineage, whether or not the
    // customer exists: the refusal comes first and says nothing else.
    for token in [&env.service, &env.partner] {
        let mut c = lineage_client(&srv, token).await;
        for customer in [CUSTOMER, "nobody"] {
            let s = code(c.get_field_lineage(field_req(customer, "phone")).await);
            assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
            assert!(s.message().contains("read_lineage"), "{}", s.message());
            assert!(!s.message().contains(customer));
            let s = code(c.list_accesses(accesses_req(customer, "phone")).await);
            assert_eq!(s.code(), Code::PermissionDenied);
            let s = code(c.get_derived(derived_req(customer, "phone")).await);
            assert_eq!(s.code(), Code::PermissionDenied);
        }
        let s = code(c.export_lineage(lpb::ExportLineageRequest {}).await);
        assert_eq!(s.code(), Code::PermissionDenied);
    }
    // No token, forged token.
    let mut anon = client::connect_lineage(&srv.url, None, None).await.unwrap();
    let s = code(anon.get_field_lineage(field_req(CUSTOMER, "phone")).await);
    assert_eq!(s.code(), Code::Unauthenticated);
    let mut forged = lineage_client(&srv, "sovra_forged").await;
    let s = code(forged.export_lineage(lpb::ExportLineageRequest {}).await);
    assert_eq!(s.code(), Code::Unauthenticated);
    srv.stop().await;
}

/// The official OpenLineage schemas (vendored under tests/data/openlineage)
/// and Sovra's facet schema (docs/openlineage).
struct Schemas {
    run_event: jsonschema::Validator,
    column_lineage: jsonschema::Validator,
    sovra_access: jsonschema::Validator,
}

fn schemas() -> Schemas {
    use serde_json::{json, Value};
    const CORE: &str = "https://openlineage.io/spec/2-0-2/OpenLineage.json";
    const COLUMN: &str = "https://openlineage.io/spec/facets/1-2-0/ColumnLineageDatasetFacet.json";
    let load =
        |p: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let core = load("tests/data/openlineage/OpenLineage.json");
    let column = load("tests/data/openlineage/ColumnLineageDatasetFacet.json");
    let access = load("../docs/openlineage/SovraAccessRunFacet.json");
    let access_id = access["$id"].as_str().unwrap().to_owned();
    let registry = jsonschema::Registry::new()
        .add(CORE, core)
        .unwrap()
        .add(COLUMN, column)
        .unwrap()
        .add(&access_id, access)
        .unwrap()
        .prepare()
        .unwrap();
    let build = |r: String| {
        jsonschema::options()
            .offline()
            .with_registry(&registry)
            .should_validate_formats(true)
            .build(&json!({ "$ref": r }))
            .unwrap()
    };
    Schemas {
        run_event: build(format!("{CORE}#/$defs/RunEvent")),
        column_lineage: build(format!("{COLUMN}#/$defs/ColumnLineageDatasetFacet")),
        sovra_access: build(format!("{access_id}#/$defs/SovraAccessRunFacet")),
    }
}

fn check_event(s: &Schemas, e: &serde_json::Value) {
    let errors = |v: &jsonschema::Validator, x: &serde_json::Value| -> Vec<String> {
        v.iter_errors(x)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect()
    };
    let errs = errors(&s.run_event, e);
    assert!(errs.is_empty(), "RunEvent: {errs:?}\n{e}");
    let access = &e["run"]["facets"]["sovra_access"];
    let errs = errors(&s.sovra_access, access);
    assert!(errs.is_empty(), "sovra_access: {errs:?}\n{access}");
    for d in e["outputs"].as_array().unwrap() {
        if let Some(cl) = d.get("facets").and_then(|f| f.get("columnLineage")) {
            let errs = errors(&s.column_lineage, cl);
            assert!(errs.is_empty(), "columnLineage: {errs:?}\n{cl}");
        }
    }
}

#[test]
fn schemas_reject_what_they_must() {
    // The validators are not vacuous.
    let s = schemas();
    let mut bad = serde_json::json!({
        "eventType": "COMPLETE", "eventTime": "yesterday",
        "producer": "https://example.invalid/p", "schemaURL": "https://example.invalid/s",
        "run": {"runId": "not-a-uuid"}, "job": {"namespace": "n", "name": "j"}
    });
    assert!(!s.run_event.is_valid(&bad));
    bad["eventTime"] = "2026-01-01T00:00:00Z".into();
    bad["run"]["runId"] = "3f1c2b9e-6c1e-4d8a-9a53-2f0d2f6b7c11".into();
    assert!(s.run_event.is_valid(&bad));
    assert!(!s
        .sovra_access
        .is_valid(&serde_json::json!({"_producer": "https://x.invalid", "_schemaURL": "https://x.invalid", "kind": "reveal"})));
    assert!(!s
        .column_lineage
        .is_valid(&serde_json::json!({"fields": {}})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_openlineage_export_validates_and_names_no_customer() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("demo.openlineage.jsonl");
    let opts = sovra_cli::commands::demo::DemoOptions {
        customers: 60,
        seed: 42,
        openlineage_out: path.clone(),
    };
    let mut out = Vec::new();
    let sum = sovra_cli::commands::demo::run(&opts, &mut out)
        .await
        .unwrap();
    let printed = String::from_utf8(out).unwrap();
    assert!(printed.contains("phone of customer"), "{printed}");
    assert!(printed.contains("budget of customer"), "{printed}");
    assert!(printed.contains("(origin)"));
    assert_eq!(sum.phone_versions, 2);
    assert!(sum.lineage_gone);

    let text = std::fs::read_to_string(&path).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), sum.openlineage_events);
    assert!(events.len() >= 4, "collection, reveals, erasure");
    let s = schemas();
    for e in &events {
        check_event(&s, e);
        assert_eq!(e["job"]["namespace"], "sovra://default");
    }
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["job"]["name"].as_str().unwrap())
        .collect();
    for n in ["collect.web_form", "reveal.customer_service", "erase"] {
        assert!(names.contains(&n), "{names:?}");
    }
    assert!(text.contains("\"crm.customer\""));
    assert!(text.contains("\"columnLineage\""));

    // Not one customer id or value of the demo data set.
    let mut needles: Vec<String> = vec!["+86 139-1234-5678".into(), "+8613912345678".into()];
    for c in sovra_vault::synthetic::generate(opts.seed, opts.customers) {
        needles.extend([
            c.id.clone(),
            c.name.clone(),
            c.phone.clone(),
            c.phone_e164.clone(),
            c.email.clone(),
            c.email.to_lowercase(),
            c.national_id.clone(),
        ]);
    }
    for n in &needles {
        assert!(!text.contains(n.as_str()), "the export contains `{n}`");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_jobs_recorded_through_the_recorder_are_derived_values() {
    use sovra_ledger::Digest;
    use sovra_vault::lineage::{transformation, Agent, JobRecord};
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    for c in [CUSTOMER, OTHER] {
        svc.put_record(put(
            c,
            &[("budget", int(100_000)), ("purchase_count", int(7))],
        ))
        .await
        .unwrap();
    }
    let recorder = srv.handle.lineage_recorder();
    let agent = Agent {
        name: "lead-scoring".into(),
        role: "workload".into(),
        purpose: "lead_scoring".into(),
        policies: vec!["workload-compute".into()],
    };
    let scoring = JobRecord {
        tenant: "default".into(),
        job_id: "lead-scoring-1".into(),
        spec_sha256: Digest([1; 32]),
        agent: agent.clone(),
        features: vec!["budget".into(), "purchase_count".into()],
        output: "lead_score".into(),
        transformation: transformation(
            lpb::TransformationType::Direct,
            lpb::TransformationSubtype::Transformation,
            false,
            "linear score",
        ),
        cohort: vec![CUSTOMER.into(), OTHER.into()],
        per_customer: vec![
            (CUSTOMER.into(), b"high".to_vec()),
            (OTHER.into(), b"low".to_vec()),
        ],
        output_sha256: Digest([2; 32]),
    };
    recorder.record_job(&scoring).await.unwrap();
    let sum = JobRecord {
        job_id: "budget-sum-1".into(),
        features: vec!["budget".into()],
        output: "budget_sum".into(),
        per_customer: Vec::new(),
        agent: Agent {
            name: "partner".into(),
            role: "partner".into(),
            ..agent
        },
        ..scoring.clone()
    };
    recorder.record_job(&sum).await.unwrap();
    // Hostile job ids are refused before anything is recorded.
    let bad = JobRecord {
        job_id: "job\nid".into(),
        ..sum.clone()
    };
    assert!(recorder.record_job(&bad).await.is_err());
    for bad in [
        JobRecord {
            output: "email".into(),
            ..sum.clone()
        },
        JobRecord {
            features: vec!["bud\0get".into()],
            ..sum.clone()
        },
        JobRecord {
            per_customer: vec![("not-in-cohort".into(), b"x".to_vec())],
            ..sum.clone()
        },
    ] {
        let e = recorder.record_job(&bad).await.unwrap_err();
        assert!(
            matches!(e, sovra_vault::VaultError::InvalidArgument(_)),
            "{e}"
        );
    }

    let mut dpo = lineage_client(&srv, &env.officer).await;
    let d = dpo
        .get_derived(derived_req(CUSTOMER, "budget"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.derived.len(), 2, "{d:?}");
    let (score, agg) = (act(&d.derived[0]), act(&d.derived[1]));
    assert_eq!(score.kind, lpb::ActivityKind::Compute as i32);
    assert_eq!(score.job_id, "lead-scoring-1");
    assert_eq!(score.spec_sha256, Digest([1; 32]).to_hex());
    assert_eq!(score.generated[0].field, "lead_score");
    assert_eq!(score.generated[0].version, 1);
    assert!(!score.subject.is_empty(), "a per-customer score");
    assert!(agg.subject.is_empty(), "the aggregate names no customer");
    assert_eq!(agg.cohort_size, 2);
    let t = agg.generated[0].derived_from[0]
        .transformation
        .as_ref()
        .unwrap();
    assert_eq!(t.r#type, lpb::TransformationType::Indirect as i32);
    assert_eq!(t.subtype, lpb::TransformationSubtype::Aggregation as i32);
    // The score's own lineage points back at the features it came from.
    let l = dpo
        .get_field_lineage(field_req(CUSTOMER, "lead_score"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.versions.len(), 1);
    let from: Vec<(&str, u64)> = l.versions[0]
        .derived_from
        .iter()
        .map(|d| (d.field.as_str(), d.version))
        .collect();
    assert_eq!(from, [("budget", 1), ("purchase_count", 1)]);
    // The partner's aggregate is not a use of purchase_count.
    let pc = dpo
        .get_derived(derived_req(CUSTOMER, "purchase_count"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pc.derived.len(), 1);

    // Erasure: the customer's derivations go; the jobs' aggregate lineage
    // stays.
    let mut adm = srv.client(Some(&env.admin)).await;
    adm.erase_customer(pb::EraseCustomerRequest {
        customer_id: CUSTOMER.into(),
        reason: "gdpr_art17".into(),
    })
    .await
    .unwrap();
    let s = dpo
        .get_derived(derived_req(CUSTOMER, "budget"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    assert_eq!(
        dpo.get_derived(derived_req(OTHER, "budget"))
            .await
            .unwrap()
            .into_inner()
            .derived
            .len(),
        2
    );
    let e = dpo
        .export_lineage(lpb::ExportLineageRequest {})
        .await
        .unwrap()
        .into_inner();
    let scoring_job = e
        .jobs
        .iter()
        .find(|j| j.name == "sandbox.lead-scoring-1")
        .unwrap();
    assert_eq!(scoring_job.runs, 3, "the job and two per-customer scores");
    let agg_job = e
        .jobs
        .iter()
        .find(|j| j.name == "sandbox.budget-sum-1")
        .unwrap();
    assert!(agg_job
        .edges
        .iter()
        .any(|x| x.output == "budget_sum" && x.input == "budget"));
    let s = schemas();
    for ev in sovra_vault::lineage::openlineage::run_events(&e) {
        check_event(&s, &ev);
    }
    srv.stop().await;
}

/// Every byte of the `lineage` tree of a stopped server.
fn lineage_bytes(env: &Env) -> Vec<Vec<u8>> {
    let db = open_raw(&env.data_dir());
    db.open_tree("lineage")
        .unwrap()
        .iter()
        .flat_map(|i| {
            let (k, v) = i.unwrap();
            [k.to_vec(), v.to_vec()]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_known_only_by_consent_leaves_no_lineage_after_erasure() {
    // Consent creates the customer (and its pseudonym) without any write;
    // a read then finds no field. Its lineage must still go at erasure.
    let env = Env::new();
    let srv = env.start().await;
    let mut led = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    led.record_consent(sovra_testkit::consent("consent-only-7", "marketing", true))
        .await
        .unwrap();
    let mut svc = srv.client(Some(&env.service)).await;
    let r = svc
        .get_fields(get("consent-only-7", &["phone"], "customer_service"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.fields.is_empty());
    let receipt = srv
        .client(Some(&env.admin))
        .await
        .erase_customer(pb::EraseCustomerRequest {
            customer_id: "consent-only-7".into(),
            reason: "gdpr_art17".into(),
        })
        .await
        .unwrap()
        .into_inner();
    srv.stop().await;
    let pseudonym = hex::decode(&receipt.subject).unwrap();
    for bytes in lineage_bytes(&env) {
        for needle in [&b"consent-only-7"[..], &pseudonym[..]] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "the lineage tree still holds a trace of the erased customer"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_customers_activity_under_this_index_is_detected() {
    let env = Env::new();
    let srv = env.start().await;
    history(&srv, &env).await;
    srv.stop().await;
    // Copy OTHER's (genuine, anchored) collection over CUSTOMER's update.
    {
        let db = open_raw(&env.data_dir());
        let t = db.open_tree("lineage").unwrap();
        let mut update_key = None;
        let mut other_collect = None;
        for item in t.scan_prefix(b"A") {
            let (k, v) = item.unwrap();
            let stored = StoredActivity::decode(&v[..]).unwrap();
            let a = lpb::Activity::decode(&stored.body[..]).unwrap();
            if a.kind == lpb::ActivityKind::Update as i32 {
                update_key = Some(k.to_vec());
            } else if a.kind == lpb::ActivityKind::Collect as i32 && a.generated.len() == 1 {
                other_collect = Some(v.to_vec());
            }
        }
        t.insert(update_key.unwrap(), other_collect.unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let srv = env.start().await;
    let mut dpo = lineage_client(&srv, &env.officer).await;
    let s = dpo
        .get_field_lineage(field_req(CUSTOMER, "phone"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::DataLoss, "{s:?}");
    assert!(s.message().contains("another customer"), "{}", s.message());
    srv.stop().await;
}
