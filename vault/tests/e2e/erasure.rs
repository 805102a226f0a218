//! Crypto-shredding: after an erasure, the raw data directory holds none of
//! the customer's plaintext values and not their data key.

use prost::Message;
use sovra_vault::config::Config;
use sovra_vault::keys::{KeyRing, WrappedKey};
use sovra_vault::synthetic;

use crate::common::*;

#[tokio::test]
async fn erased_customer_leaves_no_plaintext_and_no_data_key_on_disk() {
    let env = Env::new();
    let people = synthetic::generate(11, 40);
    let victim = &people[17];
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    for c in &people {
        svc.put_record(c.to_request("web_form")).await.unwrap();
    }
    srv.stop().await;

    // Recover the victim's data key the way an attacker with the root key
    // would, to look for it on disk afterwards.
    let dek = {
        let db = open_raw(&env.data_dir());
        let w = db
            .open_tree("data_keys")
            .unwrap()
            .get(format!("default\0{}", victim.id))
            .unwrap()
            .unwrap();
        let w = WrappedKey::decode(&w[..]).unwrap();
        let root = Config::load(&env.config_path)
            .unwrap()
            .load_root_key()
            .unwrap();
        KeyRing::new(root)
            .unwrap("default", &victim.id, &w)
            .unwrap()
            .expose_for_tests()
            .to_vec()
    };

    let srv = env.start().await;
    let mut adm = srv.client(Some(&env.admin)).await;
    adm.erase_customer(sovra_proto::vault::v1::EraseCustomerRequest {
        customer_id: victim.id.clone(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    srv.stop().await; // flushes

    let data = env.data_dir();
    assert!(!files_under(&data).is_empty());
    let mut needles: Vec<Vec<u8>> = victim
        .secrets()
        .into_iter()
        .map(String::into_bytes)
        .collect();
    needles.push(victim.phone_e164[3..].as_bytes().to_vec()); // national number
    for n in &needles {
        assert_eq!(
            occurs_in(&data, n),
            None,
            "plaintext {:?} found on disk",
            String::from_utf8_lossy(n)
        );
    }
    assert_eq!(occurs_in(&data, &dek), None, "the data key is on disk");

    // And the values of customers never erased are not on disk either:
    // nothing is ever stored in the clear.
    for n in people[3].secrets() {
        assert_eq!(occurs_in(&data, n.as_bytes()), None);
    }
}
