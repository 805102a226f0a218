//! The ledger over a write-ahead log: durable on the log's sync, its own
//! files a view that replays from the log and is checked against it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sovra_ledger::entry::Consent;
use sovra_ledger::{Body, Digest, Ledger, LedgerError, LedgerOptions, LogKey};
use sovra_wal::{Wal, WalOptions};

fn key() -> LogKey {
    LogKey::from_seed("sovra.test/wal", &[3; 32]).unwrap()
}

fn body(n: u8) -> Body {
    Body::ConsentGranted(Consent {
        tenant: "t".into(),
        subject: Digest([n; 32]),
        purpose: "marketing".into(),
        channel: "web".into(),
        legal_basis: "consent".into(),
        notice_version: "v1".into(),
        evidence_sha256: Digest([0; 32]),
        actor: "svc".into(),
    })
}

fn wal(dir: &Path) -> Arc<Wal> {
    Arc::new(
        Wal::open(&dir.join("wal"), WalOptions::default())
            .unwrap()
            .wal,
    )
}

fn open(dir: &Path, wal: Option<Arc<Wal>>) -> sovra_ledger::Result<Ledger> {
    Ledger::open(
        &dir.join("ledger"),
        key(),
        LedgerOptions {
            // No checkpoint is signed unless a test asks for one.
            checkpoint_interval: Duration::from_secs(3600),
            verify_on_open: true,
            wal,
        },
    )
}

/// A ledger over a new log in `dir` holding `n` entries, committed and
/// flushed.
async fn flushed(dir: &Path, n: u8) -> (Ledger, Arc<Wal>) {
    let w = wal(dir);
    let l = open(dir, Some(w.clone())).unwrap();
    for i in 0..n {
        l.append(&[body(i)]).unwrap();
    }
    l.commit().await.unwrap();
    l.flush_view().unwrap();
    (l, w)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn entries(l: &Ledger) -> Vec<Vec<u8>> {
    (0..l.size()).map(|i| l.entry(i).unwrap().0).collect()
}

fn integrity(e: LedgerError) -> String {
    match e {
        LedgerError::Integrity(i) => i.to_string(),
        other => panic!("expected an integrity error, got {other}"),
    }
}

#[tokio::test]
async fn a_view_restored_from_an_older_copy_is_brought_up_to_date_by_the_log() {
    let d = tempfile::tempdir().unwrap();
    let (l, w) = flushed(d.path(), 5).await;
    let snap = d.path().join("snap");
    copy_dir(&d.path().join("ledger"), &snap);
    for n in 5..12 {
        l.append(&[body(n)]).unwrap();
    }
    assert_eq!(l.commit().await.unwrap(), 12);
    let want = entries(&l);
    let root = l.tree_root(12).unwrap();
    drop(l);
    drop(w);
    std::fs::remove_dir_all(d.path().join("ledger")).unwrap();
    copy_dir(&snap, &d.path().join("ledger"));
    let w = wal(d.path());
    let l = open(d.path(), Some(w)).unwrap();
    assert_eq!(l.size(), 12);
    assert_eq!(entries(&l), want);
    assert_eq!(l.tree_root(12).unwrap(), root);
    assert_eq!(l.consent_state(&Digest([11; 32])).unwrap().len(), 1);
}

#[tokio::test]
async fn view_entries_that_differ_from_the_log_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let (l, w) = flushed(d.path(), 3).await;
    let snap = d.path().join("snap");
    copy_dir(&d.path().join("ledger"), &snap);
    for n in 3..6 {
        l.append(&[body(n)]).unwrap();
    }
    l.commit().await.unwrap();
    drop(l);
    drop(w);
    // Other entries 3..6 in the ledger's files, written without the log.
    std::fs::remove_dir_all(d.path().join("ledger")).unwrap();
    copy_dir(&snap, &d.path().join("ledger"));
    let forged = open(d.path(), None).unwrap();
    for n in 3..6 {
        forged.append(&[body(100 + n)]).unwrap();
    }
    forged.flush().unwrap();
    drop(forged);
    let msg = integrity(open(d.path(), Some(wal(d.path()))).unwrap_err());
    assert!(
        msg.contains("entry 3 in the ledger's files differs from the write-ahead log"),
        "{msg}"
    );
}

