//! The log kept in PostgreSQL: one row per group commit, one sequencer at a
//! time.
//!
//! Tables, in the schema the operator names (created when missing):
//! - `log (first_lsn BIGINT PRIMARY KEY, end_lsn BIGINT, frames BYTEA)`:
//!   one row per group, holding the group's frames exactly as a segment
//!   file would (the format is in [`crate::frame`], CRC32C per frame).
//! - `head (end_lsn BIGINT, sequencer TEXT, since TIMESTAMPTZ)`: one row,
//!   the LSN after the last group and which process writes.
//! - `pads (slot BIGINT PRIMARY KEY, pad BYTEA)`: the vault's shred pads
//!   (see the vault's `crypto/shred.rs`), written in the same transaction
//!   as the group whose frames first depend on them.
//!
//! One group is one transaction: the staged pad rows, the head moved from
//! the group's first LSN to its end (`UPDATE … WHERE end_lsn = first`),
//! and the group's row. The commit returns once PostgreSQL has made the
//! transaction durable (its `synchronous_commit`; leave it `on`).
//!
//! The sequencer: the process that writes holds a session advisory lock
//! on its connection (the *lease*, keyed by the schema's name), taken
//! before anything is read. Another process opening the same schema waits
//! for it (a standby); when the holder dies its session ends, PostgreSQL
//! releases the lock, and the standby takes it, reads the head and goes
//! on from there.
//!
//! Guarantees:
//! - INVARIANT: a group is written only if the head still ends where this
//!   process last wrote it, in the same transaction that moves it. A
//!   writer that lost its lease without knowing it (a stalled process
//!   whose session was ended) is fenced: its next group fails, the log
//!   refuses everything after, and it never forks the sequence.
//! - LSNs are dense across every row, and replay checks it: a row that is
//!   missing, altered (a frame's CRC), or out of sequence refuses the
//!   replay naming the row; a head beyond the last row refuses the open.
//!
//! Not guaranteed: secrecy from the database's operator beyond what the
//! records are (sealed values, wrapped keys, keyed tokens, ledger entries:
//! the vault puts nothing else in them); that a deleted pad row is gone
//! from PostgreSQL's own history (dead tuples until vacuum, its WAL,
//! replicas and backups; SECURITY.md says what an erasure guarantees on
//! this backend); TLS to the database (connect over loopback or a UNIX
//! socket).

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls, Statement};
use zeroize::Zeroizing;

use crate::error::{Result, WalError};
use crate::frame;
use crate::log::{PadWrite, Shared, Sink};

/// Rows read per query when replaying.
const REPLAY_BATCH: i64 = 512;

/// The sequencer lease's advisory lock key: 64 bits from the schema's
/// name (two CRC32Cs under different prefixes), so that two schemas'
/// servers do not share a lease by accident.
fn lease_key(schema: &str) -> i64 {
    let hi = crc32c::crc32c_append(crc32c::crc32c(b"sovra-lease-1\0"), schema.as_bytes());
    let lo = crc32c::crc32c_append(crc32c::crc32c(b"sovra-lease-2\0"), schema.as_bytes());
    i64::from_be_bytes(((u64::from(hi) << 32) | u64::from(lo)).to_be_bytes())
}

/// A database and schema to keep the log in. The password is given apart
/// from the URL (from a file or the environment) and never shown.
#[derive(Clone)]
pub struct PgTarget {
    config: postgres::Config,
    schema: String,
    shown: String,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgTarget({})", self.shown)
    }
}

/// Whether `s` is a schema name this crate accepts: a lower-case SQL
/// identifier (so it is quoted nowhere and cannot inject).
pub fn valid_schema(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c == b'_')
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

impl PgTarget {
    /// A target from a `postgres://user@host:port/db` URL (or key=value
    /// string), the password, and the schema. A URL that carries a
    /// password is refused: it would end up in a configuration file.
    pub fn new(url: &str, password: Option<&str>, schema: &str) -> Result<PgTarget> {
        let mut config: postgres::Config = url.parse().map_err(|e| {
            WalError::invalid(format!(
                "the PostgreSQL URL is not valid ({e}); expected postgres://USER@HOST:PORT/DATABASE"
            ))
        })?;
        if config.get_password().is_some() {
            return Err(WalError::invalid(
                "the PostgreSQL URL holds a password: give it in a password file or the environment instead",
            ));
        }
        if !valid_schema(schema) {
            return Err(WalError::invalid(format!(
                "schema {schema:?} is not a lower-case SQL identifier (a-z, 0-9, _; at most 63)"
            )));
        }
        if let Some(p) = password {
            config.password(p);
        }
        config.application_name("sovra");
        // `CREATE … IF NOT EXISTS` notices are not news; the operator's
        // own options stay.
        let options = match config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} -c client_min_messages=warning"),
            _ => "-c client_min_messages=warning".to_owned(),
        };
        config.options(&options);
        // A dead database is noticed by the client too (a dead client is
        // noticed by the server's own `tcp_keepalives_*`: docs/postgres.md).
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.connect_timeout(Duration::from_secs(10));
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                postgres::config::Host::Tcp(h) => h.clone(),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
        let shown = format!(
            "postgresql://{}@{}:{}/{} schema {schema}",
            config.get_user().unwrap_or(""),
            hosts.join(","),
            ports.join(","),
            config.get_dbname().unwrap_or("")
        );
        Ok(PgTarget {
            config,
            schema: schema.to_owned(),
            shown,
        })
    }

    /// The target for messages (no password).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// A new connection.
    pub fn connect(&self) -> Result<Client> {
        self.config.connect(NoTls).map_err(|e| {
            WalError::failed(format!("{}: cannot connect: {}", self.shown, pg_text(&e)))
        })
    }

    fn err(&self, what: &str, e: &postgres::Error) -> WalError {
        WalError::failed(format!("{}: {what}: {}", self.shown, pg_text(e)))
    }
}

