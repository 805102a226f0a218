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

/// What the clients were told was done, across the rounds.
#[derive(Default)]
pub(crate) struct Acked {
    /// (customer, purchase_count) of each acknowledged write.
    pub(crate) writes: Vec<(String, i64)>,
    /// (customer, reads acknowledged) of the read customers.
    pub(crate) reads: std::collections::BTreeMap<String, usize>,
    /// (index, entry bytes) of each acknowledged consent.
    pub(crate) consents: Vec<(u64, Vec<u8>)>,
    /// The largest checkpoint a receipt carried.
    pub(crate) checkpoint: Option<sovra_ledger::SignedCheckpoint>,
    /// Why each client stopped (the kill, or a failure to report).
    pub(crate) stopped: Vec<String>,
}

/// Starts three writers (write, then read back) and three consent
/// recorders against `url`, and returns once each kind has gone on for at
/// least 60 more acknowledged calls; the tasks run on until their server
/// dies.
pub(crate) async fn mixed_load(
    url: &str,
    env: &Env,
    acked: &Arc<Mutex<Acked>>,
    round: u32,
) -> Vec<tokio::task::JoinHandle<()>> {
    let start = {
        let a = acked.lock().unwrap();
        (
            a.writes.len(),
            a.consents.len(),
            a.reads.values().sum::<usize>(),
        )
    };
    let mut tasks = Vec::new();
    for w in 0..3 {
        let (acked, url, token) = (acked.clone(), url.to_owned(), env.service.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = sovra_vault::client::connect(&url, Some(&token), None)
                .await
                .unwrap();
            for i in 0i64.. {
                let id = format!("r{round}-w{w}-{i}");
                // Within the field's range 0..=1,000,000.
                let count = i64::from(round) * 300_000 + w * 100_000 + i % 100_000;
                if let Err(e) = c
                    .put_record(put(&id, &[("purchase_count", int(count))]))
                    .await
                {
                    acked.lock().unwrap().stopped.push(format!("put: {e}"));
                    return;
                }
                acked.lock().unwrap().writes.push((id.clone(), count));
                // Read it back: an audited, lineage-recorded read.
                if let Err(e) = c.get_fields(get(&id, &["purchase_count"], "billing")).await {
                    acked.lock().unwrap().stopped.push(format!("read: {e}"));
                    return;
                }
                *acked.lock().unwrap().reads.entry(id).or_default() += 1;
            }
        }));
    }
    for w in 0..3 {
        let (acked, url, token) = (acked.clone(), url.to_owned(), env.service.clone());
        tasks.push(tokio::spawn(async move {
            let mut l = sovra_vault::client::connect_ledger(&url, Some(&token), None)
                .await
                .unwrap();
            for i in 0.. {
                let req = consent(&format!("c{round}-{w}-{i}"), "marketing", i % 2 == 0);
                let r = match l.record_consent(req).await {
                    Ok(r) => r,
                    Err(e) => {
                        acked.lock().unwrap().stopped.push(format!("consent: {e}"));
                        return;
                    }
                };
                let r = r.into_inner();
                let (_, cp) =
                    sovra_ledger::verify_receipt(&r.entry, r.proof.as_bytes(), &r.verifier_key)
                        .unwrap();
                let mut a = acked.lock().unwrap();
                a.consents.push((r.index, r.entry));
                if a.checkpoint.as_ref().is_none_or(|c| c.size < cp.size) {
                    a.checkpoint = Some(cp);
                }
            }
        }));
    }
    // Until every kind of work has gone on for a while, then SIGKILL.
    let began = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let a = acked.lock().unwrap();
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "round {round}: the load stalled; clients stopped: {:?}",
            a.stopped
        );
        let reads: usize = a.reads.values().sum();
        if a.writes.len() >= start.0 + 60
            && a.consents.len() >= start.1 + 60
            && reads >= start.2 + 60
        {
            break;
        }
    }
    tasks
}

