//! Segments on disk, the group-commit thread, recovery and replay.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Result, WalError};
use crate::frame::{self, Frame, FRAME_HEADER, MAX_FRAME, SEGMENT_HEADER};

/// Options for opening a log.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// A new segment is started once the current one reaches this size.
    pub segment_bytes: u64,
    /// The LSN the caller's views have applied and made durable: damage
    /// below it is never a torn tail.
    pub floor: u64,
    /// How long the commit thread may hold a group back while requests
    /// that announced an append ([`Wal::intent`]) are still working
    /// towards it; zero syncs each group at once. See [`Intent`].
    pub max_commit_delay: Duration,
}

/// The default [`WalOptions::max_commit_delay`].
pub const DEFAULT_MAX_COMMIT_DELAY: Duration = Duration::from_micros(1000);

/// Largest [`WalOptions::max_commit_delay`] accepted.
pub const MAX_COMMIT_DELAY: Duration = Duration::from_millis(100);

/// A group this large is written at once, whoever is still working.
const GROUP_BYTES: usize = 1024 * 1024;

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 * 1024 * 1024,
            floor: 0,
            max_commit_delay: DEFAULT_MAX_COMMIT_DELAY,
        }
    }
}

/// A torn tail found and cut off at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment file.
    pub segment: PathBuf,
    /// Where the valid frames end (the file's new length).
    pub offset: u64,
    /// Bytes removed.
    pub dropped: u64,
    /// Why the bytes there were not a frame.
    pub reason: String,
}

/// What [`Wal::open`] found.
#[derive(Debug)]
pub struct Opened {
    /// The log.
    pub wal: Wal,
    /// The torn tail that was cut off, if any.
    pub torn: Option<TornTail>,
}

struct Segment {
    path: PathBuf,
    first: u64,
}

struct Pending {
    buf: Vec<u8>,
    /// LSN of the next record appended.
    next: u64,
    closing: bool,
    /// Live [`Intent`]s: requests still working towards an append.
    working: usize,
    /// Intents that ended since the commit thread last took a group: the
    /// requests waiting for it.
    joined: usize,
}

impl Pending {
    /// Whether a pending group is worth holding back: more requests are
    /// still working towards an append than wait in the group. Holding
    /// then costs the cores nothing (the working half keeps them busy)
    /// while the group grows; once the waiting half is the larger, holding
    /// longer would leave the cores idle.
    fn holds(&self) -> bool {
        self.working > self.joined && !self.closing && self.buf.len() < GROUP_BYTES
    }
}

struct Durable {
    lsn: u64,
    failed: Option<String>,
}

/// A step the commit thread runs before writing each group.
type BeforeWrite = Box<dyn Fn() -> std::result::Result<(), String> + Send + Sync>;

const FLOOR_FILE: &str = "floor";

struct Shared {
    dir: PathBuf,
    before_write: Mutex<Option<BeforeWrite>>,
    pending: Mutex<Pending>,
    work: Condvar,
    durable: Mutex<Durable>,
    synced: Condvar,
    watch: tokio::sync::watch::Sender<u64>,
    segments: Mutex<Vec<Segment>>,
    segment_bytes: u64,
    max_commit_delay: Duration,
}

/// The write-ahead log of one data directory.
pub struct Wal {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
    /// Held open with an exclusive lock: one process per log.
    _lock: File,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wal({})", self.shared.dir.display())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves whole values behind.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.wal")
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WalError::io(dir, "sync the directory", &e))
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| WalError::io(dir, "list", &e))?;
    for ent in rd {
        let ent = ent.map_err(|e| WalError::io(dir, "list", &e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".wal") else {
            continue;
        };
        let first = stem.parse::<u64>().map_err(|_| {
            WalError::corrupt(format!(
                "{}: a segment name must be its first LSN in 20 digits",
                ent.path().display()
            ))
        })?;
        out.push(Segment {
            path: ent.path(),
            first,
        });
    }
    out.sort_by_key(|s| s.first);
    Ok(out)
}