/// An error's text with PostgreSQL's own message when it sent one.
fn pg_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

/// Runs `f` on a thread of its own (the `postgres` client runs its own
/// runtime, which may not start inside a caller's tokio runtime).
fn on_thread<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    thread::Builder::new()
        .name("sovra-wal-pg-read".into())
        .spawn(f)
        .map_err(|e| WalError::failed(format!("cannot start a database reader: {e}")))?
        .join()
        .map_err(|_| WalError::failed("a database reader stopped unexpectedly"))?
}

/// The PostgreSQL part of a log's shared state: what readers need.
pub(crate) struct PgShared {
    target: PgTarget,
}

impl PgShared {
    pub(crate) fn new(target: PgTarget) -> PgShared {
        PgShared { target }
    }

    /// Every pad row, by slot.
    pub(crate) fn load_pads(&self) -> Result<Vec<(u64, Zeroizing<[u8; 32]>)>> {
        let t = self.target.clone();
        on_thread(move || {
            let mut c = t.connect()?;
            let rows = c
                .query(
                    &format!("SELECT slot, pad FROM {}.pads ORDER BY slot", t.schema),
                    &[],
                )
                .map_err(|e| t.err("read the pads", &e))?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let slot: i64 = r.get(0);
                let pad: &[u8] = r.get(1);
                let (Ok(slot), Ok(pad)) = (u64::try_from(slot), <[u8; 32]>::try_from(pad)) else {
                    return Err(WalError::corrupt(format!(
                        "{}: pads row {slot} is damaged (a slot of 32 bytes expected)",
                        t.shown
                    )));
                };
                out.push((slot, Zeroizing::new(pad)));
            }
            Ok(out)
        })
    }

    /// Calls `f` with every record from `from` up to `end`, in order; the
    /// rows are read by a thread of their own, a batch at a time.
    pub(crate) fn replay(
        &self,
        from: u64,
        end: u64,
        f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        if from >= end {
            return Ok(end);
        }
        let t = self.target.clone();
        let shown = t.shown.clone();
        let (tx, rx) = mpsc::sync_channel::<Result<Vec<(i64, i64, Vec<u8>)>>>(2);
        let reader = thread::Builder::new()
            .name("sovra-wal-pg-replay".into())
            .spawn(move || {
                let r = (|| -> Result<()> {
                    let mut c = t.connect()?;
                    let q = c
                        .prepare(&format!(
                            "SELECT first_lsn, end_lsn, frames FROM {}.log \
                             WHERE end_lsn > $1 AND first_lsn < $2 ORDER BY first_lsn LIMIT $3",
                            t.schema
                        ))
                        .map_err(|e| t.err("read the log", &e))?;
                    let mut cursor = i64::try_from(from).unwrap_or(i64::MAX);
                    let stop = i64::try_from(end).unwrap_or(i64::MAX);
                    loop {
                        let rows = c
                            .query(&q, &[&cursor, &stop, &REPLAY_BATCH])
                            .map_err(|e| t.err("read the log", &e))?;
                        let n = rows.len();
                        let batch: Vec<(i64, i64, Vec<u8>)> = rows
                            .iter()
                            .map(|r| (r.get(0), r.get(1), r.get(2)))
                            .collect();
                        if let Some(last) = batch.last() {
                            cursor = last.1;
                        }
                        if tx.send(Ok(batch)).is_err() || (n as i64) < REPLAY_BATCH {
                            return Ok(());
                        }
                    }
                })();
                if let Err(e) = r {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|e| WalError::failed(format!("cannot start the log reader: {e}")))?;
        let mut seen: Option<u64> = None;
        let mut result = Ok(());
        'rows: for batch in &rx {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            for (first, row_end, frames) in batch {
                if let Err(e) = apply_row(&shown, from, end, &mut seen, first, row_end, &frames, f)
                {
                    result = Err(e);
                    break 'rows;
                }
            }
        }
        drop(rx);
        let _ = reader.join();
        result?;
        match seen {
            Some(s) if s >= end => Ok(end),
            Some(s) => Err(WalError::corrupt(format!(
                "{shown}: durable records {s}..{end} are missing from the log table"
            ))),
            None => Err(WalError::corrupt(format!(
                "{shown}: durable records {from}..{end} are missing from the log table"
            ))),
        }
    }
}

