//! The purge queue's local store: an append-only log of JSON lines in `<dir>/queue.log`.
//!
//! It is the whole store when there is no Redis, and the spill when Redis is configured but
//! unreachable. Every change is a line ([`LogLine`]): the item's new state, or "done". Enqueues
//! are fsynced before the facade acknowledges them; later transitions may lose a moment's worth
//! of writes in a crash, which replays an older state (an extra send, never a lost purge). The
//! log is replayed on open (a torn last line was never acknowledged and is dropped) and rewritten
//! with the live items when it has grown well past them, or emptied when nothing is live. The
//! directory belongs to one gateway process.

use super::Item;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Where an item is, as the log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogState {
    Queued,
    Dead,
}

/// One line of `queue.log`.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum LogLine {
    /// The item's current state (enqueue, retry, dead letter, revival).
    Put { state: LogState, item: Item },
    /// Delivered: forget it.
    Done { id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    InFlight,
    Dead,
}

#[derive(Debug)]
struct Entry {
    item: Item,
    state: State,
    /// Order of first enqueue (FIFO among items due at the same time).
    seq: u64,
}

/// Records written before a rewrite is considered, and how many times the live count they
/// must exceed.
const COMPACT_MIN_RECORDS: u64 = 1024;
const COMPACT_RATIO: u64 = 4;

/// `queue.log`: the records on disk and the state they add up to.
pub(super) struct FileLog {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Bytes of whole records in the file (a failed write is cut back to it).
    len: u64,
    records: u64,
    entries: HashMap<String, Entry>,
    seq: u64,
    /// Handed over to the process that took over the directory: no more writes.
    pub(super) handed_over: bool,
}

/// Appends one record to `buf` as the log writes it: a JSON object and a newline.
pub(crate) fn encode_line(buf: &mut Vec<u8>, record: &LogLine) -> io::Result<()> {
    serde_json::to_writer(&mut *buf, record)?;
    buf.push(b'\n');
    Ok(())
}

/// A line of the log: a record, or why it is not one (its 1-based line number and the error).
pub(crate) type Decoded = Result<LogLine, (usize, String)>;

