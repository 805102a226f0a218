//! Crypto-shredding: after an erasure, the raw data directory holds none of
//! the customer's plaintext values, not their data key, and not the pad
//! without which the wrapped key sled may still hold is useless, even to
//! someone holding the root key.

use prost::Message;
use sovra_proto::vault::v1 as pb;
use sovra_vault::config::Config;
use sovra_vault::crypto::keys::{KeyRing, WrappedKey};
use sovra_vault::{client, synthetic};

use sovra_testkit::*;

/// (wrapped key, pad) of a customer, read from a stopped server's files.
fn key_material(env: &Env, customer: &str) -> (WrappedKey, Vec<u8>) {
    let db = open_raw(&env.data_dir());
    let w = db
        .open_tree("data_keys")
        .unwrap()
        .get(data_key_key(env, customer))
        .unwrap()
        .unwrap();
    let w = WrappedKey::decode(&w[..]).unwrap();
    let slots = std::fs::read(env.data_dir().join("shred.slots")).unwrap();
    let off = 16 + w.slot as usize * 32;
    (w, slots[off..off + 32].to_vec())
}

#[tokio::test]
async fn erased_customer_leaves_no_plaintext_no_data_key_and_no_pad_on_disk() {
    if file_backend_only(
        "it scans shred.slots and the log's segment files (postgres.rs scans the database's files)",
    ) {
        return;
    }
    let env = Env::new();
    let people = synthetic::generate(11, 40);
    let victim = &people[17];
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    for c in &people {
        svc.put_record(c.to_request("web_form")).await.unwrap();
    }
    srv.stop().await;

    // Recover the victim's data key the way an attacker holding the root key
    // and a copy of the disk would, to look for it afterwards.
    let (wrapped, pad) = key_material(&env, &victim.id);
    let root = Config::load(&env.config_path)
        .unwrap()
        .load_root_key()
        .unwrap();
    let pad_arr: [u8; 32] = pad.clone().try_into().unwrap();
    let dek = {
        let ring = KeyRing::new(root);
        let p = sovra_vault::crypto::shred::Pad::from_bytes_for_tests(pad_arr);
        ring.unwrap("default", &victim.id, &wrapped, &p)
            .unwrap()
            .expose_for_tests()
            .to_vec()
    };

    let srv = env.start().await;
    let mut adm = srv.client(Some(&env.admin)).await;
    adm.erase_customer(pb::EraseCustomerRequest {
        customer_id: victim.id.clone(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    srv.stop().await; // flushes

    let data = env.data_dir();
    let files = files_under(&data);
    assert!(files.len() >= 3);
    // The scan covers the write-ahead log's segments, which still hold the
    // frames of the victim's writes (a segment is deleted only once full
    // and behind both views).
    assert!(
        files
            .iter()
            .any(|p| p.starts_with(data.join("wal")) && p.extension().is_some_and(|e| e == "wal")),
        "no log segment under {}: {files:?}",
        data.display()
    );
    let mut needles: Vec<Vec<u8>> = victim
        .secrets()
        .into_iter()
        .map(String::into_bytes)
        .collect();
    needles.push(victim.phone_e164.as_bytes()[3..].to_vec()); // national number
    for n in &needles {
        assert_eq!(
            occurs_in(&data, n),
            None,
            "plaintext {:?} found on disk",
            String::from_utf8_lossy(n)
        );
    }
    assert_eq!(occurs_in(&data, &dek), None, "the data key is on disk");
    // sled may keep the old wrapped key in an unreclaimed segment; without
    // the pad it decrypts (with the root key) only to data key XOR pad.
    assert_eq!(occurs_in(&data, &pad), None, "the pad survived the erasure");

    // Nothing is ever stored in the clear, erased or not.
    for n in people[3].secrets() {
        assert_eq!(occurs_in(&data, n.as_bytes()), None);
    }
}

#[tokio::test]
async fn the_data_directory_holds_no_customer_id() {
    let env = Env::new();
    let ids: Vec<String> = (0..12).map(|i| format!("crm-id-{i:02}-q7zx")).collect();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let mut led = client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    for (i, id) in ids.iter().enumerate() {
        svc.put_record(put(
            id,
            &[
                ("phone", text(&format!("1380000{i:04}"))),
                ("email", text(&format!("{id}@example.com"))),
            ],
        ))
        .await
        .unwrap();
        led.record_consent(consent(id, "marketing", true))
            .await
            .unwrap();
        svc.get_fields(get(id, &["phone"], "customer_service"))
            .await
            .unwrap();
    }
    // Search resolves references back to ids (sealed with the pads).
    let hits = svc
        .search(search_req("email", &format!("{}@example.com", ids[4]), 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hits.customer_ids, vec![ids[4].clone()]);
    let mut adm = srv.client(Some(&env.admin)).await;
    adm.erase_customer(pb::EraseCustomerRequest {
        customer_id: ids[7].clone(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    srv.stop().await;
    // Nowhere in the data directory (vault, pads, ledger), erased or not.
    let data = env.data_dir();
    for id in &ids {
        assert_eq!(occurs_in(&data, id.as_bytes()), None, "{id} is on disk");
    }
}
