//! The log kept in PostgreSQL, against a real server: the database named by
//! `SOVRA_TEST_POSTGRES` (`.ci/postgres start` makes one). Without it these
//! tests say so and pass, unless `SOVRA_REQUIRE_POSTGRES=1` (set by
//! `.ci/run`), which makes a missing database a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use sovra_wal::{PgTarget, Wal, WalOptions};
use zeroize::Zeroizing;

fn env() -> Option<(String, Option<String>)> {
    let url = std::env::var("SOVRA_TEST_POSTGRES")
        .ok()
        .filter(|v| !v.is_empty());
    let Some(url) = url else {
        assert!(
            std::env::var("SOVRA_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "SOVRA_REQUIRE_POSTGRES=1 but SOVRA_TEST_POSTGRES is not set"
        );
        eprintln!("SOVRA_TEST_POSTGRES is not set: PostgreSQL tests not run");
        return None;
    };
    let pw = std::env::var("SOVRA_TEST_POSTGRES_PASSWORD_FILE")
        .ok()
        .map(|f| std::fs::read_to_string(f).unwrap().trim().to_owned());
    Some((url, pw))
}

fn schema(tag: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("w_{tag}_{}_{n}", std::process::id())
}

fn target(tag: &str) -> Option<PgTarget> {
    let (url, pw) = env()?;
    Some(PgTarget::new(&url, pw.as_deref(), &schema(tag)).unwrap())
}

fn open(t: &PgTarget, wait: Option<Duration>) -> sovra_wal::Result<Wal> {
    Wal::open_postgres(t, WalOptions::default(), wait, None).map(|o| o.wal)
}

fn sql(t: &PgTarget, q: &str) {
    let t = t.clone();
    let q = q.replace("SCHEMA", t.schema());
    std::thread::spawn(move || t.connect().unwrap().batch_execute(&q).unwrap())
        .join()
        .unwrap();
}

fn records(w: &Wal, from: u64) -> sovra_wal::Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    w.replay(from, |l, r| {
        out.push((l, r.to_vec()));
        Ok(())
    })?;
    Ok(out)
}

#[test]
fn groups_are_rows_replayed_in_order_and_kept_across_opens() {
    let Some(t) = target("roundtrip") else { return };
    let w = open(&t, None).unwrap();
    assert!(w.is_postgres());
    assert_eq!(w.durable_lsn().unwrap(), 0);
    let mut end = 0;
    for i in 0..50u32 {
        let a = i.to_be_bytes();
        end = w.append(&[&a, b"second"]).unwrap();
    }
    w.wait_durable_blocking(end).unwrap();
    assert_eq!(end, 100);
    let got = records(&w, 0).unwrap();
    assert_eq!(got.len(), 100);
    assert_eq!(got[2], (2, 1u32.to_be_bytes().to_vec()));
    assert_eq!(records(&w, 97).unwrap().len(), 3);
    drop(w);
    let w = open(&t, None).unwrap();
    assert_eq!(w.durable_lsn().unwrap(), 100);
    assert_eq!(w.first_lsn(), 0);
    let e = w.append(&[b"after"]).unwrap();
    w.wait_durable_blocking(e).unwrap();
    assert_eq!(records(&w, 100).unwrap(), vec![(100, b"after".to_vec())]);
    assert!(w.place().contains(t.schema()), "{}", w.place());
}

#[test]
fn one_sequencer_at_a_time_and_a_standby_takes_over_where_it_ended() {
    let Some(t) = target("lease") else { return };
    let a = open(&t, None).unwrap();
    let e = a.append(&[b"a1"]).unwrap();
    a.wait_durable_blocking(e).unwrap();
    // A second opener gives up when asked to...
    let err = open(&t, Some(Duration::from_millis(300))).unwrap_err();
    assert!(err.to_string().contains("sequencer lease"), "{err}");
    // ...or waits as a standby, and takes over when the holder goes.
    let t2 = t.clone();
    let standby = std::thread::spawn(move || open(&t2, None).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !standby.is_finished(),
        "the standby must wait for the lease"
    );
    let e = a.append(&[b"a2"]).unwrap();
    a.wait_durable_blocking(e).unwrap();
    drop(a);
    let b = standby.join().unwrap();
    assert_eq!(
        b.durable_lsn().unwrap(),
        2,
        "it goes on where the holder ended"
    );
    let e = b.append(&[b"b1"]).unwrap();
    b.wait_durable_blocking(e).unwrap();
    let got: Vec<Vec<u8>> = records(&b, 0)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    assert_eq!(got, [b"a1".to_vec(), b"a2".to_vec(), b"b1".to_vec()]);
}

#[test]
fn a_writer_whose_head_moved_is_fenced_and_accepts_nothing_more() {
    let Some(t) = target("fence") else { return };
    let a = open(&t, None).unwrap();
    let e = a.append(&[b"x"]).unwrap();
    a.wait_durable_blocking(e).unwrap();
    // Another writer moved the head (as one that took over would).
    sql(&t, "UPDATE SCHEMA.head SET end_lsn = end_lsn + 5");
    let e = a.append(&[b"y"]).unwrap();
    let err = a.wait_durable_blocking(e).unwrap_err();
    assert!(err.to_string().contains("another server wrote it"), "{err}");
    assert!(a.append(&[b"z"]).is_ok() || a.durable_lsn().is_err());
    assert!(
        a.durable_lsn().is_err(),
        "a fenced log accepts nothing more"
    );
}

