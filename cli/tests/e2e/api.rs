//! The vault's main path through gRPC: writes, revealed and masked reads,
//! blind-index search, erasure, and the role table's answers.

use sovra_proto::vault::v1 as pb;
use sovra_vault::synthetic;
use tonic::Code;

use sovra_testkit::*;

#[tokio::test]
async fn write_read_search_erase_through_grpc() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let mut adm = srv.client(Some(&env.admin)).await;

    let people = synthetic::generate(1, 25);
    for c in &people {
        let r = svc
            .put_record(c.to_request("web_form"))
            .await
            .unwrap()
            .into_inner();
        assert!(r.created);
        assert_eq!(r.versions.len(), 11);
        assert!(r.versions.iter().all(|v| v.version == 1));
    }
    let c = &people[3];

    // Revealed for the service role, masked where the sensitivity says so.
    let got = svc
        .get_fields(get(&c.id, &[], "customer_service"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.fields.len(), 11);
    let by = |n: &str| got.fields.iter().find(|f| f.field == n).unwrap();
    assert_eq!(
        revealed(by("phone")),
        Some(&pb::value::Kind::Text(c.phone_e164.clone()))
    );
    assert_eq!(
        revealed(by("email")),
        Some(&pb::value::Kind::Text(c.email.to_lowercase()))
    );
    assert_eq!(
        revealed(by("name")),
        Some(&pb::value::Kind::Text(c.name.clone()))
    );
    assert_eq!(revealed(by("budget")), None);
    assert_eq!(masked(by("budget")), Some("[redacted]"));
    let id_mask = masked(by("national_id")).unwrap();
    assert_eq!(id_mask.len(), 18);
    assert!(id_mask.ends_with(&c.national_id[14..]) && id_mask.starts_with("**************"));
    let src = by("phone").source.clone().unwrap();
    assert_eq!(
        (src.channel.as_str(), src.collector.as_str()),
        ("web_form", "synthetic-crm")
    );
    assert!(by("phone").collected_at_ms > 0);

    // Only the fields asked for, in schema order; duplicates collapse.
    let some = svc
        .get_fields(get(&c.id, &["email", "phone", "email"], "billing"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        some.fields
            .iter()
            .map(|f| f.field.as_str())
            .collect::<Vec<_>>(),
        ["phone", "email"]
    );

    // An update bumps the version and moves the blind-index entry.
    let r = svc
        .put_record(put(&c.id, &[("phone", text("+86 139 0000 0001"))]))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.created);
    assert_eq!(
        r.versions,
        vec![pb::FieldVersion {
            field: "phone".into(),
            version: 2
        }]
    );
    let s = svc
        .search(search_req("phone", "13900000001", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.customer_ids, vec![c.id.clone()]);
    let s = svc
        .search(search_req("phone", &c.phone, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(s.customer_ids.is_empty(), "the old phone no longer matches");

    // Search by phone and email (normalised like writes).
    let d = &people[5];
    let s = svc
        .search(search_req("phone", &d.phone, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.customer_ids, vec![d.id.clone()]);
    let s = svc
        .search(search_req("email", &d.email.to_uppercase(), 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.customer_ids, vec![d.id.clone()]);
    // Shared values are found for every customer, with truncation reported.
    for id in ["dup-1", "dup-2", "dup-3"] {
        svc.put_record(put(id, &[("email", text("shared@example.com"))]))
            .await
            .unwrap();
    }
    let s = svc
        .search(search_req("email", "shared@example.com", 2))
        .await
        .unwrap()
        .into_inner();
    // The order is that of the keyed references (stable, not the ids').
    assert!(s.truncated);
    assert_eq!(s.customer_ids.len(), 2);
    assert!(s.customer_ids.iter().all(|i| i.starts_with("dup-")));
    let all = svc
        .search(search_req("email", "shared@example.com", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(!all.truncated);
    assert_eq!(all.customer_ids[..2], s.customer_ids[..]);
    let mut sorted = all.customer_ids.clone();
    sorted.sort();
    assert_eq!(sorted, ["dup-1", "dup-2", "dup-3"]);

    // Erasure: receipt, then NOT_FOUND and no search hits.
    let receipt = adm
        .erase_customer(pb::EraseCustomerRequest {
            customer_id: d.id.clone(),
            reason: "gdpr_art17_request".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (receipt.fields_erased, receipt.index_entries_removed),
        (11, 3)
    );
    assert_eq!(receipt.receipt_id.len(), 32);
    let e = svc
        .get_fields(get(&d.id, &[], "customer_service"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let s = svc
        .search(search_req("phone", &d.phone, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(s.customer_ids.is_empty());
    let e = adm
        .erase_customer(pb::EraseCustomerRequest {
            customer_id: d.id.clone(),
            reason: "again".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The other customers are untouched.
    assert_eq!(
        svc.get_fields(get(&people[6].id, &[], "billing"))
            .await
            .unwrap()
            .into_inner()
            .fields
            .len(),
        11
    );
    srv.stop().await;
}

#[tokio::test]
async fn authentication_and_role_table() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    svc.put_record(put(
        "c-1",
        &[("phone", text("13800138000")), ("budget", int(10))],
    ))
    .await
    .unwrap();

    let mut anon = srv.client(None).await;
    let e = anon
        .get_fields(get("c-1", &["phone"], "customer_service"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("authorization"), "{}", e.message());
    let mut wrong = srv.client(Some("sovra_not-a-real-token")).await;
    let e = wrong
        .put_record(put("c-2", &[("phone", text("13800138000"))]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        !e.message().contains("not-a-real-token"),
        "tokens are never echoed"
    );

    let mut partner = srv.client(Some(&env.partner)).await;
    let e = partner
        .get_fields(get("c-1", &["phone"], "analytics"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("partner"), "{}", e.message());
    let e = partner
        .search(search_req("phone", "13800138000", 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let mut officer = srv.client(Some(&env.officer)).await;
    assert_eq!(
        officer
            .get_fields(get("c-1", &["phone"], "legal_obligation"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        officer
            .put_record(put("c-1", &[("budget", int(1))]))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        officer
            .describe_schema(pb::DescribeSchemaRequest {})
            .await
            .unwrap()
            .into_inner()
            .fields
            .len(),
        13
    );

    let mut admin = srv.client(Some(&env.admin)).await;
    assert_eq!(
        admin
            .get_fields(get("c-1", &["phone"], "customer_service"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        svc.erase_customer(pb::EraseCustomerRequest {
            customer_id: "c-1".into(),
            reason: "x".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        svc.rotate_tenant_key(pb::RotateTenantKeyRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // A read without a purpose, or with an undeclared one.
    let e = svc
        .get_fields(get("c-1", &["phone"], ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("purpose"), "{}", e.message());
    let e = svc
        .get_fields(get("c-1", &["phone"], "curiosity"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("curiosity"));

    // Health and reflection are served.
    let ch = sovra_vault::client::channel(&srv.url, None).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sovra.vault.v1.Vault".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    srv.stop().await;
}

#[tokio::test]
async fn batch_put_reports_each_item() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let mut reqs: Vec<pb::PutRecordRequest> = synthetic::generate(3, 300)
        .iter()
        .map(|c| c.to_request("import"))
        .collect();
    reqs[10].fields.insert("budget".into(), text("lots"));
    reqs[200].customer_id = "bad/id".into();
    // Several updates of one customer in one stream apply in stream order.
    for k in 0..5 {
        reqs.push(put("same-customer", &[("purchase_count", int(k))]));
    }
    let mut stream = svc
        .batch_put(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut results = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        results.push(r);
    }
    assert_eq!(results.len(), 305);
    for (k, r) in results[300..].iter().enumerate() {
        assert_eq!(
            r.versions,
            vec![pb::FieldVersion {
                field: "purchase_count".into(),
                version: k as u64 + 1
            }]
        );
    }
    let last = svc
        .get_fields(get("same-customer", &["purchase_count"], "billing"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        revealed(&last.fields[0]),
        Some(&pb::value::Kind::Integer(4))
    );
    assert_eq!(last.fields[0].version, 5);
    for (i, r) in results.iter().take(300).enumerate() {
        assert_eq!(r.index, i as u64);
        if i == 10 || i == 200 {
            assert_eq!(r.code, Code::InvalidArgument as i32, "{r:?}");
            assert!(!r.message.is_empty());
        } else {
            assert_eq!(r.code, 0, "{r:?}");
        }
    }
    assert!(
        results[10].message.contains("fields.budget"),
        "{}",
        results[10].message
    );
    let e = svc
        .get_fields(get(&results[10].customer_id, &[], "billing"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "the failed item wrote nothing");
    assert!(svc
        .get_fields(get(&results[11].customer_id, &[], "billing"))
        .await
        .is_ok());
    srv.stop().await;
}

/// Service names listed by one reflection version's `ListServices`.
macro_rules! reflected_services {
    ($ch:expr, $v:ident) => {{
        use tonic_reflection::pb::$v::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut c = ServerReflectionClient::new($ch);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = c
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let r = answers.message().await.unwrap().unwrap();
        match r.message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }};
}

#[tokio::test]
async fn reflection_is_served_in_v1_and_v1alpha_and_lists_health() {
    let env = Env::new();
    let srv = env.start().await;
    let ch = sovra_vault::client::channel(&srv.url, None).await.unwrap();
    let v1 = reflected_services!(ch.clone(), v1);
    let v1alpha = reflected_services!(ch, v1alpha);
    for names in [&v1, &v1alpha] {
        for s in [
            "sovra.vault.v1.Vault",
            "sovra.ledger.v1.Ledger",
            "sovra.policy.v1.Policy",
            "sovra.lineage.v1.Lineage",
            "sovra.sandbox.v1.Sandbox",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
        }
    }
    srv.stop().await;
}