/// The records in the bytes of a log, in order, with the length of the prefix they fill. Only
/// newline-terminated lines count (a torn last line was never acknowledged); blank lines are
/// skipped; a line that is not a record is an error naming its 1-based line number. Bytes, not
/// text: a line torn inside a character, or any damage, must not make the whole log unreadable.
pub(crate) fn decode_log(bytes: &[u8]) -> (Vec<Decoded>, usize) {
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let records = bytes[..whole]
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.trim_ascii().is_empty())
        .map(|(n, line)| serde_json::from_slice(line).map_err(|e| (n + 1, e.to_string())))
        .collect();
    (records, whole)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl FileLog {
    /// Syncs the file and stops writing to it (see `PurgeQueue::hand_over`).
    pub(super) fn hand_over(&mut self) {
        if let Err(e) = self.file.sync_all() {
            tracing::warn!("{}: sync before hand-over failed: {e}", self.path.display());
        }
        self.handed_over = true;
    }

    /// Opens (creating) `<dir>/queue.log`, replays it, drops a torn last line, and rewrites it
    /// with the live items only. Items that were in flight when the process stopped are queued.
    pub(super) fn open(dir: &Path) -> io::Result<FileLog> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("queue.log");
        let mut text = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut text)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut log = FileLog {
            dir: dir.to_path_buf(),
            path: path.clone(),
            file: OpenOptions::new().create(true).append(true).open(&path)?,
            len: 0,
            records: 0,
            entries: HashMap::new(),
            seq: 0,
            handed_over: false,
        };
        // Only newline-terminated records count: a torn tail was never acknowledged.
        let (records, whole) = decode_log(&text);
        if whole < text.len() {
            tracing::warn!(
                "{}: dropping a torn last record ({} bytes)",
                path.display(),
                text.len() - whole
            );
        }
        for record in records {
            match record {
                Ok(r) => log.apply(r),
                Err((n, e)) => tracing::warn!("{}:{n}: unreadable record: {e}", path.display()),
            }
            log.records += 1;
        }
        log.len = whole as u64;
        if whole < text.len() {
            log.file.set_len(log.len)?;
        }
        sync_dir(dir)?;
        if log.records > log.entries.len() as u64 {
            log.compact()?;
        }
        Ok(log)
    }

    fn apply(&mut self, r: LogLine) {
        match r {
            LogLine::Put { state, item } => {
                let state = match state {
                    LogState::Queued => State::Queued,
                    LogState::Dead => State::Dead,
                };
                let seq = match self.entries.get(&item.id) {
                    Some(e) => e.seq,
                    None => {
                        self.seq += 1;
                        self.seq
                    }
                };
                self.entries
                    .insert(item.id.clone(), Entry { item, state, seq });
            }
            LogLine::Done { id } => {
                self.entries.remove(&id);
            }
        }
    }

    /// Appends records (all or nothing: a failed write is cut back), optionally fsynced, then
    /// applies them. `Err`: nothing was recorded.
    fn append(&mut self, records: Vec<LogLine>, sync: bool) -> io::Result<()> {
        let mut buf = Vec::new();
        for r in &records {
            encode_line(&mut buf, r)?;
        }
        let written =
            self.file.write_all(&buf).and_then(
                |()| {
                    if sync {
                        self.file.sync_data()
                    } else {
                        Ok(())
                    }
                },
            );
        if let Err(e) = written {
            if let Err(e2) = self.file.set_len(self.len) {
                tracing::error!(
                    "{}: could not cut a failed write: {e2}",
                    self.path.display()
                );
            }
            return Err(e);
        }
        self.len += buf.len() as u64;
        self.records += records.len() as u64;
        for r in records {
            self.apply(r);
        }
        Ok(())
    }

    /// Records new items, fsynced; ids already in the log (a job enqueued twice) are left as
    /// they are.
    pub(super) fn enqueue(&mut self, items: Vec<Item>) -> io::Result<()> {
        let new: Vec<Item> = items
            .into_iter()
            .filter(|i| !self.entries.contains_key(&i.id))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        self.put(new, LogState::Queued, true)
    }

    pub(super) fn put(&mut self, items: Vec<Item>, state: LogState, sync: bool) -> io::Result<()> {
        let records = items
            .iter()
            .map(|item| LogLine::Put {
                state,
                item: item.clone(),
            })
            .collect();
        let r = self.append(records, sync);
        if r.is_err() {
            // Not recorded, but a claimed item must not get stuck in flight: keep the new
            // state in memory (a restart replays the older one: an extra send at worst).
            for item in items {
                if let Some(e) = self.entries.get_mut(&item.id) {
                    if e.state == State::InFlight {
                        e.state = match state {
                            LogState::Queued => State::Queued,
                            LogState::Dead => State::Dead,
                        };
                        e.item = item;
                    }
                }
            }
        }
        r
    }

    pub(super) fn done(&mut self, id: &str) -> io::Result<()> {
        let r = self.append(vec![LogLine::Done { id: id.to_string() }], false);
        // Delivered either way; an unrecorded completion means one extra send after a restart.
        self.entries.remove(id);
        self.maybe_compact();
        r
    }

    /// The queued items of `provider` due at `now`, oldest first: the first of all, then up to
    /// `limit(first)` in all of the same kind and softness (marked in flight); or the earliest
    /// `not_before_ms` among its queued items.
    pub(super) fn claim(
        &mut self,
        provider: &str,
        now: u64,
        limit: impl Fn(&Item) -> usize,
    ) -> Result<Vec<Item>, Option<u64>> {
        let mut due_now: Vec<(u64, u64, &String)> = Vec::new();
        let mut next: Option<u64> = None;
        for (id, e) in &self.entries {
            if e.state != State::Queued || e.item.provider != provider {
                continue;
            }
            let due = e.item.not_before_ms;
            if due > now {
                next = Some(next.map_or(due, |n| n.min(due)));
                continue;
            }
            due_now.push((due, e.seq, id));
        }
        if due_now.is_empty() {
            return Err(next);
        }
        due_now.sort_unstable();
        let first = &self.entries[due_now[0].2].item;
        let (kind, soft, most) = (first.batch.kind, first.batch.soft, limit(first).max(1));
        let ids: Vec<String> = due_now
            .iter()
            .map(|(_, _, id)| *id)
            .filter(|id| {
                let b = &self.entries[*id].item.batch;
                b.kind == kind && b.soft == soft
            })
            .take(most)
            .cloned()
            .collect();
        Ok(ids
            .iter()
            .map(|id| {
                let e = self.entries.get_mut(id).expect("claimed entry exists");
                e.state = State::InFlight;
                e.item.clone()
            })
            .collect())
    }

    /// Puts an item claimed but not sent back in the queue as it was (nothing to record: the
    /// log never says "in flight").
    pub(super) fn release(&mut self, id: &str) {
        if let Some(e) = self.entries.get_mut(id) {
            if e.state == State::InFlight {
                e.state = State::Queued;
            }
        }
    }

    /// (queued, in flight, dead) for `provider`.
    pub(super) fn counts(&self, provider: &str) -> (u64, u64, u64) {
        let mut c = (0, 0, 0);
        for e in self
            .entries
            .values()
            .filter(|e| e.item.provider == provider)
        {
            match e.state {
                State::Queued => c.0 += 1,
                State::InFlight => c.1 += 1,
                State::Dead => c.2 += 1,
            }
        }
        c
    }

    pub(super) fn dead(&self, provider: &str) -> Vec<Item> {
        let mut v: Vec<&Entry> = self
            .entries
            .values()
            .filter(|e| e.state == State::Dead && e.item.provider == provider)
            .collect();
        v.sort_by_key(|e| e.seq);
        v.into_iter().map(|e| e.item.clone()).collect()
    }

    pub(super) fn providers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries
            .values()
            .map(|e| e.item.provider.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn maybe_compact(&mut self) {
        let live = self.entries.len() as u64;
        let due = if live == 0 {
            self.records > 0
        } else {
            self.records >= COMPACT_MIN_RECORDS && self.records >= COMPACT_RATIO * live
        };
        if due {
            if let Err(e) = self.compact() {
                tracing::warn!("{}: compaction failed: {e}", self.path.display());
            }
        }
    }

    /// Empty when nothing is live; otherwise rewritten (temp file, fsync, rename) with one
    /// record per live item.
    fn compact(&mut self) -> io::Result<()> {
        if self.entries.is_empty() {
            self.file.set_len(0)?;
            self.file.sync_data()?;
            self.len = 0;
            self.records = 0;
            return Ok(());
        }
        let mut live: Vec<&Entry> = self.entries.values().collect();
        live.sort_by_key(|e| e.seq);
        let mut buf = Vec::new();
        for e in &live {
            let state = if e.state == State::Dead {
                LogState::Dead
            } else {
                LogState::Queued
            };
            encode_line(
                &mut buf,
                &LogLine::Put {
                    state,
                    item: e.item.clone(),
                },
            )?;
        }
        let tmp = self.dir.join("queue.log.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.len = buf.len() as u64;
        self.records = live.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::purge::{Batch, Kind};

    fn item(id: &str, provider: &str, not_before_ms: u64) -> Item {
        Item {
            id: id.into(),
            job: "job".into(),
            provider: provider.into(),
            batch: Batch {
                kind: Kind::Urls,
                items: vec![format!("https://example.com/{id}")],
                soft: false,
            },
            attempts: 0,
            not_before_ms,
            last_error: String::new(),
            created_ms: 1,
        }
    }

    fn lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("queue.log"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn log_replays_puts_and_dones_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = FileLog::open(dir.path()).unwrap();
            log.put(
                vec![item("a", "cf", 0), item("b", "cf", 0), item("c", "fa", 0)],
                LogState::Queued,
                true,
            )
            .unwrap();
            let claimed = log.claim("cf", 10, |_| 1).unwrap().remove(0);
            assert_eq!(claimed.id, "a", "FIFO among items due");
            let mut retried = claimed;
            retried.attempts = 1;
            retried.not_before_ms = 500;
            log.put(vec![retried], LogState::Queued, false).unwrap();
            let b = log.claim("cf", 10, |_| 1).unwrap().remove(0);
            assert_eq!(b.id, "b");
            log.put(vec![b], LogState::Dead, true).unwrap();
            assert_eq!(
                log.claim("cf", 10, |_| 1),
                Err(Some(500)),
                "a waits for its backoff"
            );
            log.done("c").unwrap();
        }
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(log.counts("cf"), (1, 0, 1));
        assert_eq!(log.counts("fa"), (0, 0, 0));
        assert_eq!(log.entries["a"].item.attempts, 1);
        assert_eq!(log.entries["a"].item.not_before_ms, 500);
        assert_eq!(log.dead("cf")[0].id, "b");
        assert_eq!(
            lines(dir.path()).len(),
            2,
            "compacted to the live items on open"
        );
    }

    #[test]
    fn in_flight_items_are_queued_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = FileLog::open(dir.path()).unwrap();
            log.put(vec![item("a", "cf", 0)], LogState::Queued, true)
                .unwrap();
            assert!(log.claim("cf", 1, |_| 1).is_ok());
            assert_eq!(log.counts("cf"), (0, 1, 0));
        }
        let mut log = FileLog::open(dir.path()).unwrap();
        assert_eq!(log.counts("cf"), (1, 0, 0));
        assert_eq!(log.claim("cf", 1, |_| 1).unwrap()[0].id, "a");
    }

    #[test]
    fn a_claim_takes_due_items_of_the_first_ones_kind_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileLog::open(dir.path()).unwrap();
        let mut tags = item("t", "cf", 0);
        tags.batch.kind = Kind::Tags;
        let mut soft = item("s", "cf", 0);
        soft.batch.soft = true;
        log.put(
            vec![
                item("a", "cf", 0),
                tags,
                soft,
                item("b", "cf", 0),
                item("later", "cf", 50),
                item("c", "cf", 0),
                item("other", "fa", 0),
            ],
            LogState::Queued,
            true,
        )
        .unwrap();
        let ids = |v: Vec<Item>| v.into_iter().map(|i| i.id).collect::<Vec<_>>();
        assert_eq!(ids(log.claim("cf", 10, |_| 2).unwrap()), ["a", "b"]);
        assert_eq!(
            ids(log.claim("cf", 10, |_| 100).unwrap()),
            ["t"],
            "the oldest first, then only its kind"
        );
        assert_eq!(ids(log.claim("cf", 10, |_| 100).unwrap()), ["s"]);
        assert_eq!(ids(log.claim("cf", 10, |_| 100).unwrap()), ["c"]);
        assert_eq!(log.claim("cf", 10, |_| 100), Err(Some(50)));
        log.release("c");
        assert_eq!(log.counts("cf"), (2, 4, 0), "released c waits again");
    }

    #[test]
    fn enqueueing_an_item_again_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileLog::open(dir.path()).unwrap();
        log.enqueue(vec![item("a", "cf", 0)]).unwrap();
        assert!(log.claim("cf", 1, |_| 1).is_ok());
        log.enqueue(vec![item("a", "cf", 0), item("b", "cf", 0)])
            .unwrap();
        assert_eq!(log.counts("cf"), (1, 1, 0), "a stays in flight, b is new");
        assert_eq!(lines(dir.path()).len(), 2);
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_later_appends_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = FileLog::open(dir.path()).unwrap();
            log.put(vec![item("a", "cf", 0)], LogState::Queued, true)
                .unwrap();
        }
        let path = dir.path().join("queue.log");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"op":"put","state":"queued","item":{"id":"tor"#)
            .unwrap();
        drop(f);
        {
            let mut log = FileLog::open(dir.path()).unwrap();
            assert_eq!(log.counts("cf"), (1, 0, 0));
            log.put(vec![item("b", "cf", 0)], LogState::Queued, true)
                .unwrap();
        }
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(log.counts("cf"), (2, 0, 0));
        for line in lines(dir.path()) {
            serde_json::from_str::<LogLine>(&line).expect("every line is a whole record");
        }
    }

    #[test]
    fn a_record_torn_inside_a_character_is_dropped_and_the_log_opens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = FileLog::open(dir.path()).unwrap();
            log.put(vec![item("a", "cf", 0)], LogState::Queued, true)
                .unwrap();
        }
        // A crash mid-write of a tag "café": the file ends inside the two bytes of 'é'. Read as
        // text, the whole log was refused (invalid UTF-8) and the queue could not start.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("queue.log"))
            .unwrap();
        f.write_all(b"{\"op\":\"put\",\"state\":\"queued\",\"item\":{\"id\":\"caf\xc3")
            .unwrap();
        drop(f);
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(log.counts("cf"), (1, 0, 0));
        // And a damaged whole line (not UTF-8) is skipped, not fatal.
        let (records, whole) = decode_log(b"\xff\xfe\n{\"op\":\"done\",\"id\":\"x\"}\n\n");
        assert_eq!(whole, 27);
        assert!(matches!(records[0], Err((1, _))));
        assert_eq!(records[1], Ok(LogLine::Done { id: "x".into() }));
        assert_eq!(records.len(), 2);
    }

    #[test]
    fn the_log_is_emptied_when_everything_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileLog::open(dir.path()).unwrap();
        log.put(
            vec![item("a", "cf", 0), item("b", "cf", 0)],
            LogState::Queued,
            true,
        )
        .unwrap();
        log.done("a").unwrap();
        assert_eq!(
            lines(dir.path()).len(),
            3,
            "b is still live: no compaction yet"
        );
        log.done("b").unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("queue.log"))
                .unwrap()
                .len(),
            0
        );
        log.put(vec![item("c", "cf", 0)], LogState::Queued, true)
            .unwrap();
        drop(log);
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(
            log.counts("cf"),
            (1, 0, 0),
            "appends after truncation are replayed"
        );
    }

    #[test]
    fn a_long_log_is_rewritten_with_the_live_items() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileLog::open(dir.path()).unwrap();
        log.put(vec![item("keep", "cf", 0)], LogState::Queued, true)
            .unwrap();
        for i in 0..COMPACT_MIN_RECORDS {
            let id = format!("t{i}");
            log.put(vec![item(&id, "cf", 0)], LogState::Queued, false)
                .unwrap();
            log.done(&id).unwrap();
        }
        assert!(
            log.records < COMPACT_MIN_RECORDS,
            "rewritten: {} records",
            log.records
        );
        drop(log);
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(log.counts("cf"), (1, 0, 0));
        assert!(log.entries.contains_key("keep"));
    }
}