#[test]
fn deleted_altered_or_lost_rows_are_refused_naming_them() {
    let Some(t) = target("tamper") else { return };
    let w = open(&t, None).unwrap();
    for i in 0..5u8 {
        let e = w.append(&[&[i]]).unwrap();
        w.wait_durable_blocking(e).unwrap();
    }
    // A middle row deleted.
    sql(
        &t,
        "CREATE TABLE SCHEMA.saved AS SELECT * FROM SCHEMA.log WHERE first_lsn = 2;
         DELETE FROM SCHEMA.log WHERE first_lsn = 2",
    );
    let err = records(&w, 0).unwrap_err().to_string();
    assert!(
        err.contains("log row 3") && err.contains("deleted"),
        "{err}"
    );
    // A frame altered: its checksum no longer matches.
    sql(
        &t,
        "INSERT INTO SCHEMA.log SELECT first_lsn, end_lsn,
             overlay(frames placing '\\xff'::bytea from length(frames) for 1) FROM SCHEMA.saved",
    );
    let err = records(&w, 0).unwrap_err().to_string();
    assert!(
        err.contains("log row 2") && err.contains("checksum"),
        "{err}"
    );
    // The first rows deleted.
    sql(&t, "DELETE FROM SCHEMA.log WHERE first_lsn < 3");
    let err = records(&w, 0).unwrap_err().to_string();
    assert!(err.contains("records 0..3 are missing"), "{err}");
    drop(w);
    // The last row lost (a database restored from an older copy): the head
    // says more.
    sql(&t, "DELETE FROM SCHEMA.log WHERE first_lsn = 4");
    let err = open(&t, None).unwrap_err().to_string();
    assert!(
        err.contains("head says the log ends at LSN 5") && err.contains("last row ends at 4"),
        "{err}"
    );
}

#[test]
fn pads_are_written_with_the_next_group_and_deleted_by_an_erasure() {
    let Some(t) = target("pads") else { return };
    let w = open(&t, None).unwrap();
    w.stage_pad(0, Some(Zeroizing::new([7u8; 32]))).unwrap();
    w.stage_pad(1, Some(Zeroizing::new([9u8; 32]))).unwrap();
    let e = w.append(&[b"key for slot 0 and 1"]).unwrap();
    w.wait_durable_blocking(e).unwrap();
    let pads = w.load_pads().unwrap();
    assert_eq!(pads.len(), 2);
    assert_eq!((pads[1].0, *pads[1].1), (1, [9u8; 32]));
    w.stage_pad(0, None).unwrap();
    let e = w.append(&[b"erasure of slot 0"]).unwrap();
    w.wait_durable_blocking(e).unwrap();
    let pads = w.load_pads().unwrap();
    assert_eq!(pads.iter().map(|p| p.0).collect::<Vec<_>>(), [1]);
    // A damaged row is refused, naming its slot.
    sql(&t, "INSERT INTO SCHEMA.pads VALUES (5, '\\x0102')");
    let err = w.load_pads().unwrap_err().to_string();
    assert!(err.contains("pads row 5"), "{err}");
}

#[test]
fn bad_targets_are_refused_and_never_show_a_password() {
    let Some((url, pw)) = env() else { return };
    let with_pw = url.replacen("://", "://sovra:hunter2@", 1);
    let err = PgTarget::new(&with_pw, None, "s").unwrap_err().to_string();
    assert!(err.contains("holds a password"), "{err}");
    assert!(!err.contains("hunter2"));
    for bad in ["", "Upper", "a-b", "a;drop", "1abc"] {
        let err = PgTarget::new(&url, None, bad).unwrap_err().to_string();
        assert!(err.contains("SQL identifier"), "{bad}: {err}");
    }
    let err = PgTarget::new("not a url ::", None, "s")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not valid"), "{err}");
    let wrong = PgTarget::new(&url, Some("wrong-password-x"), &schema("pw")).unwrap();
    let err = open(&wrong, None).unwrap_err().to_string();
    if pw.is_some() {
        assert!(err.contains("cannot connect"), "{err}");
        assert!(err.contains("password authentication failed"), "{err}");
    }
    assert!(!err.contains("wrong-password-x"), "{err}");
}

#[test]
fn a_failed_group_gives_the_lease_up_at_once() {
    let Some(t) = target("giveup") else { return };
    let a = open(&t, None).unwrap();
    let e = a.append(&[b"x"]).unwrap();
    a.wait_durable_blocking(e).unwrap();
    // The next group fails (its head was moved); `a` stays open, yet a
    // standby gets the lease without waiting for it to close.
    sql(&t, "UPDATE SCHEMA.head SET end_lsn = end_lsn + 1");
    let e = a.append(&[b"y"]).unwrap();
    assert!(a.wait_durable_blocking(e).is_err());
    sql(&t, "UPDATE SCHEMA.head SET end_lsn = end_lsn - 1");
    let b = open(&t, Some(Duration::from_secs(5))).unwrap();
    assert_eq!(b.durable_lsn().unwrap(), 1);
    drop(a);
}

#[test]
fn a_database_that_would_acknowledge_before_it_is_durable_is_refused() {
    let Some((url, pw)) = env() else { return };
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}options=-c%20synchronous_commit%3Doff");
    let t = PgTarget::new(&url, pw.as_deref(), &schema("sync")).unwrap();
    let err = open(&t, None).unwrap_err().to_string();
    assert!(err.contains("synchronous_commit is off"), "{err}");
}
