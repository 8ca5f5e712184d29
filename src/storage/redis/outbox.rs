//! The fleet outbox: invalidation writes Redis did not take yet, kept until it does.
//!
//! A purge is applied locally at once, then told to the fleet through Redis: its epoch saved in
//! the epochs hash, a URI's stored variants deleted, a broadcast published. When Redis is hung
//! or down those writes fail, and without a record nobody would ever send them again: other
//! instances would keep serving what was purged, and a Redis restarted from its append-only file
//! would hand the purged copies back. So each failed write becomes an [`Op`] here, in order, and
//! a background relay ([`crate::invalidation::relay`]) re-applies them once Redis answers, with
//! their ORIGINAL times (a late epoch must not cover entries filled after the purge).
//!
//! The ops live in memory and, when a directory is given (the purge queue's `[purge] dir`), in
//! an append-only file `fleet-outbox.log` (`+<id> <op>` / `-<id>` lines), so a gateway restarted
//! before Redis came back still tells the fleet. Lines are written as the op is recorded
//! (a killed process loses nothing) and fsynced by the relay's next pass (a host crash may lose
//! the last moment's). The file is emptied whenever the outbox drains and rewritten when it has
//! grown well past what is live. The outbox is bounded ([`MAX_OPS`], [`MAX_BYTES`]): when full,
//! a new op is dropped, logged as an error and counted, and the invalidation that needed it
//! answers `"fleet": "lost"`: it can no longer promise every instance will learn of it.

use super::Message;
use crate::metrics::fleet_metrics;
use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Most ops kept.
pub const MAX_OPS: usize = 100_000;
/// Most bytes of ops kept (their file form).
pub const MAX_BYTES: usize = 16 << 20;
/// The file is rewritten with the live ops once it is this large and four times what is live.
const REWRITE_AT: u64 = 4 << 20;
const FILE: &str = "fleet-outbox.log";

/// One write to Redis that tells the fleet about an invalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Save a purge epoch in the fleet's epochs hash (`t:<tag>`, `p:<prefix>`, `u:<uri hex>`).
    Epoch {
        field: String,
        at_ms: u64,
        soft: bool,
    },
    /// Delete every stored variant of a URI.
    DeleteUri(u64),
    /// Broadcast `msg`, first sent (and so dated) at `sent_ms`.
    Publish { sent_ms: u64, msg: Message },
}

impl Op {
    /// `e <at> <0|1> <field>` / `d <uri hex>` / `m <sent> <message body>`.
    fn encode(&self) -> String {
        match self {
            Op::Epoch { field, at_ms, soft } => format!("e {at_ms} {} {field}", u8::from(*soft)),
            Op::DeleteUri(u) => format!("d {u:016x}"),
            Op::Publish { sent_ms, msg } => format!("m {sent_ms} {}", msg.body()),
        }
    }

    fn decode(s: &str) -> Option<Op> {
        let (kind, rest) = s.split_once(' ')?;
        match kind {
            "e" => {
                let mut p = rest.splitn(3, ' ');
                let at_ms = p.next()?.parse().ok()?;
                let soft = match p.next()? {
                    "0" => false,
                    "1" => true,
                    _ => return None,
                };
                let field = p.next().filter(|f| !f.is_empty())?.to_string();
                Some(Op::Epoch { field, at_ms, soft })
            }
            "d" => Some(Op::DeleteUri(u64::from_str_radix(rest, 16).ok()?)),
            "m" => {
                let (sent, body) = rest.split_once(' ')?;
                Some(Op::Publish {
                    sent_ms: sent.parse().ok()?,
                    msg: Message::parse_body(body)?,
                })
            }
            _ => None,
        }
    }
}

/// What the fleet knows of an invalidation (the `fleet` field of a purge's 202 answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Told {
    /// Redis took every write: every subscribed instance has been told.
    Told,
    /// Some writes wait in the outbox; they are re-sent when Redis answers.
    Pending,
    /// The outbox was full and a write was dropped: some instances may never learn of it.
    Lost,
}

impl Told {
    pub fn as_str(self) -> &'static str {
        match self {
            Told::Told => "told",
            Told::Pending => "pending",
            Told::Lost => "lost",
        }
    }
}

struct Log {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    written: u64,
    /// Written since the last fsync.
    dirty: bool,
}

#[derive(Default)]
struct Inner {
    /// (id, op, its encoded line's length), oldest first.
    ops: VecDeque<(u64, Op, usize)>,
    next_id: u64,
    bytes: usize,
    /// The id the last dropped op would have had.
    last_lost: Option<u64>,
    log: Option<Log>,
}

/// Invalidation writes waiting for Redis.
#[derive(Default)]
pub struct Outbox {
    inner: Mutex<Inner>,
}

impl Outbox {
    /// An outbox in memory only (tests; a gateway gives it a directory with [`Self::open`]).
    pub fn memory() -> Outbox {
        Outbox::default()
    }