/// Checks one `log` row against the sequence and calls `f` with its
/// records from `from` on.
#[allow(clippy::too_many_arguments)]
fn apply_row(
    shown: &str,
    from: u64,
    end: u64,
    seen: &mut Option<u64>,
    first: i64,
    row_end: i64,
    frames: &[u8],
    f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let row = format!("{shown}: log row {first}");
    let (Ok(first), Ok(row_end)) = (u64::try_from(first), u64::try_from(row_end)) else {
        return Err(WalError::corrupt(format!("{row}: negative LSNs")));
    };
    match *seen {
        None if first > from => {
            return Err(WalError::corrupt(format!(
                "{shown}: records {from}..{first} are missing from the log table (deleted rows?)"
            )))
        }
        Some(s) if s != first => {
            return Err(WalError::corrupt(format!(
                "{row}: starts at LSN {first} but the row before ends at {s}: the rows between were deleted or altered"
            )))
        }
        _ => {}
    }
    let mut at = 0usize;
    let mut lsn = first;
    while at < frames.len() {
        let fr = frame::decode_frame(&frames[at..], at as u64, Some(lsn))
            .map_err(|why| WalError::corrupt(format!("{row}: byte {at}: {why}")))?;
        for (j, r) in fr.records.iter().enumerate() {
            let l = lsn + j as u64;
            if l >= from && l < end {
                f(l, r)?;
            }
        }
        lsn += fr.records.len() as u64;
        at += usize::try_from(fr.len).unwrap_or(usize::MAX);
    }
    if lsn != row_end {
        return Err(WalError::corrupt(format!(
            "{row}: its frames end at LSN {lsn}, the row says {row_end}"
        )));
    }
    *seen = Some(row_end);
    Ok(())
}

/// The commit thread's connection, holding the lease.
pub(crate) struct PgSink {
    target: PgTarget,
    /// `None` once a group failed: the connection, and with it the lease,
    /// is given up, so a standby can take over.
    client: Option<Client>,
    end: u64,
    insert: Statement,
    advance: Statement,
    put_pad: Statement,
    del_pad: Statement,
}

