//! The PostgreSQL backend's own tests (the rest of the suite runs on it too
//! when `SOVRA_TEST_POSTGRES` is set): a stopped server's database altered,
//! views rebuilt from the database, the sequencer killed under load with a
//! standby taking over, and the erasure scan of the cluster's files and WAL.
//! Without a database they say so and pass, unless
//! `SOVRA_REQUIRE_POSTGRES=1` (`.ci/run`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sovra_proto::ledger::v1 as lpb;
use sovra_proto::vault::v1 as pb;
use sovra_vault::config::{write_config, Config};
use sovra_vault::synthetic;

use sovra_testkit::*;

use crate::durability::{check_acknowledged, mixed_load, Acked};
use crate::hardening::serve_refused;
use crate::SOVRA;

/// True (skip) without a database; a failure when one is required.
fn no_postgres() -> bool {
    if on_postgres() {
        return false;
    }
    assert!(
        std::env::var("SOVRA_REQUIRE_POSTGRES").as_deref() != Ok("1"),
        "SOVRA_REQUIRE_POSTGRES=1 but SOVRA_TEST_POSTGRES is not set"
    );
    eprintln!("SOVRA_TEST_POSTGRES is not set: PostgreSQL tests not run");
    true
}

/// The env's schema.
fn schema(env: &Env) -> String {
    env.config().storage.schema.unwrap()
}

/// Runs SQL on the env's database (on a thread of its own: the sync
/// client may not run inside the test's runtime); `SCHEMA` is replaced by
/// the env's schema. Returns the first column of every row, as bytes.
fn sql(env: &Env, q: &str) -> Vec<Option<Vec<u8>>> {
    let t = env.config().postgres_target().unwrap().unwrap();
    let q = q.replace("SCHEMA", &schema(env));
    std::thread::spawn(move || {
        let mut c = t.connect().unwrap();
        let mut out = Vec::new();
        for m in c.simple_query(&q).unwrap() {
            if let postgres::SimpleQueryMessage::Row(r) = m {
                out.push(r.get(0).map(|v| v.as_bytes().to_vec()));
            }
        }
        out
    })
    .join()
    .unwrap()
}

/// Keeps the pads in the database (`[storage] pads = "postgres"`).
fn pads_in_database(env: &Env) {
    let mut cfg = env.config();
    cfg.storage.pads = Some("postgres".into());
    write_config(&cfg, &env.config_path).unwrap();
}