#[tokio::test]
async fn entries_the_log_never_got_are_kept_and_made_durable() {
    let d = tempfile::tempdir().unwrap();
    let (l, w) = flushed(d.path(), 4).await;
    drop(l);
    drop(w);
    // Two entries reach the ledger's files but not the log (as when sled
    // wrote its pages and the process died before the log's write).
    let ahead = open(d.path(), None).unwrap();
    ahead.append(&[body(50)]).unwrap();
    ahead.append(&[body(51)]).unwrap();
    ahead.flush().unwrap();
    let want = entries(&ahead);
    drop(ahead);
    let w = wal(d.path());
    let l = open(d.path(), Some(w.clone())).unwrap();
    assert_eq!(entries(&l), want);
    assert_eq!(l.durable_size(), 6);
    l.append(&[body(52)]).unwrap();
    assert_eq!(l.commit().await.unwrap(), 7);
    drop(l);
    drop(w);
    let l = open(d.path(), Some(wal(d.path()))).unwrap();
    assert_eq!(l.size(), 7);
    assert_eq!(l.consent_state(&Digest([51; 32])).unwrap().len(), 1);
}

#[tokio::test]
async fn a_deleted_log_under_a_flushed_ledger_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let w = wal(d.path());
    let l = open(d.path(), Some(w.clone())).unwrap();
    l.append(&[body(1)]).unwrap();
    l.commit().await.unwrap();
    l.flush_view().unwrap();
    drop(l);
    drop(w);
    std::fs::remove_dir_all(d.path().join("wal")).unwrap();
    let msg = integrity(open(d.path(), Some(wal(d.path()))).unwrap_err());
    assert!(
        msg.contains("was deleted or restored from an older copy"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_ledger_from_before_the_log_starts_it() {
    let d = tempfile::tempdir().unwrap();
    let old = open(d.path(), None).unwrap();
    old.append(&[body(1)]).unwrap();
    old.append(&[body(2)]).unwrap();
    old.flush().unwrap();
    let want = entries(&old);
    drop(old);
    let w = wal(d.path());
    let l = open(d.path(), Some(w.clone())).unwrap();
    assert_eq!(entries(&l), want);
    l.append(&[body(3)]).unwrap();
    assert_eq!(l.commit().await.unwrap(), 3);
    let cp = l.checkpoint().unwrap();
    assert_eq!(cp.size, 3);
    drop(l);
    drop(w);
    let l = open(d.path(), Some(wal(d.path()))).unwrap();
    assert_eq!(l.size(), 3);
}

#[tokio::test]
async fn a_deleted_ledger_folder_under_a_log_with_its_entries_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let w = wal(d.path());
    // Records of another owner only: a new ledger starts beside them.
    let end = w
        .append(&[&[sovra_wal::tag::VAULT_WRITES, 0, 0, 0, 0]])
        .unwrap();
    w.wait_durable_blocking(end).unwrap();
    let l = open(d.path(), Some(w.clone())).unwrap();
    l.append(&[body(1)]).unwrap();
    l.commit().await.unwrap();
    drop(l);
    drop(w);
    std::fs::remove_dir_all(d.path().join("ledger")).unwrap();
    let msg = integrity(open(d.path(), Some(wal(d.path()))).unwrap_err());
    assert!(msg.contains("the ledger folder was deleted"), "{msg}");
}

/// With the log, sled gets an append's records key by key: a crash can
/// leave an entry and its subject record beyond the recorded size. Open
/// drops them, and the sequence number goes to the next append.
#[tokio::test]
async fn an_append_a_crash_cut_short_is_dropped_with_its_subject_record() {
    let d = tempfile::tempdir().unwrap();
    let (l, w) = flushed(d.path(), 3).await;
    let (third, _) = l.entry(2).unwrap();
    drop(l);
    drop(w);
    {
        let db = sled::open(d.path().join("ledger")).unwrap();
        let log = db.open_tree("log").unwrap();
        let mut k = vec![b'e'];
        k.extend_from_slice(&3u64.to_be_bytes());
        log.insert(k, third).unwrap();
        let mut s = vec![b's'];
        s.extend_from_slice(&[2; 32]);
        s.extend_from_slice(&3u64.to_be_bytes());
        log.insert(s, Vec::new()).unwrap();
        db.flush().unwrap();
    }
    let w = wal(d.path());
    let l = open(d.path(), Some(w.clone())).unwrap();
    assert_eq!(l.size(), 3);
    assert_eq!(l.subject_entries(&Digest([2; 32])).unwrap(), vec![2]);
    l.append(&[body(9)]).unwrap();
    assert_eq!(l.commit().await.unwrap(), 4);
    assert_eq!(l.subject_entries(&Digest([9; 32])).unwrap(), vec![3]);
    assert_eq!(l.subject_entries(&Digest([2; 32])).unwrap(), vec![2]);
}
