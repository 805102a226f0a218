//! The log through its public interface: group commit, reopen, replay,
//! segments, and recovery from torn tails, damage and lost files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use sovra_wal::{frame, Opened, Wal, WalError, WalOptions};

fn open(dir: &Path) -> Opened {
    Wal::open(dir, WalOptions::default()).unwrap()
}

fn small(floor: u64) -> WalOptions {
    WalOptions {
        segment_bytes: 256,
        floor,
        ..WalOptions::default()
    }
}

fn records(w: &Wal, from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    w.replay(from, |l, r| {
        out.push((l, r.to_vec()));
        Ok(())
    })
    .unwrap();
    out
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

/// Where a segment's frames end (the writer preallocates zeros after).
fn frames_end(bytes: &[u8]) -> usize {
    frame::scan_segment(bytes).unwrap().1.end as usize
}

fn corrupt_message(e: WalError) -> String {
    match e {
        WalError::Corrupt(c) => c.to_string(),
        other => panic!("expected a corruption error, got {other}"),
    }
}

#[test]
fn appends_are_durable_dense_and_survive_reopen() {
    let d = tempfile::tempdir().unwrap();
    let w = open(d.path()).wal;
    let a = w.append(&[b"one", b"two"]).unwrap();
    let b = w.append(&[b"three"]).unwrap();
    assert_eq!((a, b), (2, 3));
    w.wait_durable_blocking(b).unwrap();
    drop(w);
    let o = open(d.path());
    assert!(o.torn.is_none());
    assert_eq!(o.wal.durable_lsn().unwrap(), 3);
    assert_eq!(
        records(&o.wal, 0),
        vec![
            (0, b"one".to_vec()),
            (1, b"two".to_vec()),
            (2, b"three".to_vec())
        ]
    );
    assert_eq!(records(&o.wal, 2), vec![(2, b"three".to_vec())]);
    assert_eq!(o.wal.append(&[b"four"]).unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_share_syncs_and_lose_nothing() {
    let d = tempfile::tempdir().unwrap();
    let w = Arc::new(open(d.path()).wal);
    let mut tasks = Vec::new();
    for t in 0..16u8 {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50u8 {
                let lsn = w.append(&[&[t, i]]).unwrap();
                w.wait_durable(lsn).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let w = Arc::into_inner(w).unwrap();
    drop(w);
    let o = open(d.path());
    let got = records(&o.wal, 0);
    assert_eq!(got.len(), 800);
    let mut seen: Vec<[u8; 2]> = got.iter().map(|(_, r)| [r[0], r[1]]).collect();
    // Per writer, order is kept.
    for t in 0..16u8 {
        let mine: Vec<u8> = seen.iter().filter(|r| r[0] == t).map(|r| r[1]).collect();
        assert_eq!(mine, (0..50).collect::<Vec<u8>>());
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 800);
}

#[test]
fn a_torn_tail_is_cut_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let w = open(d.path()).wal;
    let end = w.append(&[b"kept"]).unwrap();
    w.wait_durable_blocking(end).unwrap();
    drop(w);
    let seg = segments(d.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let good = frames_end(&bytes);
    // The rest of the file is zeros written ahead: a clean end.
    assert!(bytes.len() > good && bytes[good..].iter().all(|&b| b == 0));
    // Half of a frame over them, as a crash during its write leaves it.
    let mut half = Vec::new();
    frame::encode_frame(&mut half, 1, 1, &[b"lost in the crash"]);
    half.truncate(half.len() / 2);
    bytes[good..good + half.len()].copy_from_slice(&half);
    std::fs::write(&seg, &bytes).unwrap();
    let o = open(d.path());
    let torn = o.torn.clone().expect("a torn tail");
    assert_eq!(torn.segment, seg);
    assert_eq!(torn.offset, good as u64);
    assert_eq!(torn.dropped, (bytes.len() - good) as u64);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), good as u64);
    assert_eq!(records(&o.wal, 0), vec![(0, b"kept".to_vec())]);
    // The log goes on from the cut.
    let next = o.wal.append(&[b"after"]).unwrap();
    o.wal.wait_durable_blocking(next).unwrap();
    drop(o);
    let o = open(d.path());
    assert!(o.torn.is_none());
    assert_eq!(records(&o.wal, 0).len(), 2);
}

#[test]
fn a_clean_stop_leaves_zeros_after_the_frames_and_they_are_no_tail() {
    let d = tempfile::tempdir().unwrap();
    let w = open(d.path()).wal;
    for i in 0..3u8 {
        let end = w.append(&[&[i; 100]]).unwrap();
        w.wait_durable_blocking(end).unwrap();
    }
    drop(w);
    let seg = segments(d.path()).pop().unwrap();
    let bytes = std::fs::read(&seg).unwrap();
    let end = frames_end(&bytes);
    assert!(bytes.len() > end, "the segment is preallocated");
    // Reopened: no torn tail, nothing cut, and the next group goes right
    // after the last frame.
    let o = open(d.path());
    assert!(o.torn.is_none());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), bytes.len() as u64);
    let next = o.wal.append(&[b"next"]).unwrap();
    o.wal.wait_durable_blocking(next).unwrap();
    drop(o);
    let bytes = std::fs::read(&seg).unwrap();
    let (_, scan) = frame::scan_segment(&bytes).unwrap();
    assert_eq!((scan.frames.len(), scan.stop), (4, None));
    assert_eq!(records(&open(d.path()).wal, 3), vec![(3, b"next".to_vec())]);
    // A segment that filled up keeps no zeros: the next begins where its
    // frames end.
    let d = tempfile::tempdir().unwrap();
    let w = Wal::open(d.path(), small(0)).unwrap().wal;
    for i in 0..20u32 {
        let end = w.append(&[&i.to_be_bytes(), &[3; 40]]).unwrap();
        w.wait_durable_blocking(end).unwrap();
    }
    drop(w);
    let segs = segments(d.path());
    for full in &segs[..segs.len() - 1] {
        let b = std::fs::read(full).unwrap();
        assert_eq!(frames_end(&b), b.len(), "{}", full.display());
    }
}

#[test]
fn damage_before_the_tail_refuses_naming_segment_and_offset() {
    let d = tempfile::tempdir().unwrap();
    let w = open(d.path()).wal;
    for r in [&b"first"[..], b"second", b"third"] {
        let end = w.append(&[r]).unwrap();
        w.wait_durable_blocking(end).unwrap();
    }
    drop(w);
    let seg = segments(d.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let second = frame::SEGMENT_HEADER + frame::FRAME_HEADER + 4 + 5;
    bytes[second + frame::FRAME_HEADER + 5] ^= 1;
    std::fs::write(&seg, &bytes).unwrap();
    let msg = corrupt_message(Wal::open(d.path(), WalOptions::default()).unwrap_err());
    assert!(msg.contains(&seg.display().to_string()), "{msg}");
    assert!(msg.contains(&format!("offset {second}")), "{msg}");
    assert!(msg.contains("checksum"), "{msg}");
    // Nothing was cut.
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);
}

#[test]
fn damage_below_the_floor_is_never_a_torn_tail() {
    let d = tempfile::tempdir().unwrap();
    let w = open(d.path()).wal;
    let end = w.append(&[b"applied by a view"]).unwrap();
    w.wait_durable_blocking(end).unwrap();
    drop(w);
    let seg = segments(d.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = frames_end(&bytes) - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    let floor = WalOptions {
        floor: 1,
        ..WalOptions::default()
    };
    let msg = corrupt_message(Wal::open(d.path(), floor).unwrap_err());
    assert!(msg.contains("already applied"), "{msg}");
    // Without a floor the same bytes read as a torn tail.
    let o = open(d.path());
    assert!(o.torn.is_some());
}

#[test]
fn segments_roll_retire_and_replay_across_files() {
    let d = tempfile::tempdir().unwrap();
    let w = Wal::open(d.path(), small(0)).unwrap().wal;
    let mut end = 0;
    for i in 0..40u32 {
        end = w.append(&[&i.to_be_bytes(), &[7; 20]]).unwrap();
        w.wait_durable_blocking(end).unwrap();
    }
    let n = segments(d.path()).len();
    assert!(n > 3, "{n} segments");
    assert_eq!(records(&w, 0).len(), 80);
    assert_eq!(records(&w, 75).first().unwrap().0, 75);
    let gone = w.retire_below(60).unwrap();
    assert!(gone > 0);
    assert!(w.first_lsn() <= 60);
    assert_eq!(records(&w, 60).len(), 20);
    let msg = corrupt_message(w.replay(0, |_, _| Ok(())).unwrap_err());
    assert!(msg.contains("starts at LSN"), "{msg}");
    drop(w);
    let o = Wal::open(d.path(), small(60)).unwrap();
    assert_eq!(o.wal.durable_lsn().unwrap(), end);
}

#[test]
fn a_missing_or_damaged_middle_segment_refuses() {
    let d = tempfile::tempdir().unwrap();
    let w = Wal::open(d.path(), small(0)).unwrap().wal;
    for i in 0..30u32 {
        let end = w.append(&[&i.to_be_bytes(), &[1; 30]]).unwrap();
        w.wait_durable_blocking(end).unwrap();
    }
    drop(w);
    let segs = segments(d.path());
    assert!(segs.len() >= 3);
    let middle = segs[1].clone();
    let saved = std::fs::read(&middle).unwrap();
    // Damaged: a flipped byte in a segment that was complete.
    let mut bad = saved.clone();
    bad[frame::SEGMENT_HEADER + 3] ^= 0xff;
    std::fs::write(&middle, &bad).unwrap();
    let msg = corrupt_message(Wal::open(d.path(), small(0)).unwrap_err());
    assert!(msg.contains(&middle.display().to_string()), "{msg}");
    assert!(msg.contains("not a torn write"), "{msg}");
    // Truncated.
    std::fs::write(&middle, &saved[..saved.len() - 3]).unwrap();
    let msg = corrupt_message(Wal::open(d.path(), small(0)).unwrap_err());
    assert!(msg.contains(&middle.display().to_string()), "{msg}");
    // Deleted.
    std::fs::remove_file(&middle).unwrap();
    let msg = corrupt_message(Wal::open(d.path(), small(0)).unwrap_err());
    assert!(msg.contains("are missing"), "{msg}");
}

#[test]
fn a_log_older_than_its_views_refuses() {
    let d = tempfile::tempdir().unwrap();
    let w = open(d.path()).wal;
    let end = w.append(&[b"a", b"b"]).unwrap();
    w.wait_durable_blocking(end).unwrap();
    drop(w);
    let floor = WalOptions {
        floor: 5,
        ..WalOptions::default()
    };
    let msg = corrupt_message(Wal::open(d.path(), floor).unwrap_err());
    assert!(msg.contains("ends at LSN 2"), "{msg}");
    // A deleted log under views that applied records, too.
    for s in segments(d.path()) {
        std::fs::remove_file(s).unwrap();
    }
    let floor = WalOptions {
        floor: 2,
        ..WalOptions::default()
    };
    let msg = corrupt_message(Wal::open(d.path(), floor).unwrap_err());
    assert!(msg.contains("ends at LSN 0"), "{msg}");
}

#[test]
fn a_segment_whose_creation_was_interrupted_is_removed() {
    let d = tempfile::tempdir().unwrap();
    let w = open(d.path()).wal;
    let end = w.append(&[b"x"]).unwrap();
    w.wait_durable_blocking(end).unwrap();
    drop(w);
    let partial = d.path().join(format!("{:020}.wal", 1));
    std::fs::write(&partial, b"SOVRA").unwrap();
    let o = open(d.path());
    assert_eq!(o.torn.as_ref().unwrap().segment, partial);
    assert!(!partial.exists());
    assert_eq!(records(&o.wal, 0).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_appenders_share_held_groups_and_lose_nothing() {
    let d = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        max_commit_delay: Duration::from_millis(5),
        ..WalOptions::default()
    };
    let w = Arc::new(Wal::open(d.path(), opts.clone()).unwrap().wal);
    let mut tasks = Vec::new();
    for t in 0..16u8 {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50u8 {
                let intent = w.intent();
                // Some requests fail before they append: their intent
                // goes all the same.
                if i % 7 == 3 {
                    continue;
                }
                let lsn = w.append(&[&[t, i]]).unwrap();
                drop(intent);
                w.wait_durable(lsn).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    drop(Arc::into_inner(w).unwrap());
    let o = Wal::open(d.path(), opts).unwrap();
    let got = records(&o.wal, 0);
    let expected: Vec<u8> = (0..50u8).filter(|i| i % 7 != 3).collect();
    assert_eq!(got.len(), 16 * expected.len());
    for t in 0..16u8 {
        let mine: Vec<u8> = got
            .iter()
            .filter(|(_, r)| r[0] == t)
            .map(|(_, r)| r[1])
            .collect();
        assert_eq!(mine, expected);
    }
}

#[test]
fn an_intent_that_is_never_dropped_only_delays_a_group() {
    let d = tempfile::tempdir().unwrap();
    let w = Wal::open(
        d.path(),
        WalOptions {
            max_commit_delay: sovra_wal::MAX_COMMIT_DELAY,
            ..WalOptions::default()
        },
    )
    .unwrap()
    .wal;
    // A request that announced an append and then stalls (or forgot its
    // intent) holds groups back for at most the delay, never for good.
    let stalled = (w.intent(), w.intent());
    for i in 0..3u8 {
        let lsn = w.append(&[&[i]]).unwrap();
        w.wait_durable_blocking(lsn).unwrap();
    }
    drop(stalled);
    // With none working, a group goes at once; closing goes at once too.
    let lsn = w.append(&[b"last"]).unwrap();
    let _late = w.intent();
    w.wait_durable_blocking(lsn).unwrap();
    assert_eq!(w.durable_lsn().unwrap(), 4);
}

#[test]
fn oversized_appends_and_bad_options_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let w = open(d.path()).wal;
    let big = vec![0u8; frame::MAX_FRAME];
    assert!(matches!(
        w.append(&[&big]),
        Err(WalError::InvalidArgument(_))
    ));
    let bad = WalOptions {
        segment_bytes: 10,
        ..WalOptions::default()
    };
    assert!(matches!(
        Wal::open(&d.path().join("other"), bad),
        Err(WalError::InvalidArgument(_))
    ));
    let slow = WalOptions {
        max_commit_delay: sovra_wal::MAX_COMMIT_DELAY + Duration::from_micros(1),
        ..WalOptions::default()
    };
    match Wal::open(&d.path().join("slow"), slow) {
        Err(WalError::InvalidArgument(e)) => assert!(e.to_string().contains("commit delay")),
        other => panic!("expected the delay to be refused, got {other:?}"),
    }
}

fn sample_segment() -> Vec<u8> {
    let mut seg = frame::segment_header(0).to_vec();
    frame::encode_frame(&mut seg, 0, 0, &[b"alpha", b"beta"]);
    frame::encode_frame(&mut seg, 2, 2, &[b"gamma"]);
    frame::encode_frame(&mut seg, 3, 3, &[b""]);
    seg
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Fuzzing the reader: any bytes after a header scan without a panic,
    /// and every frame returned is one whose checksum held.
    #[test]
    fn the_scanner_takes_any_bytes(tail in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut seg = frame::segment_header(0).to_vec();
        seg.extend_from_slice(&tail);
        let (_, s) = frame::scan_segment(&seg).unwrap();
        prop_assert!(s.end as usize <= seg.len());
        let _ = frame::find_later_frame(&seg, 0);
        let _ = frame::scan_segment(&tail);
    }

    /// A changed byte anywhere in a segment is never read as a different
    /// record: the scan stops at or before it.
    #[test]
    fn a_changed_byte_is_never_read_as_data(at in 0usize..200, bit in 0u8..8) {
        let seg = sample_segment();
        let at = at % seg.len();
        let mut bad = seg.clone();
        bad[at] ^= 1 << bit;
        let good = frame::scan_segment(&seg).unwrap().1;
        match frame::scan_segment(&bad) {
            Err(_) => prop_assert!(at < frame::SEGMENT_HEADER),
            Ok((_, s)) => {
                prop_assert!(s.stop.is_some());
                prop_assert!(s.end as usize <= at);
                for f in &s.frames {
                    prop_assert!(good.frames.contains(f));
                }
            }
        }
    }

    /// Opening a directory whose last segment holds any bytes never
    /// panics: it opens (cutting a tail) or refuses as damaged.
    #[test]
    fn open_takes_any_last_segment(cut in 0usize..120, junk in proptest::collection::vec(any::<u8>(), 0..64)) {
        let d = tempfile::tempdir().unwrap();
        let mut seg = sample_segment();
        seg.truncate(cut.min(seg.len()));
        seg.extend_from_slice(&junk);
        std::fs::write(d.path().join(format!("{:020}.wal", 0)), &seg).unwrap();
        match Wal::open(d.path(), WalOptions::default()) {
            Ok(o) => { let _ = records(&o.wal, 0); }
            Err(WalError::Corrupt(_)) => {}
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}

#[test]
fn a_recorded_floor_makes_tail_damage_a_refusal() {
    let d = tempfile::tempdir().unwrap();
    let w = open(d.path()).wal;
    let end = w.append(&[b"applied"]).unwrap();
    w.wait_durable_blocking(end).unwrap();
    assert!(w.record_floor(end + 1).is_err());
    w.record_floor(end).unwrap();
    drop(w);
    let seg = segments(d.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = frames_end(&bytes) - 1;
    bytes[last] ^= 1;
    std::fs::write(&seg, &bytes).unwrap();
    let msg = corrupt_message(Wal::open(d.path(), WalOptions::default()).unwrap_err());
    assert!(msg.contains("already applied"), "{msg}");
    // A damaged floor file is refused, naming it.
    std::fs::write(d.path().join("floor"), b"garbage").unwrap();
    let msg = corrupt_message(Wal::open(d.path(), WalOptions::default()).unwrap_err());
    assert!(msg.contains("floor"), "{msg}");
}

#[test]
fn the_step_before_each_write_runs_and_its_failure_fails_the_log() {
    let d = tempfile::tempdir().unwrap();
    let w = open(d.path()).wal;
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = runs.clone();
    w.set_before_write(move || {
        if r.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Ok(())
        } else {
            Err("the pad file cannot be synced".into())
        }
    });
    let a = w.append(&[b"a"]).unwrap();
    w.wait_durable_blocking(a).unwrap();
    let b = w.append(&[b"b"]).unwrap();
    let e = w.wait_durable_blocking(b).unwrap_err();
    assert!(e.to_string().contains("pad file"), "{e}");
    assert!(w.append(&[b"c"]).is_err());
    drop(w);
    let o = open(d.path());
    assert_eq!(records(&o.wal, 0), vec![(0, b"a".to_vec())]);
}

#[test]
fn a_second_process_cannot_open_a_live_log() {
    let d = tempfile::tempdir().unwrap();
    let w = open(d.path()).wal;
    let e = Wal::open(d.path(), WalOptions::default()).unwrap_err();
    assert!(e.to_string().contains("another `sovra serve`"), "{e}");
    drop(w);
    open(d.path());
}