    /// Opens (creating) `<dir>/fleet-outbox.log` and takes back the ops a previous process left
    /// in it (an unreadable line, such as a torn last one, is skipped with a warning).
    pub fn open(dir: &Path) -> io::Result<Outbox> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE);
        let text = match std::fs::read(&path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut live = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let parsed = if let Some(rest) = line.strip_prefix('+') {
                rest.split_once(' ')
                    .and_then(|(id, op)| Some((id.parse::<u64>().ok()?, Some(Op::decode(op)?))))
            } else {
                line.strip_prefix('-')
                    .and_then(|id| Some((id.parse::<u64>().ok()?, None)))
            };
            match parsed {
                Some((id, Some(op))) => {
                    live.insert(id, op);
                }
                Some((id, None)) => {
                    live.remove(&id);
                }
                None => tracing::warn!(
                    "{}:{}: skipping an unreadable fleet outbox line",
                    path.display(),
                    n + 1
                ),
            }
        }
        let mut inner = Inner {
            next_id: live.keys().next_back().map_or(0, |id| id + 1),
            ..Inner::default()
        };
        for (id, op) in live {
            let len = op.encode().len();
            inner.bytes += len;
            inner.ops.push_back((id, op, len));
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        inner.log = Some(Log {
            path,
            file,
            written: 0,
            dirty: false,
        });
        rewrite(&mut inner)?;
        if !inner.ops.is_empty() {
            tracing::warn!(
                "{} invalidation writes from before the restart wait for Redis; they will be re-sent",
                inner.ops.len()
            );
        }
        fleet_metrics().pending.set(inner.ops.len() as i64);
        Ok(Outbox {
            inner: Mutex::new(inner),
        })
    }

    /// The id the next op will get: [`Self::since`] tells what became of the ops recorded
    /// from here on.
    pub fn mark(&self) -> u64 {
        self.inner.lock().next_id
    }

    /// Whether every op recorded since `mark` has reached Redis.
    pub fn since(&self, mark: u64) -> Told {
        let inner = self.inner.lock();
        if inner.last_lost.is_some_and(|id| id >= mark) {
            Told::Lost
        } else if inner.ops.back().is_some_and(|(id, _, _)| *id >= mark) {
            Told::Pending
        } else {
            Told::Told
        }
    }

    /// Records an op Redis did not take. `false`: the outbox is full and it was dropped.
    pub fn push(&self, op: Op) -> bool {
        let line = op.encode();
        let mut inner = self.inner.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        if inner.ops.len() >= MAX_OPS || inner.bytes + line.len() > MAX_BYTES {
            if inner.last_lost.is_none_or(|l| l + 1 < id) {
                // Once per run of drops, not once per op.
                tracing::error!(
                    "the fleet outbox is full ({} writes, {} bytes waiting for Redis): dropping \
                     invalidation writes, so other instances may keep serving purged answers \
                     until they expire; bring Redis back, then purge again what was purged \
                     meanwhile",
                    inner.ops.len(),
                    inner.bytes
                );
            }
            inner.last_lost = Some(id);
            fleet_metrics().dropped.inc();
            return false;
        }
        if line.contains(['\n', '\r']) {
            tracing::warn!("an invalidation write with a line break is kept in memory only");
        } else if let Some(log) = inner.log.as_mut() {
            let text = format!("+{id} {line}\n");
            append(log, &text);
        }
        inner.bytes += line.len();
        inner.ops.push_back((id, op, line.len()));
        fleet_metrics().pending.set(inner.ops.len() as i64);
        true
    }

    /// The oldest op waiting, with its id.
    pub fn front(&self) -> Option<(u64, Op)> {
        self.inner
            .lock()
            .ops
            .front()
            .map(|(id, op, _)| (*id, op.clone()))
    }

    /// Every op waiting (oldest first).
    pub fn ops(&self) -> Vec<Op> {
        self.inner
            .lock()
            .ops
            .iter()
            .map(|(_, op, _)| op.clone())
            .collect()
    }

    /// How many ops wait.
    pub fn len(&self) -> usize {
        self.inner.lock().ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets op `id`: Redis took it.
    pub fn done(&self, id: u64) {
        let mut inner = self.inner.lock();
        let Some(pos) = inner.ops.iter().position(|(i, _, _)| *i == id) else {
            return;
        };
        if let Some((_, _, len)) = inner.ops.remove(pos) {
            inner.bytes -= len;
        }
        fleet_metrics().pending.set(inner.ops.len() as i64);
        let empty = inner.ops.is_empty();
        let bytes = inner.bytes as u64;
        let Some(log) = inner.log.as_mut() else {
            return;
        };
        if empty || (log.written >= REWRITE_AT && log.written > 4 * bytes) {
            if let Err(e) = rewrite(&mut inner) {
                tracing::warn!("cannot rewrite the fleet outbox: {e}");
            }
        } else {
            append(log, &format!("-{id}\n"));
        }
    }

    /// Syncs the file and stops writing to it, for the process taking over the directory (a
    /// graceful upgrade): it reads every op written so far. Ops still pending here stay in
    /// memory and are retried until this process exits; the new one retries them too (each op
    /// is idempotent: an epoch only moves forward, a delete of a deleted key is a no-op, a
    /// broadcast applied twice purges the same entries).
    pub fn hand_over(&self) {
        self.sync();
        self.inner.lock().log = None;
    }

    /// Flushes what was written to disk (the relay calls it on every pass).
    pub fn sync(&self) {
        let mut inner = self.inner.lock();
        if let Some(log) = inner.log.as_mut().filter(|l| l.dirty) {
            if let Err(e) = log.file.sync_data() {
                tracing::warn!("cannot sync {}: {e}", log.path.display());
            }
            log.dirty = false;
        }
    }
}