impl PgSink {
    /// Connects, takes the lease (waiting at most `lease_wait`, or without
    /// end), makes the tables a new schema lacks and reads the head.
    pub(crate) fn open(t: &PgTarget, lease_wait: Option<Duration>) -> Result<PgSink> {
        let mut client = t.connect()?;
        let sync: String = client
            .query_one("SHOW synchronous_commit", &[])
            .map_err(|e| t.err("read synchronous_commit", &e))?
            .get(0);
        if sync == "off" {
            // INVARIANT: a commit returns only once durable, or an
            // acknowledged write could be lost with the database.
            return Err(WalError::invalid(format!(
                "{}: synchronous_commit is off for this role or database: a commit would return before it is durable; set it to on",
                t.shown
            )));
        }
        let key = lease_key(&t.schema);
        let started = Instant::now();
        let mut told = false;
        loop {
            let got: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .map_err(|e| t.err("take the sequencer lease", &e))?
                .get(0);
            if got {
                break;
            }
            if lease_wait.is_some_and(|w| started.elapsed() >= w) {
                return Err(WalError::failed(format!(
                    "{}: another Sovra server holds the sequencer lease of this schema (gave up after {:?})",
                    t.shown,
                    started.elapsed()
                )));
            }
            if !told {
                tracing::warn!(target = %t.shown, "another Sovra server holds the sequencer lease; waiting as a standby");
                told = true;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if told {
            tracing::warn!(target = %t.shown, waited_ms = started.elapsed().as_millis() as u64, "took the sequencer lease");
        }
        let s = &t.schema;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {s};
                 CREATE TABLE IF NOT EXISTS {s}.log (
                     first_lsn BIGINT PRIMARY KEY,
                     end_lsn BIGINT NOT NULL,
                     frames BYTEA NOT NULL);
                 CREATE TABLE IF NOT EXISTS {s}.head (
                     one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
                     end_lsn BIGINT NOT NULL,
                     sequencer TEXT NOT NULL,
                     since TIMESTAMPTZ NOT NULL);
                 CREATE TABLE IF NOT EXISTS {s}.pads (
                     slot BIGINT PRIMARY KEY,
                     pad BYTEA NOT NULL);
                 INSERT INTO {s}.head VALUES (TRUE, 0, '', now()) ON CONFLICT DO NOTHING;"
            ))
            .map_err(|e| t.err("create the log's tables", &e))?;
        let row = client
            .query_one(
                &format!("SELECT h.end_lsn, (SELECT max(end_lsn) FROM {s}.log) FROM {s}.head h"),
                &[],
            )
            .map_err(|e| t.err("read the log's head", &e))?;
        let head: i64 = row.get(0);
        let last: Option<i64> = row.get(1);
        if last.unwrap_or(0) != head {
            return Err(WalError::corrupt(format!(
                "{}: the head says the log ends at LSN {head} but its last row ends at {}: rows were deleted or restored from an older copy",
                t.shown,
                last.unwrap_or(0)
            )));
        }
        let end = u64::try_from(head)
            .map_err(|_| WalError::corrupt(format!("{}: the head is negative", t.shown)))?;
        let me = format!(
            "pid {} on {}",
            std::process::id(),
            std::env::var("HOSTNAME").unwrap_or_else(|_| "?".into())
        );
        client
            .execute(
                &format!("UPDATE {s}.head SET sequencer = $1, since = now()"),
                &[&me],
            )
            .map_err(|e| t.err("record the sequencer", &e))?;
        let prep = |c: &mut Client, q: String| {
            c.prepare(&q)
                .map_err(|e| t.err("prepare the log's statements", &e))
        };
        let insert = prep(
            &mut client,
            format!("INSERT INTO {s}.log (first_lsn, end_lsn, frames) VALUES ($1, $2, $3)"),
        )?;
        let advance = prep(
            &mut client,
            format!("UPDATE {s}.head SET end_lsn = $2 WHERE end_lsn = $1"),
        )?;
        let put_pad = prep(
            &mut client,
            format!(
                "INSERT INTO {s}.pads (slot, pad) VALUES ($1, $2) \
                 ON CONFLICT (slot) DO UPDATE SET pad = EXCLUDED.pad"
            ),
        )?;
        let del_pad = prep(&mut client, format!("DELETE FROM {s}.pads WHERE slot = $1"))?;
        Ok(PgSink {
            target: t.clone(),
            client: Some(client),
            end,
            insert,
            advance,
            put_pad,
            del_pad,
        })
    }

    /// The LSN after the last group.
    pub(crate) fn end(&self) -> u64 {
        self.end
    }
}

impl Sink for PgSink {
    fn write(
        &mut self,
        _s: &Shared,
        group: &[u8],
        first: u64,
        end: u64,
        pads: &mut Vec<PadWrite>,
    ) -> Result<()> {
        let r = self.write_group(group, first, end, pads);
        if r.is_err() {
            // The log accepts nothing more after a failed group; closing
            // the session releases the lease at once, so a standby takes
            // over instead of waiting for this process to exit.
            self.client = None;
        }
        r
    }
}

impl PgSink {
    fn write_group(
        &mut self,
        group: &[u8],
        first: u64,
        end: u64,
        pads: &mut Vec<PadWrite>,
    ) -> Result<()> {
        if first != self.end {
            return Err(WalError::failed(format!(
                "{}: a group from LSN {first}, but the log ends at {}",
                self.target.shown, self.end
            )));
        }
        let t = &self.target;
        let (Ok(first_i), Ok(end_i)) = (i64::try_from(first), i64::try_from(end)) else {
            return Err(WalError::failed("an LSN beyond PostgreSQL's BIGINT"));
        };
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| WalError::failed(format!("{}: the log failed earlier", t.shown)))?;
        let mut tx = client
            .transaction()
            .map_err(|e| t.err("begin a group", &e))?;
        for p in pads.drain(..) {
            let slot = i64::try_from(p.slot)
                .map_err(|_| WalError::failed("a pad slot beyond PostgreSQL's BIGINT"))?;
            match &p.pad {
                Some(pad) => tx.execute(&self.put_pad, &[&slot, &&pad[..]]),
                None => tx.execute(&self.del_pad, &[&slot]),
            }
            .map_err(|e| t.err("write a pad", &e))?;
        }
        let moved = tx
            .execute(&self.advance, &[&first_i, &end_i])
            .map_err(|e| t.err("move the head", &e))?;
        if moved != 1 {
            // INVARIANT: fenced; see the module docs.
            return Err(WalError::failed(format!(
                "{}: the log's head no longer ends at LSN {first}: another server wrote it (this one lost the sequencer lease); this server accepts no more writes",
                t.shown
            )));
        }
        tx.execute(&self.insert, &[&first_i, &end_i, &group])
            .map_err(|e| t.err("write a group", &e))?;
        tx.commit().map_err(|e| t.err("commit a group", &e))?;
        self.end = end;
        Ok(())
    }
}