/// Removes everything in the data directory but the pad file.
fn clear_views(env: &Env) {
    for e in std::fs::read_dir(env.data_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().is_some_and(|n| n == "shred.slots") {
            continue;
        }
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
}

async fn write_some(url: &str, env: &Env, n: usize) {
    let mut c = sovra_vault::client::connect(url, Some(&env.service), None)
        .await
        .unwrap();
    let mut l = sovra_vault::client::connect_ledger(url, Some(&env.service), None)
        .await
        .unwrap();
    for i in 0..n {
        let id = format!("pg-{i}");
        c.put_record(put(
            &id,
            &[
                ("phone", text(&format!("1380000{i:04}"))),
                ("purchase_count", int(i as i64)),
            ],
        ))
        .await
        .unwrap();
        l.record_consent(consent(&id, "marketing", true))
            .await
            .unwrap();
    }
}

async fn read_count(url: &str, env: &Env, id: &str) -> i64 {
    let mut c = sovra_vault::client::connect(url, Some(&env.service), None)
        .await
        .unwrap();
    let got = c
        .get_fields(get(id, &["purchase_count"], "billing"))
        .await
        .unwrap()
        .into_inner();
    match revealed(&got.fields[0]) {
        Some(pb::value::Kind::Integer(i)) => *i,
        other => panic!("{id}: {other:?}"),
    }
}

async fn checkpoint(url: &str, env: &Env) -> sovra_ledger::SignedCheckpoint {
    let mut l = sovra_vault::client::connect_ledger(url, Some(&env.officer), None)
        .await
        .unwrap();
    let cp = l
        .get_checkpoint(lpb::GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    sovra_ledger::verify_checkpoint(cp.note.as_bytes(), &cp.verifier_key).unwrap()
}

/// The server's log extends `before` (a checkpoint a client saw): its
/// checkpoint is at least as large and a consistency proof verifies.
async fn assert_extends(url: &str, env: &Env, before: &sovra_ledger::SignedCheckpoint) {
    let after = checkpoint(url, env).await;
    assert!(after.size >= before.size);
    let mut l = sovra_vault::client::connect_ledger(url, Some(&env.officer), None)
        .await
        .unwrap();
    let p = l
        .get_consistency_proof(lpb::GetConsistencyProofRequest {
            from_size: before.size,
            to_size: after.size,
        })
        .await
        .unwrap()
        .into_inner();
    sovra_ledger::verify_consistency(
        before.size,
        after.size,
        &p.hashes,
        &before.root,
        &after.root,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_servers_database_altered_is_refused_naming_what() {
    if no_postgres() {
        return;
    }
    let env = Env::new();
    pads_in_database(&env);
    let srv = env.start().await;
    write_some(&srv.url, &env, 20).await;
    srv.stop().await;

    // A pad row deleted: a missing pad is not an erasure.
    sql(
        &env,
        "CREATE TABLE SCHEMA.saved_pads AS SELECT * FROM SCHEMA.pads;
         DELETE FROM SCHEMA.pads WHERE slot = (SELECT min(slot) FROM SCHEMA.pads)",
    );
    let out = serve_refused(&env.config_path);
    assert!(
        out.contains("the pads table of") && out.contains("no erasure"),
        "{out}"
    );
    // A pad row altered: its check value no longer matches.
    sql(
        &env,
        "INSERT INTO SCHEMA.pads SELECT * FROM SCHEMA.saved_pads
             WHERE slot = (SELECT min(slot) FROM SCHEMA.saved_pads);
         UPDATE SCHEMA.pads SET pad = '\\x0101010101010101010101010101010101010101010101010101010101010101'
             WHERE slot = (SELECT max(slot) FROM SCHEMA.pads)",
    );
    let out = serve_refused(&env.config_path);
    assert!(out.contains("does not match the check value"), "{out}");
    // A row with a slot number no vault reaches: damage, refused (and no
    // memory taken for the slots below it).
    sql(
        &env,
        "DELETE FROM SCHEMA.pads; INSERT INTO SCHEMA.pads SELECT * FROM SCHEMA.saved_pads;
         INSERT INTO SCHEMA.pads VALUES (5000000000, '\\x0202020202020202020202020202020202020202020202020202020202020202')",
    );
    let out = serve_refused(&env.config_path);
    assert!(out.contains("pads row 5000000000"), "{out}");
    sql(
        &env,
        "DELETE FROM SCHEMA.pads; INSERT INTO SCHEMA.pads SELECT * FROM SCHEMA.saved_pads",
    );

    // The database restored from an older copy: its last group gone and
    // its head moved back. The server's views hold more than it does.
    sql(
        &env,
        "CREATE TABLE SCHEMA.saved_log AS SELECT * FROM SCHEMA.log;
         CREATE TABLE SCHEMA.saved_head AS SELECT * FROM SCHEMA.head;
         UPDATE SCHEMA.head SET end_lsn = (SELECT max(first_lsn) FROM SCHEMA.log);
         DELETE FROM SCHEMA.log WHERE first_lsn = (SELECT max(first_lsn) FROM SCHEMA.log)",
    );
    let out = serve_refused(&env.config_path);
    assert!(out.contains("older copy"), "{out}");
    // Rows deleted under the head: refused at open, naming both ends.
    sql(
        &env,
        "UPDATE SCHEMA.head SET end_lsn = (SELECT end_lsn FROM SCHEMA.saved_head)",
    );
    let out = serve_refused(&env.config_path);
    assert!(
        out.contains("the head says the log ends at LSN") && out.contains("rows were deleted"),
        "{out}"
    );
    sql(
        &env,
        "DELETE FROM SCHEMA.log; INSERT INTO SCHEMA.log SELECT * FROM SCHEMA.saved_log",
    );

    // A group's bytes altered: the rebuild of cleared views reads every
    // row, and refuses the altered one by its CRC, naming it.
    sql(
        &env,
        "UPDATE SCHEMA.log SET frames = set_byte(frames, 59, (get_byte(frames, 59) + 1) % 256)
             WHERE first_lsn = (SELECT min(first_lsn) FROM SCHEMA.log WHERE first_lsn > 0)",
    );
    clear_views(&env);
    let out = serve_refused(&env.config_path);
    assert!(out.contains("log row") && out.contains("checksum"), "{out}");

    // Everything put back: the views are rebuilt and the data served.
    sql(
        &env,
        "DELETE FROM SCHEMA.log; INSERT INTO SCHEMA.log SELECT * FROM SCHEMA.saved_log",
    );
    clear_views(&env);
    let srv = env.start().await;
    assert_eq!(read_count(&srv.url, &env, "pg-13").await, 13);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_views_are_caches_rebuilt_from_the_database() {
    if no_postgres() {
        return;
    }
    let env = Env::new();
    let srv = env.start().await;
    write_some(&srv.url, &env, 30).await;
    let before = checkpoint(&srv.url, &env).await;
    srv.stop().await;
    clear_views(&env);
    assert!(!env.data_dir().join("db").exists());

    let srv = env.start().await;
    for i in [0usize, 17, 29] {
        assert_eq!(
            read_count(&srv.url, &env, &format!("pg-{i}")).await,
            i as i64
        );
    }
    // The rebuilt ledger extends what a client saw before: no fork.
    assert_extends(&srv.url, &env, &before).await;
    let entries = ledger_entries(&srv.url, &env.officer).await;
    let idx: Vec<u64> = entries.iter().map(|(i, _)| *i).collect();
    assert_eq!(idx, (0..idx.len() as u64).collect::<Vec<_>>(), "no gap");
    srv.stop().await;
}

/// A second server's directory: the same configuration, keys, schema and
/// policies (so the same database, schema and principals), its own views.
fn standby_of(env: &Env) -> Env {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(env.dir.path()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        if name == "data" || name.to_string_lossy().starts_with("serve-") {
            continue;
        }
        copy_path(&p, &dir.path().join(&name));
    }
    Env {
        config_path: dir.path().join("config.toml"),
        service: env.service.clone(),
        officer: env.officer.clone(),
        partner: env.partner.clone(),
        admin: env.admin.clone(),
        dir,
    }
}

fn copy_path(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            copy_path(&p, &to.join(p.file_name().unwrap()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

/// Waits until `log` says the process waits for the lease.
async fn wait_for_standby(log: &Path) {
    for _ in 0..300 {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains("waiting as a standby")) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the standby never waited for the lease: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sequencer_killed_under_load_hands_over_with_no_gap_no_fork_no_lost_write() {
    if no_postgres() {
        return;
    }
    let env = Env::new();
    // The standby needs the pads: in the database (or a shared pad file).
    pads_in_database(&env);
    let standby = standby_of(&env);
    let port_a = free_port();
    let mut a = spawn_server(SOVRA, &env, port_a).await;
    let url_a = format!("http://127.0.0.1:{port_a}");

    // The standby starts, and waits for the lease without serving.
    let port_b = free_port();
    set_listen(&standby, port_b);
    let log_b = standby.dir.path().join("standby.log");
    let out = std::fs::File::create(&log_b).unwrap();
    let mut b = std::process::Command::new(SOVRA)
        .args(["serve", "--config"])
        .arg(&standby.config_path)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    wait_for_standby(&log_b).await;
    let url_b = format!("http://127.0.0.1:{port_b}");
    assert!(
        sovra_vault::client::connect(&url_b, Some(&env.service), None)
            .await
            .is_err(),
        "a standby does not serve"
    );

    // Load on the sequencer, then SIGKILL it.
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let tasks = mixed_load(&url_a, &env, &acked, 0).await;
    a.kill().unwrap();
    a.wait().unwrap();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }

    // The standby takes the lease and serves every acknowledged write,
    // read and consent; its log extends the last checkpoint a client saw.
    let up = serving(&url_b, &env.service, Duration::from_secs(30)).await;
    assert!(
        up,
        "the standby did not take over: {}",
        std::fs::read_to_string(&log_b).unwrap_or_default()
    );
    let snapshot = std::mem::take(&mut *acked.lock().unwrap());
    assert!(snapshot.writes.len() >= 60 && snapshot.consents.len() >= 60);
    check_acknowledged(&url_b, &standby, &snapshot).await;
    // One sequence: dense indexes, and a new write extends it.
    let entries = ledger_entries(&url_b, &env.officer).await;
    let idx: Vec<u64> = entries.iter().map(|(i, _)| *i).collect();
    assert_eq!(idx, (0..idx.len() as u64).collect::<Vec<_>>(), "no gap");
    write_some(&url_b, &standby, 3).await;
    assert!(checkpoint(&url_b, &standby).await.size > idx.len() as u64);
    b.kill().unwrap();
    b.wait().unwrap();
}

/// For each of `needles`, every file under `dir` holding it (each file is
/// read once).
fn holders(dir: &Path, needles: &[Vec<u8>]) -> Vec<Vec<PathBuf>> {
    let mut out = vec![Vec::new(); needles.len()];
    for p in files_under(dir) {
        let Ok(b) = std::fs::read(&p) else { continue };
        for (i, n) in needles.iter().enumerate() {
            if memchr::memmem::find(&b, n).is_some() {
                out[i].push(p.clone());
            }
        }
    }
    out
}

fn cluster_dir() -> Option<PathBuf> {
    std::env::var_os("SOVRA_TEST_POSTGRES_DATA").map(PathBuf::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_scan_of_the_clusters_files_and_wal() {
    if no_postgres() {
        return;
    }
    let Some(cluster) = cluster_dir() else {
        eprintln!("SOVRA_TEST_POSTGRES_DATA is not set: the cluster's files are not scanned");
        return;
    };
    for pads_in_db in [false, true] {
        let env = Env::new();
        if pads_in_db {
            pads_in_database(&env);
        }
        let people = synthetic::generate(23, 12);
        let victim = &people[5];
        let srv = env.start().await;
        let mut svc = srv.client(Some(&env.service)).await;
        for c in &people {
            svc.put_record(c.to_request("web_form")).await.unwrap();
        }
        srv.stop().await;
        // The victim's pad, read as an attacker with the disk would.
        let pads_before: Vec<Vec<u8>> = if pads_in_db {
            sql(
                &env,
                "SELECT encode(pad, 'hex') FROM SCHEMA.pads ORDER BY slot",
            )
            .into_iter()
            .map(|v| v.unwrap())
            .collect()
        } else {
            Vec::new()
        };
        let file_pads = if pads_in_db {
            Vec::new()
        } else {
            std::fs::read(env.data_dir().join("shred.slots")).unwrap()
        };
        let srv = env.start().await;
        let mut adm = srv.client(Some(&env.admin)).await;
        adm.erase_customer(pb::EraseCustomerRequest {
            customer_id: victim.id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
        srv.stop().await;
        // Flush PostgreSQL's buffers to its files, so the scan sees them.
        sql(&env, "CHECKPOINT");
        let pad: Vec<u8> = if pads_in_db {
            let after: Vec<Vec<u8>> = sql(
                &env,
                "SELECT encode(pad, 'hex') FROM SCHEMA.pads ORDER BY slot",
            )
            .into_iter()
            .map(|v| v.unwrap())
            .collect();
            let gone: Vec<&Vec<u8>> = pads_before.iter().filter(|p| !after.contains(p)).collect();
            assert_eq!(gone.len(), 1, "one pad row deleted by the erasure");
            hex::decode(gone[0]).unwrap()
        } else {
            let now = std::fs::read(env.data_dir().join("shred.slots")).unwrap();
            let slot = (16..file_pads.len())
                .step_by(32)
                .find(|o| now[*o..*o + 32] != file_pads[*o..*o + 32])
                .expect("one slot zeroed by the erasure");
            assert_eq!(now[slot..slot + 32], [0u8; 32]);
            file_pads[slot..slot + 32].to_vec()
        };
        let mut needles: Vec<Vec<u8>> = victim
            .secrets()
            .into_iter()
            .map(String::into_bytes)
            .collect();
        needles.push(victim.id.clone().into_bytes());
        // Nothing in the clear, ever: no value, no customer id, in the
        // cluster's tables or WAL, or in the server's directory.
        needles.push(pad.clone());
        let in_cluster = holders(&cluster, &needles);
        let in_dir = holders(env.dir.path(), &needles);
        let (pad_found, clear) = in_cluster.split_last().unwrap();
        for (i, n) in needles[..needles.len() - 1].iter().enumerate() {
            let what = String::from_utf8_lossy(n);
            assert_eq!(clear[i], Vec::<PathBuf>::new(), "{what} in the cluster");
            assert_eq!(
                in_dir[i],
                Vec::<PathBuf>::new(),
                "{what} in the server's directory"
            );
        }
        eprintln!("pads in the database: {pads_in_db}; the erased pad is in {pad_found:?}");
        assert_eq!(
            in_dir[needles.len() - 1],
            Vec::<PathBuf>::new(),
            "the pad in the server's directory"
        );
        if pads_in_db {
            // What SECURITY.md says remains with `pads = "postgres"`: the
            // deleted row's pad is still in PostgreSQL's WAL (and so in
            // its archives, replicas and backups) after the erasure.
            assert!(
                pad_found
                    .iter()
                    .any(|p| p.starts_with(cluster.join("pg_wal"))),
                "SECURITY.md says the pad stays in the WAL; found in {pad_found:?}"
            );
            // `VACUUM FULL` rewrites the table's file: the pad leaves the
            // table's files (the file system may keep the old blocks), and
            // stays in the WAL until its segments are recycled and
            // overwritten.
            sql(&env, "VACUUM FULL SCHEMA.pads");
            sql(&env, "CHECKPOINT");
            let after = holders(&cluster, &needles[needles.len() - 1..]).remove(0);
            eprintln!("after VACUUM FULL: {after:?}");
            assert!(
                after.iter().all(|p| p.starts_with(cluster.join("pg_wal"))),
                "after VACUUM FULL the pad is only in the WAL: {after:?}"
            );
        } else {
            // With the pads in the server's slot file (the default), the
            // database never held the pad: nothing there recovers the
            // erased customer, even with the root key.
            assert_eq!(
                pad_found,
                &Vec::<PathBuf>::new(),
                "the pad reached PostgreSQL"
            );
        }
    }
}

/// The configuration refuses what it must, naming it.
#[test]
fn storage_settings_are_checked() {
    let base = Path::new("/tmp");
    for (text, needle) in [
        ("[storage]\nschema = \"x\"\n", "need `postgres"),
        (
            "[storage]\npostgres = \"postgres://u:secret@h/db\"\n",
            "holds a password",
        ),
        (
            "[storage]\npostgres = \"postgres://u@h/db\"\nschema = \"Bad-Name\"\n",
            "SQL identifier",
        ),
        (
            "[storage]\npostgres = \"postgres://u@h/db\"\npads = \"tape\"\n",
            "not a pad place",
        ),
        ("[storage]\npads = \"postgres\"\n", "needs `postgres"),
        (
            "[storage]\npostgres = \"postgres://u@h/db\"\npassword_file = \"/nonexistent/pw\"\n",
            "cannot read the PostgreSQL password file",
        ),
        ("[storage]\npostgres = 5\n", "invalid"),
        ("[storage]\nunknown = 1\n", "unknown field"),
    ] {
        let e = Config::parse(text, "config.toml", base)
            .and_then(|c| c.postgres_target().and_then(|_| c.pad_place()).map(|_| ()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{text}: {e}");
        assert!(!e.contains("secret"), "{e}");
    }
}

/// `sovra init --postgres …` makes a vault whose log is in the database;
/// the configuration names the database without its password; a second
/// vault in the same schema and a URL with a password are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sovra_init_on_postgres_then_serve() {
    if no_postgres() {
        return;
    }
    let url = std::env::var(POSTGRES_ENV).unwrap();
    let pw_file = std::env::var(POSTGRES_PASSWORD_FILE_ENV).unwrap();
    let pw = std::fs::read_to_string(&pw_file).unwrap();
    let schema = format!("cli_{}", std::process::id());
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let init = |dir: &Path, url: &str| {
        std::process::Command::new(SOVRA)
            .args(["init", "--dir"])
            .arg(dir)
            .args(["--listen", &listen, "--postgres", url])
            .args(["--postgres-password-file", &pw_file])
            .args(["--postgres-schema", &schema, "--pads", "postgres"])
            .output()
            .unwrap()
    };
    let dir = tmp.path().join("a");
    let o = init(&dir, &url);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("in PostgreSQL"), "{out}");
    let admin = out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("sovra_")
                .map(|t| format!("sovra_{t}"))
        })
        .unwrap();
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(cfg.contains("[storage]") && cfg.contains(&schema), "{cfg}");
    assert!(
        !cfg.contains(pw.trim()),
        "the password is not in the configuration"
    );

    // A second vault in the same schema, and a URL with a password.
    let o = init(&tmp.path().join("b"), &url);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("already holds a vault"),
        "{err}"
    );
    let o = init(
        &tmp.path().join("c"),
        &url.replacen("://sovra@", "://sovra:hunter2@", 1),
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("holds a password"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");

    let log = std::fs::File::create(tmp.path().join("serve.log")).unwrap();
    let mut child = std::process::Command::new(SOVRA)
        .args(["serve", "--config"])
        .arg(dir.join("config.toml"))
        .stderr(log)
        .spawn()
        .unwrap();
    let server = format!("http://{listen}");
    let up = serving(&server, &admin, Duration::from_secs(15)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        up,
        "{}",
        std::fs::read_to_string(tmp.path().join("serve.log")).unwrap_or_default()
    );
}

fn migrate(from: &Env, to: &Env) -> std::process::Output {
    std::process::Command::new(SOVRA)
        .args(["migrate", "--sample", "50", "--from"])
        .arg(&from.config_path)
        .arg("--to")
        .arg(&to.config_path)
        .output()
        .unwrap()
}

fn with_storage(env: &Env, storage: sovra_vault::config::StorageConfig) {
    let mut cfg = env.config();
    cfg.storage = storage;
    write_config(&cfg, &env.config_path).unwrap();
}

/// `sovra migrate`: a data directory into PostgreSQL and back; the same
/// ledger root, the same values, the erased customer still erased; a
/// destination that is not empty, or another root key, refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_a_data_directory_into_postgres_and_back() {
    if no_postgres() {
        return;
    }
    let a = Env::on(sovra_vault::config::StorageConfig::default());
    let srv = a.start().await;
    write_some(&srv.url, &a, 30).await;
    let mut adm = srv.client(Some(&a.admin)).await;
    adm.erase_customer(pb::EraseCustomerRequest {
        customer_id: "pg-7".into(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    let before = checkpoint(&srv.url, &a).await;
    srv.stop().await;

    // Into PostgreSQL, pads there too.
    let b = standby_of(&a);
    with_storage(
        &b,
        sovra_vault::config::StorageConfig {
            pads: Some("postgres".into()),
            ..kit_storage()
        },
    );
    let o = migrate(&a, &b);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("the same root at size"), "{out}");
    assert!(out.contains("customers decrypted on both sides"), "{out}");

    let srv = b.start().await;
    assert_eq!(read_count(&srv.url, &b, "pg-13").await, 13);
    let mut c = srv.client(Some(&b.service)).await;
    let e = c
        .get_fields(get("pg-7", &["purchase_count"], "billing"))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::NotFound,
        "erased stays erased: {e:?}"
    );
    assert_extends(&srv.url, &b, &before).await;
    srv.stop().await;

    // A destination that already holds a vault is refused.
    let o = migrate(&a, &b);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("already holds"),
        "{err}"
    );

    // And back into a data directory.
    let c = standby_of(&a);
    with_storage(&c, sovra_vault::config::StorageConfig::default());
    let o = migrate(&b, &c);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let srv = c.start().await;
    assert_eq!(read_count(&srv.url, &c, "pg-29").await, 29);
    srv.stop().await;

    // Another root key: refused before anything is opened.
    let d = standby_of(&a);
    with_storage(&d, kit_storage());
    std::fs::write(
        d.dir.path().join("root.key"),
        format!("{}\n", "ab".repeat(32)),
    )
    .unwrap();
    let o = migrate(&a, &d);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("different root keys"),
        "{err}"
    );
}

/// `sovra migrate` with a configuration that is not there, or a sample out
/// of range: a clear error, nothing opened.
#[test]
fn migrate_refuses_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope/config.toml");
    let o = std::process::Command::new(SOVRA)
        .args(["migrate", "--from"])
        .arg(&missing)
        .arg("--to")
        .arg(&missing)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("cannot read configuration"),
        "{err}"
    );
    let o = std::process::Command::new(SOVRA)
        .args(["migrate", "--sample", "0", "--from", "a", "--to", "b"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("--sample"), "{err}");
}