impl Wal {
    /// Opens (or creates) the log in `dir`, recovering as the crate docs
    /// say.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<Opened> {
        if opts.segment_bytes < (SEGMENT_HEADER + FRAME_HEADER) as u64 {
            return Err(WalError::invalid(format!(
                "segment size {} is too small",
                opts.segment_bytes
            )));
        }
        if opts.max_commit_delay > MAX_COMMIT_DELAY {
            return Err(WalError::invalid(format!(
                "a commit delay of {:?} is over the {MAX_COMMIT_DELAY:?} limit",
                opts.max_commit_delay
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| WalError::io(dir, "create", &e))?;
        // INVARIANT: taken before anything is read, so a second process
        // can never take a live log's tail for a torn one and cut it.
        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| WalError::io(&lock_path, "open", &e))?;
        fs2::FileExt::try_lock_exclusive(&lock_file).map_err(|e| {
            WalError::io(
                &lock_path,
                "lock (is another `sovra serve` using this data directory?)",
                &e,
            )
        })?;
        let opts = WalOptions {
            floor: opts.floor.max(read_floor(dir)?),
            ..opts
        };
        let mut segments = list_segments(dir)?;
        let (next, torn, tail_end) = recover(dir, &mut segments, opts.floor)?;
        let (file, size) = match segments.last() {
            Some(s) => (open_segment(&s.path)?, tail_end),
            None => {
                let s = create_segment(dir, next)?;
                let f = open_segment(&s.path)?;
                segments.push(s);
                (f, SEGMENT_HEADER as u64)
            }
        };
        let allocated = file
            .metadata()
            .map_err(|e| WalError::io(dir, "stat the last segment", &e))?
            .len()
            .max(size);
        let (watch, _) = tokio::sync::watch::channel(next);
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            before_write: Mutex::new(None),
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                next,
                closing: false,
                working: 0,
                joined: 0,
            }),
            work: Condvar::new(),
            durable: Mutex::new(Durable {
                lsn: next,
                failed: None,
            }),
            synced: Condvar::new(),
            watch,
            segments: Mutex::new(segments),
            segment_bytes: opts.segment_bytes,
            max_commit_delay: opts.max_commit_delay,
        });
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name("sovra-wal".into())
            .spawn(move || commit_loop(&s, file, size, allocated))
            .map_err(|e| WalError::io(dir, "start the commit thread", &e))?;
        Ok(Opened {
            wal: Wal {
                shared,
                thread: Some(thread),
                _lock: lock_file,
            },
            torn,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Sets a step the commit thread runs before it writes each group (for
    /// files the group's records depend on, which must be on disk first).
    /// An error fails the log as a failed write would.
    pub fn set_before_write(
        &self,
        f: impl Fn() -> std::result::Result<(), String> + Send + Sync + 'static,
    ) {
        *lock(&self.shared.before_write) = Some(Box::new(f));
    }

    /// Records that every record below `lsn` was applied to the caller's
    /// views and those are on disk: from the next open, damage below `lsn`
    /// is never taken for a torn tail. Written atomically (a temporary file
    /// renamed over the last).
    pub fn record_floor(&self, lsn: u64) -> Result<()> {
        let durable = self.durable_lsn()?;
        if lsn > durable {
            return Err(WalError::invalid(format!(
                "floor {lsn} is beyond the durable end {durable}"
            )));
        }
        let dir = &self.shared.dir;
        let tmp = dir.join("floor.tmp");
        let mut b = lsn.to_be_bytes().to_vec();
        b.extend_from_slice(&crc32c::crc32c(&b).to_be_bytes());
        let mut f = File::create(&tmp).map_err(|e| WalError::io(&tmp, "create", &e))?;
        f.write_all(&b)
            .and_then(|()| f.sync_all())
            .map_err(|e| WalError::io(&tmp, "write", &e))?;
        std::fs::rename(&tmp, dir.join(FLOOR_FILE))
            .map_err(|e| WalError::io(&tmp, "rename", &e))?;
        sync_dir(dir)
    }

    /// Appends `records` as one frame; returns the LSN after its last
    /// record (the value to wait for). Not durable until that LSN is.
    pub fn append(&self, records: &[&[u8]]) -> Result<u64> {
        let len = frame::payload_len(records);
        if len > MAX_FRAME {
            return Err(WalError::invalid(format!(
                "an append of {len} bytes is over the {MAX_FRAME}-byte frame limit"
            )));
        }
        let synced = self.durable_lsn()?;
        let mut p = lock(&self.shared.pending);
        if p.closing {
            return Err(WalError::failed("the log is closing"));
        }
        let lsn = p.next;
        let was_empty = p.buf.is_empty();
        frame::encode_frame(&mut p.buf, lsn, synced, records);
        p.next = lsn + records.len() as u64;
        let end = p.next;
        // The commit thread waits for a first frame, or (holding a group)
        // for the group to fill or the last intent to go: other appends
        // need not wake it.
        let wake = was_empty || p.buf.len() >= GROUP_BYTES;
        drop(p);
        if wake {
            self.shared.work.notify_one();
        }
        Ok(end)
    }

    /// Announces a request that will append and then wait for its records:
    /// until the returned [`Intent`] is dropped, the commit thread may hold
    /// a pending group back (at most the log's `max_commit_delay`) so that
    /// this request's records join it and share its sync. Drop it after
    /// the request's last append, before waiting: a request that waits
    /// with its intent still held only adds the delay to its own answer.
    pub fn intent(&self) -> Intent {
        lock(&self.shared.pending).working += 1;
        Intent {
            shared: self.shared.clone(),
        }
    }

    /// The LSN after the last appended record.
    pub fn next_lsn(&self) -> u64 {
        lock(&self.shared.pending).next
    }

    /// Every record below the returned LSN is durable; an error once a
    /// write or sync failed.
    pub fn durable_lsn(&self) -> Result<u64> {
        let d = lock(&self.shared.durable);
        match &d.failed {
            Some(e) => Err(WalError::failed(e.clone())),
            None => Ok(d.lsn),
        }
    }

    /// Waits until every record below `lsn` is durable.
    pub async fn wait_durable(&self, lsn: u64) -> Result<()> {
        let mut rx = self.shared.watch.subscribe();
        loop {
            if self.durable_lsn()? >= lsn {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Err(WalError::failed("the log's commit thread has stopped"));
            }
        }
    }

    /// [`Wal::wait_durable`] for callers without a runtime.
    pub fn wait_durable_blocking(&self, lsn: u64) -> Result<()> {
        let mut d = lock(&self.shared.durable);
        loop {
            if let Some(e) = &d.failed {
                return Err(WalError::failed(e.clone()));
            }
            if d.lsn >= lsn {
                return Ok(());
            }
            d = self
                .shared
                .synced
                .wait(d)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// The LSN of the oldest record still held.
    pub fn first_lsn(&self) -> u64 {
        lock(&self.shared.segments).first().map_or(0, |s| s.first)
    }

    /// Calls `f` with every durable record from `from` on, in order. Reads
    /// the segments again, so damage since open is caught (and refused)
    /// here too.
    pub fn replay(&self, from: u64, mut f: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        let end = self.durable_lsn()?;
        let first = self.first_lsn();
        if from < first {
            return Err(WalError::corrupt(format!(
                "{}: records from LSN {from} are needed but the log starts at LSN {first}",
                self.shared.dir.display()
            )));
        }
        let paths: Vec<(PathBuf, u64)> = lock(&self.shared.segments)
            .iter()
            .map(|s| (s.path.clone(), s.first))
            .collect();
        let mut seen = first;
        for (i, (path, seg_first)) in paths.iter().enumerate() {
            let seg_end = paths.get(i + 1).map(|(_, f)| *f);
            if let Some(e) = seg_end.filter(|e| *e <= from) {
                seen = e;
                continue;
            }
            if *seg_first != seen {
                return Err(WalError::corrupt(format!(
                    "{}: starts at LSN {seg_first}, expected {seen}",
                    path.display()
                )));
            }
            let bytes = std::fs::read(path).map_err(|e| WalError::io(path, "read", &e))?;
            let (_, scan) = frame::scan_segment(&bytes)
                .map_err(|why| WalError::corrupt(format!("{}: offset 0: {why}", path.display())))?;
            for Frame { lsn, records, .. } in &scan.frames {
                for (j, r) in records.iter().enumerate() {
                    let l = lsn + j as u64;
                    if l >= end {
                        return Ok(end);
                    }
                    if l >= from {
                        f(l, r)?;
                    }
                }
            }
            seen = scan.next_lsn;
            if seen < end && (scan.stop.is_some() || seg_end.is_some_and(|e| e != seen)) {
                let off = scan.stop.map_or(scan.end, |(o, _)| o);
                return Err(WalError::corrupt(format!(
                    "{}: offset {off}: durable record {seen} cannot be read",
                    path.display()
                )));
            }
        }
        if seen < end {
            return Err(WalError::corrupt(format!(
                "{}: durable records {seen}..{end} are missing",
                self.shared.dir.display()
            )));
        }
        Ok(end)
    }

    /// Deletes every segment whose records all lie below `lsn` (never the
    /// segment being written). Returns how many were deleted.
    pub fn retire_below(&self, lsn: u64) -> Result<usize> {
        let mut segs = lock(&self.shared.segments);
        let mut n = 0;
        while segs.len() > 1 && segs.get(1).is_some_and(|s| s.first <= lsn) {
            let s = segs.remove(0);
            std::fs::remove_file(&s.path).map_err(|e| WalError::io(&s.path, "delete", &e))?;
            n += 1;
        }
        drop(segs);
        if n > 0 {
            sync_dir(&self.shared.dir)?;
        }
        Ok(n)
    }
}

/// A request working towards an append (see [`Wal::intent`]). Dropping
/// it says the request will append nothing more before it waits.
pub struct Intent {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Intent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Intent")
    }
}

impl Drop for Intent {
    fn drop(&mut self) {
        let mut p = lock(&self.shared.pending);
        p.working = p.working.saturating_sub(1);
        p.joined += 1;
        let wake = !p.holds();
        drop(p);
        if wake {
            // INVARIANT: the count changed under the lock the commit
            // thread checks it under, so this wake-up cannot be lost.
            self.shared.work.notify_one();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        lock(&self.shared.pending).closing = true;
        self.shared.work.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Scans every segment, cutting a torn tail and refusing damage (see the
/// crate docs); returns the LSN after the last record, the tail cut, and
/// where the last segment's frames end (the next group's offset).
fn recover(
    dir: &Path,
    segments: &mut Vec<Segment>,
    floor: u64,
) -> Result<(u64, Option<TornTail>, u64)> {
    let mut torn = None;
    let mut tail_end = SEGMENT_HEADER as u64;
    let mut next = 0u64;
    let mut removed_last = false;
    let n = segments.len();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == n;
        let bytes = std::fs::read(&seg.path).map_err(|e| WalError::io(&seg.path, "read", &e))?;
        if last && bytes.len() < SEGMENT_HEADER && seg.first == next {
            // A segment whose creation a crash interrupted: it holds no
            // record, so removing it loses nothing.
            std::fs::remove_file(&seg.path)
                .map_err(|e| WalError::io(&seg.path, "remove the torn segment", &e))?;
            torn = Some(TornTail {
                segment: seg.path.clone(),
                offset: 0,
                dropped: bytes.len() as u64,
                reason: "the segment's header was never completely written".into(),
            });
            removed_last = true;
            continue;
        }
        let (first, scan) = frame::scan_segment(&bytes)
            .map_err(|why| WalError::corrupt(format!("{}: offset 0: {why}", seg.path.display())))?;
        if first != seg.first {
            return Err(WalError::corrupt(format!(
                "{}: its header says it starts at LSN {first}, its name says {}",
                seg.path.display(),
                seg.first
            )));
        }
        if i > 0 && first != next {
            return Err(WalError::corrupt(format!(
                    "{}: starts at LSN {first} but the segment before ends at LSN {next}: records {}..{} are missing",
                    seg.path.display(),
                    next.min(first),
                    next.max(first)
                )));
        }
        next = scan.next_lsn;
        tail_end = scan.end;
        let Some((offset, reason)) = scan.stop else {
            continue;
        };
        let here = format!("{}: offset {offset}", seg.path.display());
        if !last {
            return Err(WalError::corrupt(format!(
                    "{here}: {reason}; the segment was complete when the next one began, so this is damage, not a torn write"
                )));
        }
        if next < floor {
            return Err(WalError::corrupt(format!(
                    "{here}: {reason}; records from LSN {next} were already applied and durable (up to {}), so this is damage, not a torn write",
                    floor
                )));
        }
        if let Some(f) = frame::find_later_frame(&bytes, offset as usize) {
            if f.synced > next {
                return Err(WalError::corrupt(format!(
                        "{here}: {reason}; a later frame (offset {}) records that LSN {} was durable, so this is damage, not a torn write",
                        f.offset, f.synced
                    )));
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .open(&seg.path)
            .map_err(|e| WalError::io(&seg.path, "open", &e))?;
        file.set_len(offset)
            .and_then(|()| file.sync_all())
            .map_err(|e| WalError::io(&seg.path, "truncate the torn tail", &e))?;
        torn = Some(TornTail {
            segment: seg.path.clone(),
            offset,
            dropped: bytes.len() as u64 - offset,
            reason,
        });
    }
    if removed_last {
        segments.pop();
    }
    if next < floor {
        return Err(WalError::corrupt(format!(
                "{}: the log ends at LSN {next} but records up to {} were applied: segments were lost or restored from an older copy",
                dir.display(),
                floor
            )));
    }
    Ok((next, torn, tail_end))
}

/// The recorded floor; 0 if none was recorded.
fn read_floor(dir: &Path) -> Result<u64> {
    let path = dir.join(FLOOR_FILE);
    let b = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(WalError::io(&path, "read", &e)),
    };
    let ok = b.len() == 12 && crc32c::crc32c(&b[..8]).to_be_bytes()[..] == b[8..];
    if !ok {
        return Err(WalError::corrupt(format!(
            "{}: the recorded floor is damaged (12 bytes with a checksum expected)",
            path.display()
        )));
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    Ok(u64::from_be_bytes(a))
}

/// Opens a segment for the commit thread, which writes at its own offsets
/// (groups over preallocated zeros), not at the file's end.
fn open_segment(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| WalError::io(path, "open", &e))
}

/// How far ahead of the groups a segment is filled with zeros.
const PREALLOCATE: u64 = 1024 * 1024;

/// Makes sure `file` has written zeros up to at least `need`, in steps of
/// [`PREALLOCATE`]; returns the new allocated length. Written, not
/// `fallocate`d: an unwritten extent would still make the next sync write
/// metadata. The zeros become durable with the group sync that follows.
fn preallocate(file: &File, path: &Path, allocated: u64, need: u64) -> Result<u64> {
    if need <= allocated {
        return Ok(allocated);
    }
    let target = need.max(allocated + PREALLOCATE);
    let zeros = [0u8; 64 * 1024];
    let mut at = allocated;
    while at < target {
        let n = (target - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], at)
            .map_err(|e| WalError::io(path, "preallocate", &e))?;
        at += n;
    }
    Ok(target)
}

fn create_segment(dir: &Path, first: u64) -> Result<Segment> {
    let path = dir.join(segment_name(first));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| WalError::io(&path, "create", &e))?;
    f.write_all(&frame::segment_header(first))
        .and_then(|()| f.sync_all())
        .map_err(|e| WalError::io(&path, "write the header", &e))?;
    sync_dir(dir)?;
    Ok(Segment { path, first })
}

/// Holds a pending group back while more announced requests are still
/// working towards their appends than wait in it ([`Pending::holds`]), so
/// that they share one sync: at most the log's `max_commit_delay`, and
/// never once the group is [`GROUP_BYTES`] or the log is closing. A sync
/// costs CPU (on a virtual machine, an exit for each request sent to the
/// disk), so under load fewer, larger groups leave more of the cores to
/// the requests; with no other request working, nothing is held back and
/// a lone client waits for one sync as before.
fn hold_group<'a>(s: &'a Shared, mut p: MutexGuard<'a, Pending>) -> MutexGuard<'a, Pending> {
    if s.max_commit_delay.is_zero() {
        return p;
    }
    let deadline = Instant::now() + s.max_commit_delay;
    while p.holds() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        p = s
            .work
            .wait_timeout(p, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
    p
}

/// The group-commit thread: writes what is pending, syncs once, wakes the
/// waiters; starts a new segment when the current one is full.
fn commit_loop(s: &Shared, mut file: File, mut size: u64, mut allocated: u64) {
    let mut buf = Vec::new();
    loop {
        let end = {
            let mut p = lock(&s.pending);
            while p.buf.is_empty() && !p.closing {
                p = s
                    .work
                    .wait(p)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if p.buf.is_empty() {
                return;
            }
            p = hold_group(s, p);
            p.joined = 0;
            std::mem::swap(&mut buf, &mut p.buf);
            p.next
        };
        let r = (|| -> Result<()> {
            if let Some(f) = lock(&s.before_write).as_ref() {
                f().map_err(|e| WalError::failed(format!("before writing a group: {e}")))?;
            }
            let path = lock(&s.segments)
                .last()
                .map(|x| x.path.clone())
                .unwrap_or_default();
            // INVARIANT: `size` is where the last frame ends; groups are
            // written there, over zeros written ahead, so a sync writes
            // the group and not the file's size (except when extending).
            allocated = preallocate(&file, &path, allocated, size + buf.len() as u64)?;
            file.write_all_at(&buf, size)
                .map_err(|e| WalError::io(&path, "write", &e))?;
            file.sync_data()
                .map_err(|e| WalError::io(&path, "fdatasync", &e))?;
            size += buf.len() as u64;
            Ok(())
        })();
        buf.clear();
        let failed = r.err().map(|e| e.to_string());
        {
            let mut d = lock(&s.durable);
            match &failed {
                Some(e) => {
                    tracing::error!(error = %e, "the write-ahead log failed; nothing more is accepted until a restart");
                    d.failed = Some(e.clone());
                }
                None => d.lsn = end,
            }
        }
        s.synced.notify_all();
        s.watch.send_replace(end);
        if failed.is_some() {
            return;
        }
        if size >= s.segment_bytes {
            // The full segment keeps no preallocated tail (zeros would read
            // as a clean end anyway, so this need not be synced, and a
            // failure loses nothing: it is reported, not fatal).
            if let Err(e) = file.set_len(size) {
                let path = lock(&s.segments).last().map(|x| x.path.clone());
                tracing::warn!(
                    segment = %path.unwrap_or_default().display(),
                    error = %e,
                    "cannot cut a full write-ahead log segment to its last frame; its zeros stay"
                );
            }
            match create_segment(&s.dir, end).and_then(|seg| {
                let f = open_segment(&seg.path)?;
                Ok((seg, f))
            }) {
                Ok((seg, f)) => {
                    // INVARIANT: the new segment starts at `end`, and every
                    // record below `end` is in the synced segment before it.
                    // Appends made meanwhile are still pending, so they go
                    // to the new file.
                    lock(&s.segments).push(seg);
                    file = f;
                    size = SEGMENT_HEADER as u64;
                    allocated = size;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a new write-ahead log segment");
                    lock(&s.durable).failed = Some(e.to_string());
                    s.synced.notify_all();
                    s.watch.send_replace(end);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(working: usize, joined: usize, bytes: usize, closing: bool) -> Pending {
        Pending {
            buf: vec![0; bytes],
            next: 0,
            closing,
            working,
            joined,
        }
    }

    #[test]
    fn a_group_is_held_only_while_more_requests_work_than_wait() {
        // Nobody working: a lone client's group goes at once.
        assert!(!pending(0, 0, 10, false).holds());
        assert!(!pending(0, 3, 10, false).holds());
        // More working than waiting: hold.
        assert!(pending(1, 0, 10, false).holds());
        assert!(pending(9, 8, 10, false).holds());
        // As many waiting as working, or more: go.
        assert!(!pending(8, 8, 10, false).holds());
        assert!(!pending(2, 14, 10, false).holds());
        // A full group or a closing log never waits.
        assert!(!pending(9, 0, GROUP_BYTES, false).holds());
        assert!(!pending(9, 0, 10, true).holds());
    }
}
