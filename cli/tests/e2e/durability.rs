//! Acknowledged writes survive kill -9 of the real server process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sovra_proto::vault::v1 as pb;

use sovra_testkit::*;

use crate::SOVRA;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let env = Env::new();
    let port = free_port();
    let mut child = spawn_server(SOVRA, &env, port).await;
    let url = format!("http://127.0.0.1:{port}");

    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..8 {
        let acked = acked.clone();
        let url = url.clone();
        let token = env.service.clone();
        writers.push(tokio::spawn(async move {
            let mut c = sovra_vault::client::connect(&url, Some(&token), None)
                .await
                .unwrap();
            for i in 0i64.. {
                let id = format!("w{w}-{i}");
                let count = w * 100_000 + i;
                let req = put(
                    &id,
                    &[
                        ("purchase_count", int(count)),
                        (
                            "phone",
                            text(&format!("1380000{:04}", (w * 1000 + i) % 10_000)),
                        ),
                    ],
                );
                match c.put_record(req).await {
                    Ok(_) => acked.lock().unwrap().push((id, count)),
                    Err(_) => return, // the server died mid-call: not acknowledged
                }
            }
        }));
    }
    // Let writes stream, then kill without warning.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if acked.lock().unwrap().len() >= 300 {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 300);

    // Restart on the same data directory: every acknowledged write is there.
    let port = free_port();
    let mut child = spawn_server(SOVRA, &env, port).await;
    let mut c = sovra_vault::client::connect(
        &format!("http://127.0.0.1:{port}"),
        Some(&env.service),
        None,
    )
    .await
    .unwrap();
    for (id, count) in &acked {
        let got = c
            .get_fields(get(id, &["purchase_count"], "billing"))
            .await
            .unwrap_or_else(|e| panic!("acknowledged write {id} lost: {e:?}"))
            .into_inner();
        assert_eq!(got.fields.len(), 1, "{id}");
        assert_eq!(
            revealed(&got.fields[0]),
            Some(&pb::value::Kind::Integer(*count)),
            "{id}"
        );
        assert_eq!(got.fields[0].version, 1);
    }
    // The blind index survived with the records.
    let (id, _) = &acked[acked.len() / 2];
    let (w, i): (i64, i64) = {
        let rest = id.trim_start_matches('w');
        let (w, i) = rest.split_once('-').unwrap();
        (w.parse().unwrap(), i.parse().unwrap())
    };
    let phone = format!("1380000{:04}", (w * 1000 + i) % 10_000);
    let s = c
        .search(search_req("phone", &phone, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(
        s.customer_ids.contains(id),
        "{phone} -> {:?}",
        s.customer_ids
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
