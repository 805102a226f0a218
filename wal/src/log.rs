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

pub(crate) struct Segment {
    path: PathBuf,
    first: u64,
}

struct Pending {
    buf: Vec<u8>,
    /// Pad writes staged for the next group (PostgreSQL only; see
    /// [`Wal::stage_pad`]).
    pads: Vec<PadWrite>,
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

/// Where the log's groups go.
pub(crate) enum Backing {
    /// Segment files in a directory.
    Files {
        dir: PathBuf,
        segments: Mutex<Vec<Segment>>,
        segment_bytes: u64,
    },
    /// One row per group in a PostgreSQL table (see `postgres.rs`).
    Postgres(Box<crate::postgres::PgShared>),
}

/// A pad write staged for the next group: a slot's new pad, or `None` to
/// delete it (erasure).
pub(crate) struct PadWrite {
    pub(crate) slot: u64,
    pub(crate) pad: Option<zeroize::Zeroizing<[u8; 32]>>,
}

pub(crate) struct Shared {
    /// The log's place, for messages: a directory, or a database and schema.
    place: String,
    pub(crate) backing: Backing,
    before_write: Mutex<Option<BeforeWrite>>,
    pending: Mutex<Pending>,
    work: Condvar,
    durable: Mutex<Durable>,
    synced: Condvar,
    watch: tokio::sync::watch::Sender<u64>,
    max_commit_delay: Duration,
}

/// The write-ahead log of one data directory, or of one PostgreSQL schema.
pub struct Wal {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
    /// Segment files: held open with an exclusive lock, one process per
    /// log (PostgreSQL: the sequencer lease is the commit thread's).
    _lock: Option<File>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wal({})", self.shared.place)
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves whole values behind.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Opens (creating it and its directory) and locks `path` exclusively.
fn lock_exclusive(path: &Path) -> Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| WalError::io(parent, "create", &e))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| WalError::io(path, "open", &e))?;
    fs2::FileExt::try_lock_exclusive(&file).map_err(|e| {
        WalError::io(
            path,
            "lock (is another `sovra serve` using this data directory?)",
            &e,
        )
    })?;
    Ok(file)
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
        let lock_file = lock_exclusive(&dir.join("lock"))?;
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
        let shared = Shared::new(
            dir.display().to_string(),
            Backing::Files {
                dir: dir.to_owned(),
                segments: Mutex::new(segments),
                segment_bytes: opts.segment_bytes,
            },
            next,
            opts.max_commit_delay,
        );
        let s = shared.clone();
        let mut sink = FileSink {
            file,
            size,
            allocated,
        };
        let thread = thread::Builder::new()
            .name("sovra-wal".into())
            .spawn(move || commit_loop(&s, &mut sink))
            .map_err(|e| WalError::io(dir, "start the commit thread", &e))?;
        Ok(Opened {
            wal: Wal {
                shared,
                thread: Some(thread),
                _lock: Some(lock_file),
            },
            torn,
        })
    }

    /// Opens the log kept in PostgreSQL (see `postgres.rs`): connects,
    /// takes the schema's sequencer lease (waiting for it at most
    /// `lease_wait`, or for as long as another server holds it), creates
    /// the tables a new schema lacks, and checks that the log's rows end
    /// where its head says.
    ///
    /// `local_lock`, if given, is a file locked first (exclusively, held
    /// while the log is open): the views a server keeps beside the log are
    /// its own, so a second server on the same directory is refused at
    /// once instead of waiting for the lease.
    pub fn open_postgres(
        target: &crate::postgres::PgTarget,
        opts: WalOptions,
        lease_wait: Option<Duration>,
        local_lock: Option<&Path>,
    ) -> Result<Opened> {
        if opts.max_commit_delay > MAX_COMMIT_DELAY {
            return Err(WalError::invalid(format!(
                "a commit delay of {:?} is over the {MAX_COMMIT_DELAY:?} limit",
                opts.max_commit_delay
            )));
        }
        let lock_file = match local_lock {
            Some(path) => Some(lock_exclusive(path)?),
            None => None,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let t = target.clone();
        let max_commit_delay = opts.max_commit_delay;
        let thread = thread::Builder::new()
            .name("sovra-wal-pg".into())
            .spawn(move || {
                let mut sink = match crate::postgres::PgSink::open(&t, lease_wait) {
                    Ok(sink) => sink,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let shared = Shared::new(
                    t.shown().to_owned(),
                    Backing::Postgres(Box::new(crate::postgres::PgShared::new(t.clone()))),
                    sink.end(),
                    max_commit_delay,
                );
                if ready_tx.send(Ok(shared.clone())).is_err() {
                    return;
                }
                commit_loop(&shared, &mut sink);
            })
            .map_err(|e| WalError::failed(format!("cannot start the log's commit thread: {e}")))?;
        let shared = match ready_rx.recv() {
            Ok(Ok(shared)) => shared,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(WalError::failed(
                    "the log's commit thread stopped while opening",
                ));
            }
        };
        Ok(Opened {
            wal: Wal {
                shared,
                thread: Some(thread),
                _lock: lock_file,
            },
            torn: None,
        })
    }

    /// Where the log is, for messages: its directory, or its database and
    /// schema (never a password).
    pub fn place(&self) -> &str {
        &self.shared.place
    }

    /// Whether the log is kept in PostgreSQL: it then holds every record
    /// from LSN 0 (nothing is retired), so a view that was lost can be
    /// built again from it.
    pub fn is_postgres(&self) -> bool {
        matches!(self.shared.backing, Backing::Postgres(_))
    }

    /// Stages a pad write for the next group (PostgreSQL only): the pad
    /// rows change in the same transaction as the group's frames, so a pad
    /// is durable with (or before) the first frame that depends on it, and
    /// an erased slot's row is deleted with its erasure. A pad staged after
    /// the last append waits for the next one.
    pub fn stage_pad(&self, slot: u64, pad: Option<zeroize::Zeroizing<[u8; 32]>>) -> Result<()> {
        if !self.is_postgres() {
            return Err(WalError::invalid(
                "pads are staged only in a log kept in PostgreSQL",
            ));
        }
        let mut p = lock(&self.shared.pending);
        if p.closing {
            return Err(WalError::failed("the log is closing"));
        }
        p.pads.push(PadWrite { slot, pad });
        Ok(())
    }

    /// Every pad row (PostgreSQL only), by slot; a row that is not 32
    /// bytes is damage, refused naming its slot.
    pub fn load_pads(&self) -> Result<Vec<(u64, zeroize::Zeroizing<[u8; 32]>)>> {
        match &self.shared.backing {
            Backing::Postgres(pg) => pg.load_pads(),
            Backing::Files { .. } => Err(WalError::invalid(
                "pads are kept in PostgreSQL only by a log kept there",
            )),
        }
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
    /// PostgreSQL: nothing to record (a group is one transaction, so
    /// there is never a torn tail to tell from damage).
    pub fn record_floor(&self, lsn: u64) -> Result<()> {
        let durable = self.durable_lsn()?;
        if lsn > durable {
            return Err(WalError::invalid(format!(
                "floor {lsn} is beyond the durable end {durable}"
            )));
        }
        let Backing::Files { dir, .. } = &self.shared.backing else {
            return Ok(());
        };
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

    /// The LSN of the oldest record still held (PostgreSQL: 0, nothing is
    /// retired).
    pub fn first_lsn(&self) -> u64 {
        match &self.shared.backing {
            Backing::Files { segments, .. } => lock(segments).first().map_or(0, |s| s.first),
            Backing::Postgres(_) => 0,
        }
    }

    /// Calls `f` with every durable record from `from` on, in order. Reads
    /// the segments again, so damage since open is caught (and refused)
    /// here too.
    pub fn replay(&self, from: u64, mut f: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        let end = self.durable_lsn()?;
        let (dir, segments) = match &self.shared.backing {
            Backing::Files { dir, segments, .. } => (dir, segments),
            Backing::Postgres(pg) => return pg.replay(from, end, &mut f),
        };
        let first = self.first_lsn();
        if from < first {
            return Err(WalError::corrupt(format!(
                "{}: records from LSN {from} are needed but the log starts at LSN {first}",
                dir.display()
            )));
        }
        let paths: Vec<(PathBuf, u64)> = lock(segments)
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
                dir.display()
            )));
        }
        Ok(end)
    }

    /// Deletes every segment whose records all lie below `lsn` (never the
    /// segment being written). Returns how many were deleted. PostgreSQL:
    /// none (the log there is what other servers and rebuilt views read).
    pub fn retire_below(&self, lsn: u64) -> Result<usize> {
        let Backing::Files { dir, segments, .. } = &self.shared.backing else {
            return Ok(0);
        };
        let mut segs = lock(segments);
        let mut n = 0;
        while segs.len() > 1 && segs.get(1).is_some_and(|s| s.first <= lsn) {
            let s = segs.remove(0);
            std::fs::remove_file(&s.path).map_err(|e| WalError::io(&s.path, "delete", &e))?;
            n += 1;
        }
        drop(segs);
        if n > 0 {
            sync_dir(dir)?;
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

/// Where the commit thread writes its groups.
pub(crate) trait Sink {
    /// Makes `group` (the encoded frames of LSNs `first..end`) and the
    /// staged `pads` durable, all or nothing as far as the caller can
    /// tell: an error fails the log.
    fn write(
        &mut self,
        s: &Shared,
        group: &[u8],
        first: u64,
        end: u64,
        pads: &mut Vec<PadWrite>,
    ) -> Result<()>;

    /// Runs after a group is durable and its waiters woken (a file log
    /// starts a new segment here); an error fails the log from here on.
    fn after(&mut self, _s: &Shared, _end: u64) -> Result<()> {
        Ok(())
    }
}

/// The segment being written.
struct FileSink {
    file: File,
    size: u64,
    allocated: u64,
}

impl Sink for FileSink {
    fn write(
        &mut self,
        s: &Shared,
        group: &[u8],
        _first: u64,
        _end: u64,
        _pads: &mut Vec<PadWrite>,
    ) -> Result<()> {
        let Backing::Files { segments, .. } = &s.backing else {
            return Err(WalError::failed("a file sink on a log kept elsewhere"));
        };
        let path = lock(segments)
            .last()
            .map(|x| x.path.clone())
            .unwrap_or_default();
        // INVARIANT: `size` is where the last frame ends; groups are
        // written there, over zeros written ahead, so a sync writes
        // the group and not the file's size (except when extending).
        self.allocated = preallocate(
            &self.file,
            &path,
            self.allocated,
            self.size + group.len() as u64,
        )?;
        self.file
            .write_all_at(group, self.size)
            .map_err(|e| WalError::io(&path, "write", &e))?;
        self.file
            .sync_data()
            .map_err(|e| WalError::io(&path, "fdatasync", &e))?;
        self.size += group.len() as u64;
        Ok(())
    }

    fn after(&mut self, s: &Shared, end: u64) -> Result<()> {
        let Backing::Files {
            dir,
            segments,
            segment_bytes,
        } = &s.backing
        else {
            return Ok(());
        };
        if self.size < *segment_bytes {
            return Ok(());
        }
        // The full segment keeps no preallocated tail (zeros would read
        // as a clean end anyway, so this need not be synced, and a
        // failure loses nothing: it is reported, not fatal).
        if let Err(e) = self.file.set_len(self.size) {
            let path = lock(segments).last().map(|x| x.path.clone());
            tracing::warn!(
                segment = %path.unwrap_or_default().display(),
                error = %e,
                "cannot cut a full write-ahead log segment to its last frame; its zeros stay"
            );
        }
        let seg = create_segment(dir, end)?;
        let f = open_segment(&seg.path)?;
        // INVARIANT: the new segment starts at `end`, and every record
        // below `end` is in the synced segment before it. Appends made
        // meanwhile are still pending, so they go to the new file.
        lock(segments).push(seg);
        self.file = f;
        self.size = SEGMENT_HEADER as u64;
        self.allocated = self.size;
        Ok(())
    }
}

impl Shared {
    fn new(place: String, backing: Backing, next: u64, max_commit_delay: Duration) -> Arc<Shared> {
        let (watch, _) = tokio::sync::watch::channel(next);
        Arc::new(Shared {
            place,
            backing,
            before_write: Mutex::new(None),
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                pads: Vec::new(),
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
            max_commit_delay,
        })
    }

    /// Fails the log: nothing more is accepted until a restart.
    fn fail(&self, e: &WalError, end: u64) {
        tracing::error!(error = %e, place = %self.place, "the write-ahead log failed; nothing more is accepted until a restart");
        lock(&self.durable).failed = Some(e.to_string());
        self.synced.notify_all();
        self.watch.send_replace(end);
    }
}

/// The group-commit thread: writes what is pending as one group (one
/// sync, or one transaction), then wakes the waiters.
fn commit_loop(s: &Shared, sink: &mut dyn Sink) {
    let mut buf = Vec::new();
    let mut pads = Vec::new();
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
            std::mem::swap(&mut pads, &mut p.pads);
            p.next
        };
        // Only this thread moves the durable LSN: the group starts there.
        let first = lock(&s.durable).lsn;
        let r = (|| -> Result<()> {
            if let Some(f) = lock(&s.before_write).as_ref() {
                f().map_err(|e| WalError::failed(format!("before writing a group: {e}")))?;
            }
            sink.write(s, &buf, first, end, &mut pads)
        })();
        buf.clear();
        pads.clear();
        if let Err(e) = r {
            s.fail(&e, end);
            return;
        }
        lock(&s.durable).lsn = end;
        s.synced.notify_all();
        s.watch.send_replace(end);
        if let Err(e) = sink.after(s, end) {
            s.fail(&e, end);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(working: usize, joined: usize, bytes: usize, closing: bool) -> Pending {
        Pending {
            buf: vec![0; bytes],
            pads: Vec::new(),
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