/// Checks, on a restarted server, everything acknowledged before the kills.
pub(crate) async fn check_acknowledged(url: &str, env: &Env, acked: &Acked) {
    use sovra_proto::ledger::v1 as lpb;
    use sovra_proto::lineage::v1 as lin;
    let mut c = sovra_vault::client::connect(url, Some(&env.service), None)
        .await
        .unwrap();
    for (id, count) in &acked.writes {
        let got = c
            .get_fields(get(id, &["purchase_count"], "billing"))
            .await
            .unwrap_or_else(|e| panic!("acknowledged write {id} lost: {e:?}"))
            .into_inner();
        assert_eq!(
            revealed(&got.fields[0]),
            Some(&pb::value::Kind::Integer(*count)),
            "{id}"
        );
    }
    // Every acknowledged read left its lineage record (the checks above add
    // reads of their own, so at least as many as acknowledged).
    let mut lineage = sovra_vault::client::connect_lineage(url, Some(&env.officer), None)
        .await
        .unwrap();
    for (id, n) in &acked.reads {
        let a = lineage
            .list_accesses(lin::ListAccessesRequest {
                customer_id: id.clone(),
                field: "purchase_count".into(),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            a.accesses.len() >= *n,
            "{id}: {} of {n} reads",
            a.accesses.len()
        );
    }
    // Every acknowledged consent is in the log with identical bytes, and
    // the log extends the last checkpoint a client saw.
    let mut off = sovra_vault::client::connect_ledger(url, Some(&env.officer), None)
        .await
        .unwrap();
    let cp = off
        .get_checkpoint(lpb::GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    let cp = sovra_ledger::verify_checkpoint(cp.note.as_bytes(), &cp.verifier_key).unwrap();
    for (index, entry) in &acked.consents {
        let p = off
            .get_inclusion_proof(lpb::GetInclusionProofRequest {
                index: *index,
                tree_size: cp.size,
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged consent {index} lost: {e:?}"))
            .into_inner();
        assert_eq!(&p.entry, entry, "entry {index} changed");
        sovra_ledger::verify_inclusion(
            *index,
            cp.size,
            &sovra_ledger::leaf_hash(entry),
            &p.hashes,
            &cp.root,
        )
        .unwrap();
    }
    if let Some(before) = &acked.checkpoint {
        let p = off
            .get_consistency_proof(lpb::GetConsistencyProofRequest {
                from_size: before.size,
                to_size: cp.size,
            })
            .await
            .unwrap()
            .into_inner();
        sovra_ledger::verify_consistency(before.size, cp.size, &p.hashes, &before.root, &cp.root)
            .unwrap();
    }
}

/// Writes, reads and consents run together against the real server, which
/// is killed with SIGKILL mid-load three times: after each restart, every
/// write, read (its lineage record), consent (its entry, byte for byte)
/// acknowledged in any round is there, and the log is consistent with the
/// last checkpoint any client saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_work_survives_three_kills_under_mixed_load() {
    let env = Env::new();
    let acked: Arc<Mutex<Acked>> = Arc::default();
    for round in 0..3 {
        let port = free_port();
        let mut child = spawn_server(SOVRA, &env, port).await;
        let url = format!("http://127.0.0.1:{port}");
        if round > 0 {
            let snapshot = std::mem::take(&mut *acked.lock().unwrap());
            check_acknowledged(&url, &env, &snapshot).await;
            *acked.lock().unwrap() = snapshot;
        }
        let tasks = mixed_load(&url, &env, &acked, round).await;
        child.kill().unwrap();
        child.wait().unwrap();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
    let port = free_port();
    let mut child = spawn_server(SOVRA, &env, port).await;
    let snapshot = std::mem::take(&mut *acked.lock().unwrap());
    assert!(snapshot.writes.len() >= 180 && snapshot.consents.len() >= 180);
    check_acknowledged(&format!("http://127.0.0.1:{port}"), &env, &snapshot).await;
    child.kill().unwrap();
    child.wait().unwrap();
}
