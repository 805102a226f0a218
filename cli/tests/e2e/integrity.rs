//! Stored ciphertexts are bound to their place: moved or altered bytes are
//! reported as DATA_LOSS and never returned as data.

use prost::Message;
use sovra_vault::store::StoredField;
use tonic::Code;

use sovra_testkit::*;

#[tokio::test]
async fn moved_or_flipped_ciphertexts_fail_integrity() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    for (id, phone, email) in [
        ("alice", "13800000001", "a@example.com"),
        ("bob", "13800000002", "b@example.com"),
        ("carol", "13800000003", "c@example.com"),
        ("dave", "13800000004", "d@example.com"),
    ] {
        svc.put_record(put(
            id,
            &[
                ("phone", text(phone)),
                ("email", text(email)),
                ("name", text(id)),
            ],
        ))
        .await
        .unwrap();
    }
    srv.stop().await;

    {
        let db = open_raw(&env.data_dir());
        let records = db.open_tree("records").unwrap();
        let alice_phone = get_field(&records, &env, "alice", "phone").unwrap();
        // Alice's phone ciphertext copied onto Bob's phone, and onto Alice's email.
        set_field(&records, &env, "bob", "phone", &alice_phone);
        set_field(&records, &env, "alice", "email", &alice_phone);
        // One flipped byte in Carol's name ciphertext.
        let mut rec =
            StoredField::decode(&get_field(&records, &env, "carol", "name").unwrap()[..]).unwrap();
        rec.ciphertext[0] ^= 0x01;
        set_field(&records, &env, "carol", "name", &rec.encode_to_vec());
        // Garbage where a field's record belongs.
        set_field(&records, &env, "carol", "email", b"\xff\xff\xff");
        // Dave's whole record cut short.
        let dave = records.get(record_key(&env, "dave")).unwrap().unwrap();
        records
            .insert(record_key(&env, "dave"), &dave[..dave.len() - 1])
            .unwrap();
        db.flush().unwrap();
    }

    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    for (id, field) in [
        ("bob", "phone"),
        ("alice", "email"),
        ("carol", "name"),
        ("carol", "email"),
    ] {
        let e = svc
            .get_fields(get(id, &[field], "customer_service"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{id}.{field}: {e:?}");
        assert!(
            e.message().contains("integrity check failed") && e.message().contains(field),
            "{}",
            e.message()
        );
        assert!(!e.message().contains("1380000"), "no value in the message");
    }
    let e = svc
        .get_fields(get("dave", &["name"], "customer_service"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(
        e.message().contains("stored record of customer `dave`"),
        "{}",
        e.message()
    );
    // Untouched fields still read.
    let ok = svc
        .get_fields(get("alice", &["phone", "name"], "customer_service"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        revealed(&ok.fields[1]),
        Some(&sovra_proto::vault::v1::value::Kind::Text(
            "+8613800000001".into()
        ))
    );
    let ok = svc
        .get_fields(get("bob", &["email"], "customer_service"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.fields.len(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn a_data_key_moved_to_another_customer_does_not_unwrap() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    svc.put_record(put("alice", &[("phone", text("13800000001"))]))
        .await
        .unwrap();
    svc.put_record(put("bob", &[("phone", text("13800000002"))]))
        .await
        .unwrap();
    srv.stop().await;
    {
        let db = open_raw(&env.data_dir());
        let keys = db.open_tree("data_keys").unwrap();
        let a = keys.get(data_key_key(&env, "alice")).unwrap().unwrap();
        keys.insert(data_key_key(&env, "bob"), a).unwrap();
        db.flush().unwrap();
    }
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let e = svc
        .get_fields(get("bob", &[], "customer_service"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    assert!(
        e.message().contains("data key of customer `bob`"),
        "{}",
        e.message()
    );
    // A rotation skips the damaged key instead of stalling on it.
    let mut adm = srv.client(Some(&env.admin)).await;
    adm.rotate_tenant_key(sovra_proto::vault::v1::RotateTenantKeyRequest {})
        .await
        .unwrap();
    let s = wait_rotation(&mut adm).await;
    assert_eq!(
        s.data_keys_by_version.get(&2),
        Some(&1),
        "alice re-wrapped: {:?}",
        s.data_keys_by_version
    );
    assert_eq!(
        s.data_keys_by_version.get(&1),
        Some(&1),
        "bob's damaged key left as it was"
    );
    assert!(svc
        .get_fields(get("alice", &[], "customer_service"))
        .await
        .is_ok());
    srv.stop().await;
}
