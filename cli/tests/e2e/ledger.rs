//! The consent ledger end to end: consent through gRPC, refusal after
//! withdrawal, audit bundles verified by `sovra audit verify` as a separate
//! process, tampering with the stored log, kill -9 during consent appends,
//! erasure leaving entries verifiable but unlinkable, and bad input.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::prelude::{Engine as _, BASE64_STANDARD};
use sovra_ledger::bundle::check_consistency;
use sovra_ledger::{verify_checkpoint, verify_receipt, ConsistencyProof, SignedCheckpoint};
use sovra_proto::ledger::v1 as lpb;
use sovra_vault::client::{self, LedgerClient};
use tonic::Code;

use sovra_testkit::*;

use crate::SOVRA;

/// (index, entry bytes) of an acknowledged consent.
type Acked = (u64, Vec<u8>);

async fn ledger(url: &str, token: &str) -> LedgerClient {
    client::connect_ledger(url, Some(token), None)
        .await
        .unwrap()
}

fn sovra(args: &[&str]) -> std::process::Output {
    Command::new(SOVRA).args(args).output().unwrap()
}

fn out(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawal_refuses_reads_and_bundles_verify_offline() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let mut led = ledger(&srv.url, &env.service).await;
    let mut off = ledger(&srv.url, &env.officer).await;
    svc.put_record(put(
        "c-1",
        &[
            ("phone", text("13800138000")),
            ("email", text("Ann@Example.com")),
        ],
    ))
    .await
    .unwrap();

    let r = led
        .record_consent(consent("c-1", "marketing", true))
        .await
        .unwrap()
        .into_inner();
    let (entry, cp) = verify_receipt(&r.entry, r.proof.as_bytes(), &r.verifier_key).unwrap();
    assert_eq!(entry.seq, r.index);
    assert!(cp.size > r.index);
    led.record_consent(consent("c-1", "customer_service", true))
        .await
        .unwrap();
    svc.get_fields(get("c-1", &["phone"], "marketing"))
        .await
        .unwrap();

    // The officer keeps a checkpoint now; later bundles must extend it.
    let old_cp = off
        .get_checkpoint(lpb::GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    let dir = env.dir.path();
    std::fs::write(dir.join("old.cp"), &old_cp.note).unwrap();
    std::fs::write(dir.join("log.vkey"), &old_cp.verifier_key).unwrap();

    led.record_consent(consent("c-1", "marketing", false))
        .await
        .unwrap();
    // From the next request on, the withdrawn purpose is refused...
    let e = svc
        .get_fields(get("c-1", &["phone"], "marketing"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("withdrew consent"), "{}", e.message());
    assert!(!e.message().contains("13800138000"));
    // ...while another consented purpose still reads.
    let ok = svc
        .get_fields(get("c-1", &["phone"], "customer_service"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.fields.len(), 1);

    let st = led
        .get_consent_state(lpb::GetConsentStateRequest {
            customer_id: "c-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let by: std::collections::HashMap<_, _> = st
        .purposes
        .iter()
        .map(|p| (p.purpose.as_str(), p.action))
        .collect();
    assert_eq!(by["marketing"], lpb::ConsentAction::Withdraw as i32);
    assert_eq!(by["customer_service"], lpb::ConsentAction::Grant as i32);

    // Export the bundle with the real CLI, then verify it offline as a
    // separate process, pinned to the key and the officer's old checkpoint.
    let bundle = dir.join("c-1.bundle.json");
    let o = sovra(&[
        "audit",
        "bundle",
        "--server",
        &srv.url,
        "--token",
        &env.officer,
        "--customer",
        "c-1",
        "--since",
        dir.join("old.cp").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", out(&o));
    let key = dir.join("log.vkey");
    let o = sovra(&[
        "audit",
        "verify",
        bundle.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--since",
        dir.join("old.cp").to_str().unwrap(),
    ]);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("VERIFIED"), "{text}");
    assert!(
        text.contains("consistent with your older checkpoint"),
        "{text}"
    );
    // the write, consent granted x2, a reveal, a withdrawal, a denied
    // reveal, a reveal.
    assert!(text.contains("7 entries"), "{text}");
    assert!(text.contains("fields_written"), "{text}");
    assert!(text.contains("decision=denied"), "{text}");

    // A separately fetched consistency proof works as well.
    let plain = dir.join("plain.bundle.json");
    let o = sovra(&[
        "audit",
        "bundle",
        "--server",
        &srv.url,
        "--token",
        &env.officer,
        "--customer",
        "c-1",
        "-o",
        plain.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", out(&o));
    let proof = dir.join("proof.json");
    let o = sovra(&[
        "audit",
        "consistency",
        "--server",
        &srv.url,
        "--token",
        &env.officer,
        "--since",
        dir.join("old.cp").to_str().unwrap(),
        "--bundle",
        plain.to_str().unwrap(),
        "-o",
        proof.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", out(&o));
    let verify = |b: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "audit",
            "verify",
            b.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        sovra(&args)
    };
    let o = verify(
        &plain,
        &[
            "--since",
            dir.join("old.cp").to_str().unwrap(),
            "--consistency",
            proof.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    // Without the proof, the check against the old checkpoint cannot pass.
    let o = verify(&plain, &["--since", dir.join("old.cp").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(out(&o).contains("no consistency proof"), "{}", out(&o));

    // A bundle altered the way a tampered log would show it is rejected,
    // naming the entry.
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();
    let tampered = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut j = json.clone();
        f(&mut j);
        let p = dir.join("tampered.json");
        std::fs::write(&p, serde_json::to_vec(&j).unwrap()).unwrap();
        let o = verify(&p, &[]);
        assert!(!o.status.success(), "tampered bundle verified: {}", out(&o));
        out(&o)
    };
    let edited = tampered(&|j| {
        let e = j["entries"][1]["entry"].as_str().unwrap();
        let mut b = BASE64_STANDARD.decode(e).unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        j["entries"][1]["entry"] = BASE64_STANDARD.encode(b).into();
    });
    assert!(
        edited.contains("FAILED") && edited.contains("bundle position 1"),
        "{edited}"
    );
    // An entry deleted from the log: the next one would sit at its index.
    let deleted = tampered(&|j| {
        let next = j["entries"][2]["entry"].clone();
        j["entries"][1]["entry"] = next;
    });
    assert!(deleted.contains("bundle position 1"), "{deleted}");
    let reordered = tampered(&|j| {
        let a = j["entries"][2].clone();
        j["entries"][2] = j["entries"][3].clone();
        j["entries"][3] = a;
    });
    assert!(reordered.contains("indexes must increase"), "{reordered}");
    let misleading = tampered(&|j| {
        j["entries"][0]["decoded"]["purpose"] = "customer_service".into();
    });
    assert!(misleading.contains("`decoded` part"), "{misleading}");
    // Another log's key, or a truncated bundle: refused.
    let other = sovra_ledger::LogKey::from_seed("sovra.local/other", &[1; 32]).unwrap();
    let o = sovra(&[
        "audit",
        "verify",
        bundle.to_str().unwrap(),
        "--key",
        &other.verifier_key(),
    ]);
    assert!(!o.status.success());
    assert!(out(&o).contains("different verifier key"), "{}", out(&o));
    let raw = std::fs::read(&bundle).unwrap();
    std::fs::write(dir.join("trunc.json"), &raw[..raw.len() / 2]).unwrap();
    let o = verify(&dir.join("trunc.json"), &[]);
    assert!(!o.status.success());
    assert!(out(&o).contains("not a valid audit bundle"), "{}", out(&o));

    // The consent view rebuilt from the entries alone matches the stored one.
    let l = srv.handle.ledger();
    assert_eq!(
        l.derive_consent_view().unwrap(),
        l.stored_consent_view().unwrap()
    );
    let mut adm = ledger(&srv.url, &env.admin).await;
    let rb = adm
        .rebuild_consent_state(lpb::RebuildConsentStateRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rb.corrected, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_bad_input_get_clear_errors() {
    let env = Env::new();
    let srv = env.start().await;
    let mut led = ledger(&srv.url, &env.service).await;
    let mut off = ledger(&srv.url, &env.officer).await;
    let mut partner = ledger(&srv.url, &env.partner).await;
    let r = led
        .record_consent(consent("c-2", "marketing", true))
        .await
        .unwrap()
        .into_inner();

    // Roles: partners nothing, officers no recording, services no audit.
    let e = partner
        .get_checkpoint(lpb::GetCheckpointRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = partner
        .record_consent(consent("c-2", "marketing", true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = off
        .record_consent(consent("c-2", "marketing", true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = led
        .export_audit_bundle(lpb::ExportAuditBundleRequest {
            customer_id: "c-2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut anon = client::connect_ledger(&srv.url, None, None).await.unwrap();
    assert_eq!(
        anon.get_checkpoint(lpb::GetCheckpointRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    let bad = |f: &dyn Fn(&mut lpb::RecordConsentRequest)| {
        let mut r = consent("c-2", "marketing", true);
        f(&mut r);
        r
    };
    for (req, needle) in [
        (
            bad(&|r| r.purpose = "world_domination".into()),
            "unknown purpose",
        ),
        (bad(&|r| r.purpose = "p".repeat(100_000)), "purpose"),
        (bad(&|r| r.legal_basis = "because".into()), "legal basis"),
        (
            bad(&|r| r.evidence_sha256 = vec![1; 4096]),
            "32-byte SHA-256",
        ),
        (bad(&|r| r.evidence_sha256 = Vec::new()), "32-byte SHA-256"),
        (bad(&|r| r.action = 0), "action"),
        (bad(&|r| r.action = 99), "action"),
        (bad(&|r| r.customer_id = "a b\u{0}c".into()), "customer_id"),
        (bad(&|r| r.channel = "x".repeat(65)), "channel"),
        (
            bad(&|r| r.notice_version = "Mr Smith's notice".into()),
            "notice_version",
        ),
    ] {
        let e = led.record_consent(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{needle}: {e:?}");
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    }

    // Sizes beyond the log, size 0, inverted ranges.
    let size = off
        .get_checkpoint(lpb::GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner()
        .tree_size;
    let e = off
        .get_inclusion_proof(lpb::GetInclusionProofRequest {
            index: 0,
            tree_size: size + 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("beyond the log"));
    let e = off
        .get_inclusion_proof(lpb::GetInclusionProofRequest {
            index: u64::MAX,
            tree_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    let e = off
        .get_consistency_proof(lpb::GetConsistencyProofRequest {
            from_size: 0,
            to_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("size 0"), "{}", e.message());
    let e = off
        .get_consistency_proof(lpb::GetConsistencyProofRequest {
            from_size: size + 1,
            to_size: size,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = off
        .get_consistency_proof(lpb::GetConsistencyProofRequest {
            from_size: 1,
            to_size: u64::MAX,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    let e = off
        .get_entries(lpb::GetEntriesRequest {
            start: 5,
            end: u64::MAX,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    let e = off
        .export_audit_bundle(lpb::ExportAuditBundleRequest {
            customer_id: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = off
        .export_audit_bundle(lpb::ExportAuditBundleRequest {
            customer_id: "c-2".into(),
            from_ms: 10,
            to_ms: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Entries stream and decode; each is what the receipt named.
    let mut s = off
        .get_entries(lpb::GetEntriesRequest { start: 0, end: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(e) = s.message().await.unwrap() {
        if e.index == r.index {
            assert_eq!(e.entry, r.entry);
            assert!(e.decoded_json.contains("consent_granted"));
        }
        n += 1;
    }
    assert_eq!(n, size);

    // Hostile bundle, proof and key files for the offline verifier.
    let dir = env.dir.path();
    for (name, content) in [
        ("empty.json", &b""[..]),
        ("array.json", b"[1,2,3]"),
        (
            "wrongver.json",
            br#"{"format":"sovra-audit-bundle","version":9}"#,
        ),
        ("binary.json", &[0xff, 0xfe, 0, 1][..]),
    ] {
        std::fs::write(dir.join(name), content).unwrap();
        let o = sovra(&["audit", "verify", dir.join(name).to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", out(&o));
        assert!(out(&o).contains("FAILED"), "{name}: {}", out(&o));
    }
    let o = sovra(&[
        "audit",
        "verify",
        dir.join("missing.json").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    srv.stop().await;
}

/// Flips, deletes or swaps entries in the stopped server's ledger and
/// checks that the server refuses to start, naming where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_ledger_is_detected_at_start_naming_the_entry() {
    for (case, needle) in [
        ("edit", "entry 3"),
        ("delete", "entry 2 is missing"),
        (
            "reorder",
            "entry stored at index 1 carries sequence number 2",
        ),
        ("truncate", "entries 5..6 were removed"),
    ] {
        let env = Env::new();
        let srv = env.start().await;
        let mut led = ledger(&srv.url, &env.service).await;
        // Entry 0 records the policy set in force at start-up; 1..=5 are
        // consents.
        for i in 0..5 {
            led.record_consent(consent(&format!("t-{i}"), "marketing", true))
                .await
                .unwrap();
        }
        srv.stop().await;
        {
            let db = open_raw(&env.data_dir().join("ledger"));
            let log = db.open_tree("log").unwrap();
            let key = |i: u64| {
                let mut k = vec![b'e'];
                k.extend_from_slice(&i.to_be_bytes());
                k
            };
            match case {
                "edit" => {
                    let mut v = log.get(key(3)).unwrap().unwrap().to_vec();
                    let n = v.len();
                    v[n - 3] ^= 0x20;
                    log.insert(key(3), v).unwrap();
                }
                "delete" => {
                    log.remove(key(2)).unwrap();
                }
                "reorder" => {
                    let a = log.get(key(1)).unwrap().unwrap();
                    let b = log.get(key(2)).unwrap().unwrap();
                    log.insert(key(1), b).unwrap();
                    log.insert(key(2), a).unwrap();
                }
                _ => {
                    // Drop the last entry and shrink the size: the signed
                    // checkpoint still remembers it.
                    log.remove(key(5)).unwrap();
                    log.insert(b"m/size", &5u64.to_be_bytes()[..]).unwrap();
                }
            }
            db.flush().unwrap();
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = sovra_vault::server::start(&env.config(), Some(l), std::future::pending())
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{case}: {e}");
        assert!(e.contains("integrity"), "{case}: {e}");
        // The real binary refuses too, with the same message.
        let o = sovra(&["serve", "--config", env.config_path.to_str().unwrap()]);
        assert!(!o.status.success(), "{case}");
        assert!(out(&o).contains(needle), "{case}: {}", out(&o));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_consents_survive_sigkill_and_the_log_stays_consistent() {
    let env = Env::new();
    let port = free_port();
    let mut child = spawn_server(SOVRA, &env, port).await;
    let url = format!("http://127.0.0.1:{port}");

    // (index, entry bytes) of every acknowledged consent, and the largest
    // checkpoint any receipt carried.
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let last_cp: Arc<Mutex<Option<SignedCheckpoint>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (acked, last_cp, url, token) = (
            acked.clone(),
            last_cp.clone(),
            url.clone(),
            env.service.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut c = ledger(&url, &token).await;
            for i in 0.. {
                let Ok(r) = c
                    .record_consent(consent(&format!("k{w}-{i}"), "marketing", i % 3 != 0))
                    .await
                else {
                    return;
                };
                let r = r.into_inner();
                let (_, cp) =
                    verify_receipt(&r.entry, r.proof.as_bytes(), &r.verifier_key).unwrap();
                acked.lock().unwrap().push((r.index, r.entry));
                let mut l = last_cp.lock().unwrap();
                if l.as_ref().is_none_or(|l| l.size < cp.size) {
                    *l = Some(cp);
                }
            }
        }));
    }
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if acked.lock().unwrap().len() >= 300 {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL mid-stream
    child.wait().unwrap();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let acked = acked.lock().unwrap().clone();
    let before = last_cp.lock().unwrap().clone().unwrap();

    let port = free_port();
    let mut child = spawn_server(SOVRA, &env, port).await;
    let mut off = ledger(&format!("http://127.0.0.1:{port}"), &env.officer).await;
    let after = off
        .get_checkpoint(lpb::GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    let after_cp = verify_checkpoint(after.note.as_bytes(), &after.verifier_key).unwrap();
    assert!(after_cp.size >= before.size);
    assert!(after_cp.size as usize >= acked.len());
    for (index, entry) in &acked {
        let p = off
            .get_inclusion_proof(lpb::GetInclusionProofRequest {
                index: *index,
                tree_size: after_cp.size,
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged consent {index} lost: {e:?}"))
            .into_inner();
        assert_eq!(&p.entry, entry, "entry {index} changed");
        sovra_ledger::verify_inclusion(
            *index,
            after_cp.size,
            &sovra_ledger::leaf_hash(entry),
            &p.hashes,
            &after_cp.root,
        )
        .unwrap();
    }
    // The last checkpoint before the crash and the first after it are
    // consistent: nothing acknowledged was rewritten.
    let p = off
        .get_consistency_proof(lpb::GetConsistencyProofRequest {
            from_size: before.size,
            to_size: after_cp.size,
        })
        .await
        .unwrap()
        .into_inner();
    let hashes: Vec<[u8; 32]> = p
        .hashes
        .iter()
        .map(|h| h.as_slice().try_into().unwrap())
        .collect();
    check_consistency(
        &before,
        &after_cp,
        Some(&ConsistencyProof::new(before.size, after_cp.size, &hashes)),
    )
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erased_customers_entries_remain_verifiable_but_unlinkable() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let mut adm = srv.client(Some(&env.admin)).await;
    let mut led = ledger(&srv.url, &env.service).await;
    let mut off = ledger(&srv.url, &env.officer).await;
    let phone = "13912345678";
    let email = "zoe.unique@example.org";
    svc.put_record(put(
        "cust-zoe-77",
        &[
            ("phone", text(phone)),
            ("email", text(email)),
            ("name", text("Zoe Quux")),
        ],
    ))
    .await
    .unwrap();
    led.record_consent(consent("cust-zoe-77", "marketing", true))
        .await
        .unwrap();
    svc.get_fields(get("cust-zoe-77", &[], "marketing"))
        .await
        .unwrap();
    let b = off
        .export_audit_bundle(lpb::ExportAuditBundleRequest {
            customer_id: "cust-zoe-77".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let before: sovra_ledger::AuditBundle = serde_json::from_str(&b.json).unwrap();
    let receipt = adm
        .erase_customer(sovra_proto::vault::v1::EraseCustomerRequest {
            customer_id: "cust-zoe-77".into(),
            reason: "gdpr_art17".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.subject, before.subject);

    // The entries remain and verify: every one in the old bundle is still
    // included in the current tree, and the erasure entry is there too.
    let cp = off
        .get_checkpoint(lpb::GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    let cp = verify_checkpoint(cp.note.as_bytes(), &cp.verifier_key).unwrap();
    let mut all = Vec::new();
    let mut s = off
        .get_entries(lpb::GetEntriesRequest {
            start: 0,
            end: cp.size,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(e) = s.message().await.unwrap() {
        let p = off
            .get_inclusion_proof(lpb::GetInclusionProofRequest {
                index: e.index,
                tree_size: cp.size,
            })
            .await
            .unwrap()
            .into_inner();
        sovra_ledger::verify_inclusion(
            e.index,
            cp.size,
            &sovra_ledger::leaf_hash(&e.entry),
            &p.hashes,
            &cp.root,
        )
        .unwrap();
        all.push(e);
    }
    for be in &before.entries {
        assert_eq!(
            BASE64_STANDARD.encode(&all[be.index as usize].entry),
            be.entry
        );
    }
    let erased = &all[receipt.ledger_index as usize];
    assert!(erased.decoded_json.contains("customer_erased"));
    assert!(erased.decoded_json.contains(&before.subject));

    // No entry holds the customer id or any value, in bytes or decoded.
    for e in &all {
        for needle in ["cust-zoe-77", phone, email, "Zoe", "zoe.unique"] {
            assert!(
                !e.decoded_json.contains(needle),
                "entry {} holds {needle}",
                e.index
            );
            assert!(
                !e.entry
                    .windows(needle.len())
                    .any(|w| w == needle.as_bytes()),
                "entry {} bytes hold {needle}",
                e.index
            );
        }
    }
    // Nor does any file of the ledger.
    srv.stop().await;
    for needle in ["cust-zoe-77", phone, email] {
        assert_eq!(
            occurs_in(&env.data_dir().join("ledger"), needle.as_bytes()),
            None,
            "{needle}"
        );
    }
    // The pseudonym can no longer be recomputed: the vault has no salt for
    // the customer, and a new customer with the same id gets a new one.
    let srv = env.start().await;
    let mut off = ledger(&srv.url, &env.officer).await;
    let e = off
        .export_audit_bundle(lpb::ExportAuditBundleRequest {
            customer_id: "cust-zoe-77".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("erased"), "{}", e.message());
    let mut led = ledger(&srv.url, &env.service).await;
    let again = led
        .record_consent(consent("cust-zoe-77", "marketing", true))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(again.subject, before.subject);
    srv.stop().await;
}
