//! Recovery tells faults from facts: files of a stopped server are lost,
//! truncated, altered or restored from an older copy, and the real `sovra`
//! binary is started on them. A fault refuses the start, naming the file,
//! and changes nothing; an erasure is recognised only by its ledger entry.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prost::Message;
use sovra_vault::crypto::keys::WrappedKey;
use tonic::Code;

use sovra_testkit::*;

/// Starts `sovra serve` on `env` and expects it to refuse: returns what it
/// printed. A server that comes up instead fails the test.
fn refused_start(env: &Env) -> String {
    set_listen(env, free_port());
    let log = env.dir.path().join("refused.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(crate::SOVRA)
        .args(["serve", "--config"])
        .arg(&env.config_path)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            let _ = child.wait();
            panic!(
                "the server started instead of refusing: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{out}");
    out
}

/// The real binary, serving `env`; stop it with [`stop`].
async fn serve_process(env: &Env) -> (std::process::Child, String) {
    let port = free_port();
    let child = spawn_server(crate::SOVRA, env, port).await;
    (child, format!("http://127.0.0.1:{port}"))
}

fn stop(mut child: std::process::Child) {
    // SIGTERM: a clean stop.
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

/// Copies of the vault's own files (everything in the data directory but
/// the ledger and the write-ahead log), to play a restore of an older
/// backup.
fn copy_vault_files(env: &Env, with_pads: bool) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    copy_tree(&env.data_dir(), out.path(), &|p: &Path| {
        p.file_name()
            .is_some_and(|n| n != "ledger" && n != "wal" && (with_pads || n != "shred.slots"))
    });
    out
}

fn copy_tree(from: &Path, to: &Path, keep: &dyn Fn(&Path) -> bool) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if !keep(&p) {
            continue;
        }
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &dest, &|_| true);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// Puts the copied files back over the data directory: the vault's files
/// now there (sled's newer segments and snapshots included) are removed
/// first, the ledger and the log (and the pads, unless copied) are kept.
fn restore(env: &Env, copy: &Path, with_pads: bool) {
    for e in std::fs::read_dir(env.data_dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap();
        if name == "ledger" || name == "wal" || (!with_pads && name == "shred.slots") {
            continue;
        }
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
    copy_tree(copy, &env.data_dir(), &|_| true);
}

fn wrapped(env: &Env, customer: &str) -> Option<WrappedKey> {
    let db = open_raw(&env.data_dir());
    let w = db
        .open_tree("data_keys")
        .unwrap()
        .get(data_key_key(env, customer))
        .unwrap()?;
    Some(WrappedKey::decode(&w[..]).unwrap())
}

fn slots_path(env: &Env) -> PathBuf {
    env.data_dir().join("shred.slots")
}

async fn three_customers(env: &Env) {
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    for (id, phone) in [
        ("ann", "13800000101"),
        ("ben", "13800000102"),
        ("cat", "13800000103"),
    ] {
        svc.put_record(put(id, &[("phone", text(phone)), ("name", text(id))]))
            .await
            .unwrap();
    }
    srv.stop().await;
}

/// Erases `customer` through a server started for it.
async fn erase(env: &Env, customer: &str) {
    let srv = env.start().await;
    let mut adm = srv.client(Some(&env.admin)).await;
    adm.erase_customer(sovra_proto::vault::v1::EraseCustomerRequest {
        customer_id: customer.into(),
        reason: "gdpr_art17".into(),
    })
    .await
    .unwrap();
    srv.stop().await;
}

async fn readable(url: &str, env: &Env, customer: &str) -> Result<usize, tonic::Status> {
    let mut svc = sovra_vault::client::connect(url, Some(&env.service), None)
        .await
        .unwrap();
    svc.get_fields(get(customer, &[], "billing"))
        .await
        .map(|r| r.into_inner().fields.len())
}

#[tokio::test]
async fn a_lost_truncated_zeroed_or_altered_pad_file_refuses_to_start_and_erases_nothing() {
    if file_backend_only("it alters shred.slots") {
        return;
    }
    let env = Env::new();
    three_customers(&env).await;
    let good = std::fs::read(slots_path(&env)).unwrap();
    let ben = wrapped(&env, "ben").unwrap();

    std::fs::remove_file(slots_path(&env)).unwrap();
    let out = refused_start(&env);
    assert!(
        out.contains("shred.slots")
            && out.contains("was missing")
            && out.contains("not an erasure"),
        "{out}"
    );

    std::fs::write(slots_path(&env), &good[..16 + 32]).unwrap();
    let out = refused_start(&env);
    assert!(
        out.contains("shred.slots") && out.contains("beyond the end of the file"),
        "{out}"
    );

    let mut zeroed = good.clone();
    let off = 16 + ben.slot as usize * 32;
    zeroed[off..off + 32].fill(0);
    std::fs::write(slots_path(&env), &zeroed).unwrap();
    let out = refused_start(&env);
    assert!(
        out.contains(&format!("slot {}", ben.slot)) && out.contains("records no erasure"),
        "{out}"
    );

    let mut flipped = good.clone();
    flipped[off + 5] ^= 0x40;
    std::fs::write(slots_path(&env), &flipped).unwrap();
    let out = refused_start(&env);
    assert!(
        out.contains(&format!("slot {}", ben.slot)) && out.contains("check value"),
        "{out}"
    );

    // Nothing was changed by the refusals: with the good file back, every
    // customer reads.
    std::fs::write(slots_path(&env), &good).unwrap();
    let (child, url) = serve_process(&env).await;
    for c in ["ann", "ben", "cat"] {
        assert!(readable(&url, &env, c).await.unwrap() > 0, "{c}");
    }
    stop(child);
}

#[tokio::test]
async fn an_interrupted_erasure_is_completed_at_start() {
    let env = Env::new();
    three_customers(&env).await;
    // The vault's database as it was before the erasure reached it.
    let before = copy_vault_files(&env, false);
    erase(&env, "ben").await;
    // The ledger entry and the zeroed pad are on disk, the rest of the
    // erasure is not: the process died in between.
    restore(&env, before.path(), false);
    assert!(wrapped(&env, "ben").is_some());
    let (child, url) = serve_process(&env).await;
    let e = readable(&url, &env, "ben").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(readable(&url, &env, "ann").await.unwrap() > 0);
    stop(child);
    assert!(wrapped(&env, "ben").is_none(), "the erasure was completed");
}

#[tokio::test]
async fn an_older_copy_of_the_vault_files_gets_the_ledgers_erasures_again() {
    if file_backend_only(
        "the views are caches there: the log, kept whole, brings an older copy up to date",
    ) {
        return;
    }
    let env = Env::new();
    three_customers(&env).await;
    let before = copy_vault_files(&env, true);
    erase(&env, "cat").await;
    // A backup of the vault's files (pads included) from before the erasure
    // is restored; the ledger is kept.
    restore(&env, before.path(), true);
    let cat = wrapped(&env, "cat").unwrap();
    let (child, url) = serve_process(&env).await;
    let e = readable(&url, &env, "cat").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(readable(&url, &env, "ben").await.unwrap() > 0);
    stop(child);
    let slots = std::fs::read(slots_path(&env)).unwrap();
    let off = 16 + cat.slot as usize * 32;
    assert!(
        slots[off..off + 32].iter().all(|&b| b == 0),
        "the restored pad was shredded again"
    );
}

/// A view older than the ledger whose recorded log position was forged (so
/// the log does not bring it up to date) is refused, naming the field and
/// the ledger entry, rather than serving ann's old phone number as current.
#[tokio::test]
async fn values_older_than_the_ledgers_versions_are_refused_not_served() {
    if file_backend_only(
        "the views are caches there: the log, kept whole, brings an older copy up to date",
    ) {
        return;
    }
    let env = Env::new();
    three_customers(&env).await;
    let before = copy_vault_files(&env, true);
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    for phone in ["13800000901", "13800000902"] {
        svc.put_record(put("ann", &[("phone", text(phone))]))
            .await
            .unwrap();
    }
    srv.stop().await;
    restore(&env, before.path(), true);
    let end = sovra_wal::Wal::open(&env.data_dir().join("wal"), Default::default())
        .unwrap()
        .wal
        .next_lsn();
    {
        let db = open_raw(&env.data_dir());
        db.open_tree("meta")
            .unwrap()
            .insert(b"wal-applied", &end.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let out = refused_start(&env);
    assert!(
        out.contains("older than the versions the ledger records")
            && out.contains("field `phone` holds version 1, below version 2"),
        "{out}"
    );
}

/// Starts the server on `env`, records a consent of ann and ben, stops it.
async fn two_consents(env: &Env) {
    let srv = env.start().await;
    let mut led = sovra_vault::client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    for c in ["ann", "ben"] {
        led.record_consent(consent(c, "marketing", true))
            .await
            .unwrap();
    }
    srv.stop().await;
}

async fn consents_of(url: &str, env: &Env, customer: &str) -> usize {
    let mut led = sovra_vault::client::connect_ledger(url, Some(&env.service), None)
        .await
        .unwrap();
    led.get_consent_state(sovra_proto::ledger::v1::GetConsentStateRequest {
        customer_id: customer.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .purposes
    .len()
}

#[tokio::test]
async fn an_older_ledger_is_brought_up_to_date_by_the_log_and_a_deleted_one_refuses() {
    if file_backend_only(
        "the views are caches there: a deleted ledger view is built again from the log",
    ) {
        return;
    }
    let env = Env::new();
    three_customers(&env).await;
    let ledger = env.data_dir().join("ledger");
    let old = tempfile::tempdir().unwrap();
    copy_tree(&ledger, old.path(), &|_| true);
    two_consents(&env).await;
    // An older copy of the ledger's files: the log holds every entry since,
    // byte for byte, and they are applied again before anything is served.
    std::fs::remove_dir_all(&ledger).unwrap();
    copy_tree(old.path(), &ledger, &|_| true);
    let (child, url) = serve_process(&env).await;
    assert_eq!(consents_of(&url, &env, "ann").await, 1);
    stop(child);
    // A deleted ledger folder beside a log that holds its entries.
    std::fs::remove_dir_all(&ledger).unwrap();
    let out = refused_start(&env);
    assert!(out.contains("the ledger folder was deleted"), "{out}");
}

#[tokio::test]
async fn an_older_deleted_or_damaged_log_refuses_to_start_and_a_torn_tail_is_cut() {
    if file_backend_only("it alters the log's segment files") {
        return;
    }
    let env = Env::new();
    three_customers(&env).await;
    let wal = env.data_dir().join("wal");
    let old = tempfile::tempdir().unwrap();
    copy_tree(&wal, old.path(), &|_| true);
    two_consents(&env).await;
    // The log's segment ends in zeros written ahead of its groups: a clean
    // start of the real server takes them for the clean end they are.
    let (child, url) = serve_process(&env).await;
    assert_eq!(consents_of(&url, &env, "ben").await, 1);
    stop(child);
    let log = serve_log(&env, &url);
    assert!(!log.contains("torn tail"), "{log}");
    let seg = files_under(&wal)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "wal"))
        .unwrap();
    let bytes = std::fs::read(&seg).unwrap();
    let (_, scan) = sovra_wal::frame::scan_segment(&bytes).unwrap();
    assert!(scan.stop.is_none() && (scan.end as usize) < bytes.len());
    let current = tempfile::tempdir().unwrap();
    copy_tree(&wal, current.path(), &|_| true);
    let put_back = |from: &Path| {
        std::fs::remove_dir_all(&wal).unwrap();
        copy_tree(from, &wal, &|_| true);
    };
    // An older copy of the log, under views that hold more.
    put_back(old.path());
    let out = refused_start(&env);
    assert!(
        out.contains("restored from an older copy") && out.contains(&wal.display().to_string()),
        "{out}"
    );
    // A deleted log.
    std::fs::remove_dir_all(&wal).unwrap();
    let out = refused_start(&env);
    assert!(out.contains("restored from an older copy"), "{out}");
    // A byte changed in an early frame, with later frames after it.
    put_back(current.path());
    let seg = files_under(&wal)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "wal"))
        .unwrap();
    let good = std::fs::read(&seg).unwrap();
    let mut bad = good.clone();
    bad[sovra_wal::frame::SEGMENT_HEADER + sovra_wal::frame::FRAME_HEADER + 2] ^= 0x10;
    std::fs::write(&seg, &bad).unwrap();
    let out = refused_start(&env);
    assert!(
        out.contains(&seg.display().to_string())
            && out.contains(&format!("offset {}", sovra_wal::frame::SEGMENT_HEADER)),
        "{out}"
    );
    // A torn tail (half a frame) is cut and reported; nothing is lost.
    let mut torn = good.clone();
    let mut half = Vec::new();
    sovra_wal::frame::encode_frame(&mut half, 1 << 40, 0, &[b"never acknowledged"]);
    torn.extend_from_slice(&half[..half.len() / 2]);
    std::fs::write(&seg, &torn).unwrap();
    let (child, url) = serve_process(&env).await;
    assert_eq!(consents_of(&url, &env, "ben").await, 1);
    assert!(readable(&url, &env, "cat").await.unwrap() > 0);
    stop(child);
    let log = serve_log(&env, &url);
    assert!(log.contains("torn tail"), "{log}");
}

/// What the server process serving `url` logged.
fn serve_log(env: &Env, url: &str) -> String {
    std::fs::read_to_string(
        env.dir
            .path()
            .join(format!("serve-{}.log", url.rsplit(':').next().unwrap())),
    )
    .unwrap()
}

#[tokio::test]
async fn a_forged_consent_view_is_never_taken_as_a_consent() {
    let env = Env::new();
    three_customers(&env).await;
    let srv = env.start().await;
    let mut led = sovra_vault::client::connect_ledger(&srv.url, Some(&env.service), None)
        .await
        .unwrap();
    led.record_consent(consent("ann", "marketing", true))
        .await
        .unwrap();
    let mut svc = srv.client(Some(&env.service)).await;
    // Granted, the read is allowed: the denial below is the withdrawal's.
    svc.get_fields(get("ann", &["name"], "marketing"))
        .await
        .unwrap();
    let withdrawn = led
        .record_consent(consent("ann", "marketing", false))
        .await
        .unwrap()
        .into_inner();
    let e = svc
        .get_fields(get("ann", &["name"], "marketing"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    srv.stop().await;
    // The withdrawal's view record is rewritten as a grant.
    {
        let db = open_raw(&env.data_dir().join("ledger"));
        let log = db.open_tree("log").unwrap();
        let subject = hex::decode(&withdrawn.subject).unwrap();
        let key = [b"c".as_slice(), &subject, b"marketing"].concat();
        let mut v = log.get(&key).unwrap().unwrap().to_vec();
        assert_eq!(v[0], 2, "a withdrawal");
        v[0] = 1;
        log.insert(&key, v).unwrap();
        db.flush().unwrap();
    }
    let (child, url) = serve_process(&env).await;
    let mut svc = sovra_vault::client::connect(&url, Some(&env.service), None)
        .await
        .unwrap();
    let e = svc
        .get_fields(get("ann", &["name"], "marketing"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    stop(child);
    let log = serve_log(&env, &url);
    assert!(log.contains("consent view disagreed"), "{log}");
}