fn append(log: &mut Log, text: &str) {
    match log.file.write_all(text.as_bytes()) {
        Ok(()) => {
            log.written += text.len() as u64;
            log.dirty = true;
        }
        Err(e) => tracing::error!(
            "cannot write {}: {e}; invalidations waiting for Redis would not survive a restart: \
             check the disk under [purge] dir",
            log.path.display()
        ),
    }
}

/// Replaces the file with the live ops (written aside, fsynced, renamed over it).
fn rewrite(inner: &mut Inner) -> io::Result<()> {
    let Some(log) = inner.log.as_mut() else {
        return Ok(());
    };
    let mut text = String::new();
    for (id, op, _) in &inner.ops {
        let line = op.encode();
        if !line.contains(['\n', '\r']) {
            text.push_str(&format!("+{id} {line}\n"));
        }
    }
    let tmp = log.path.with_extension("log.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &log.path)?;
    if let Some(dir) = log.path.parent() {
        File::open(dir)?.sync_all()?;
    }
    log.file = OpenOptions::new().append(true).open(&log.path)?;
    log.written = text.len() as u64;
    log.dirty = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Vec<Op> {
        vec![
            Op::Epoch {
                field: "t:vendor:v 1".into(),
                at_ms: 1_700_000_000_123,
                soft: true,
            },
            Op::DeleteUri(0xdead_beef),
            Op::Publish {
                sent_ms: 1_700_000_000_124,
                msg: Message::Uri(0xdead_beef),
            },
            Op::Publish {
                sent_ms: 5,
                msg: Message::Prefix {
                    prefix: "h.example/api/".into(),
                    at_ms: 4,
                    soft: false,
                },
            },
        ]
    }

    #[test]
    fn ops_round_trip() {
        for op in ops() {
            assert_eq!(Op::decode(&op.encode()), Some(op.clone()), "{op:?}");
        }
        assert_eq!(Op::decode("e 1 2 t:x"), None);
        assert_eq!(Op::decode("z 1"), None);
        assert_eq!(Op::decode("m 1 x"), None);
    }

    /// A restart takes back what had not reached Redis, in order, and nothing that had.
    #[test]
    fn a_restart_replays_what_waits() {
        let dir = tempfile::tempdir().unwrap();
        let all = ops();
        {
            let o = Outbox::open(dir.path()).unwrap();
            let mark = o.mark();
            for op in &all {
                assert!(o.push(op.clone()));
            }
            assert_eq!(o.since(mark), Told::Pending);
            let (first, _) = o.front().unwrap();
            o.done(first);
            o.sync();
        }
        // A torn last line (a crash mid-write) is skipped.
        let path = dir.path().join(FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"+99 e 12").unwrap();
        drop(f);
        let o = Outbox::open(dir.path()).unwrap();
        assert_eq!(o.ops(), all[1..].to_vec());
        let mark = o.mark();
        assert!(mark >= 4, "new ids follow the old ones: {mark}");
        while let Some((id, _)) = o.front() {
            o.done(id);
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "emptied");
        assert_eq!(Outbox::open(dir.path()).unwrap().len(), 0);
    }

    /// Bounded: a full outbox drops the op and says so for the invalidations that lost one.
    #[test]
    fn a_full_outbox_drops_and_says_so() {
        let o = Outbox::memory();
        let before = o.mark();
        let big = "x".repeat(1 << 20);
        let mut kept = 0;
        for _ in 0..MAX_BYTES / (1 << 20) + 2 {
            if o.push(Op::Epoch {
                field: big.clone(),
                at_ms: 1,
                soft: false,
            }) {
                kept += 1;
            }
        }
        assert!(kept < MAX_BYTES / (1 << 20) + 2);
        assert_eq!(o.len(), kept);
        assert_eq!(o.since(before), Told::Lost);
        let later = o.mark();
        while let Some((id, _)) = o.front() {
            o.done(id);
        }
        assert_eq!(o.since(later), Told::Told);
        assert!(o.push(Op::DeleteUri(1)), "room again");
        assert_eq!(o.since(later), Told::Pending);
    }
}
