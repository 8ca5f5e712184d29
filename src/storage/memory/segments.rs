//! Segments: a store of records packed back to back in large buffers, evicted a buffer at a
//! time. The memory tier's entries live in it (issue 16: at most 300 B an entry beyond body and
//! header at a million entries; the `Arc<Entry>` store it replaced cost 480 B, this one 268 B,
//! `benches/memory_scale.rs`). The store knows records only by id and URI id; how an entry is
//! laid out in one is `layout.rs`'s business.
//!
//! Why this shape. Every allocation an entry makes costs its size-class rounding, plus the
//! counts of whatever shares it, and each piece of today's entry sits near the top of its class
//! (README "Stop 36"). Here an entry is one *record*: bytes the caller lays out, appended to the
//! open segment of its priority class. A segment is a `BytesMut` from which each record is split
//! off as a frozen `Bytes`, so a record costs its own bytes and nothing more, a reader holds a
//! `Bytes` slice of it (a reference count on the segment, no allocation), and a segment's memory
//! goes back to the allocator when its last record and its last reader let go. No unsafe code:
//! `bytes` does the sharing.
//!
//! Eviction takes whole segments, oldest first in the lowest non-empty class (Segcache's FIFO
//! segments, NSDI '21), so the budget counts whole segments and nothing is freed piecemeal
//! behind its back. Within a class, S3-FIFO's three queues (SOSP '23): a new record goes to a
//! small *probation* queue (a fifth of the budget, at least two segments), which is evicted
//! first while it holds more than that; a record hit on probation is copied to the *main*
//! queue when its segment goes, one never hit is dropped and its id remembered by a *ghost*
//! table, and an id the ghost remembers (or one replacing a stored record) goes straight to
//! the main queue when stored again. So a burst of one-hit wonders passes through probation
//! without evicting what is asked for again: on the replay trace this took the hit ratio at
//! the smallest budget from 2.4 points under an LRU's to 9 above (`benches/hit_ratio.rs`).
//! In the main queue a record hit since it was written gets a second chance: it is copied to
//! an open segment rather than dropped (CLOCK's rule, which is how a FIFO keeps the hot set an
//! LRU keeps). Copies take at most four segments' bytes per insert, so that every insert ends.
//! A queue appends to two open segments, so that later small records fill what a large one
//! could not.
//!
//! Finding a record: each shard has a slab of slots (the record's `Bytes`, its segment, its hit
//! bit), a table of slot numbers by id and one by URI id (4-byte slots), searched under the
//! shard's lock. A segment lists the slots its records were put in (8 bytes a record), so its
//! eviction unlinks them without a scan; a slot freed since, or reused by a record of another
//! segment, is skipped.
//!
//! Locks: `insert` takes the writer lock, then shard locks one at a time; reads and removals
//! take one shard lock. A removed record's bytes stay in their segment, dead but counted, until
//! the segment is evicted.

use ahash::RandomState;
use bytes::{Bytes, BytesMut};
use hashbrown::HashTable;
use parking_lot::{Mutex, RwLock};
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

/// Priority classes, evicted lowest first (`rules::Priority::class`).
pub const CLASSES: usize = 4;
const SHARDS: usize = super::SHARDS;
/// Bytes every record starts with: its id and its URI id, which the store finds it by.
pub const HEAD: usize = 24;
/// Hits a slot counts (more are not counted): a record survives as many evictions of its
/// segment as it has hits, each survival spending one.
/// One, as CLOCK keeps: on the replay trace, counting 2, 3 or 7 hits kept no more hits
/// (`benches/hit_ratio.rs`; 3 lost 1 point at the largest budget).
const MAX_HITS: u8 = 1;
/// Segments a class appends to at once. With one, a record that does not fit in what is left
/// of it seals it and its tail is lost: records of a few KiB in segments of tens left a tenth
/// of the budget empty (`benches/hit_ratio.rs`). With two, later smaller records fill the
/// older one's tail; when neither has room, the older one is sealed.
const OPEN: usize = 2;
/// No slot: the end of a shard's free list.
const NIL: u32 = u32::MAX;
/// What a record costs outside its segment, charged to the segment so that the budget bounds
/// all of it: its slot (twice: a slab that outgrows its capacity hint doubles, and the
/// allocator may keep the old copy), its 4-byte slots in the id and URI tables (at hashbrown's
/// load) and its entry in the segment's member list (4 bytes, up to twice that as the list
/// doubles).
pub const INDEX: usize = 2 * std::mem::size_of::<Slot>() + 2 * super::map_slot(4) + 8;
/// What a segment costs beyond its bytes: its bookkeeping, and the reference count block
/// `bytes` allocates when the first record is split off.
const SEGMENT_EXTRA: usize = 128;
/// Bits of a member that number the slot; the shard is above them.
const SLOT_BITS: u32 = 28;

/// A segment's member: slot `slot` of shard `shard`.
fn member(shard: usize, slot: u32) -> u32 {
    ((shard as u32) << SLOT_BITS) | slot
}

/// One stored record: its id, its URI id and the caller's payload (a reference count on its
/// segment; cloning it is one atomic increment).
#[derive(Clone, Debug)]
pub struct Record(Bytes);

/// The id a record starts with.
fn id_in(rec: &[u8]) -> u128 {
    let mut b = [0; 16];
    b.copy_from_slice(&rec[..16]);
    u128::from_le_bytes(b)
}

/// The URI id that follows it.
fn uri_in(rec: &[u8]) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&rec[16..HEAD]);
    u64::from_le_bytes(b)
}

impl Record {
    pub fn id(&self) -> u128 {
        id_in(&self.0)
    }

    pub fn uri(&self) -> u64 {
        uri_in(&self.0)
    }

    /// The caller's bytes.
    pub fn payload(&self) -> &[u8] {
        &self.0[HEAD..]
    }

    /// `range` of the payload, as `Bytes` that share the segment (no copy).
    pub fn slice(&self, range: Range<usize>) -> Bytes {
        self.0.slice(HEAD + range.start..HEAD + range.end)
    }

    /// Bytes the record takes in its segment.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `other` is this very record (not an equal copy).
    pub fn same(&self, other: &Record) -> bool {
        same_bytes(&self.0, &other.0)
    }
}

/// Whether two handles are to the very same bytes of a segment.
fn same_bytes(a: &Bytes, b: &Bytes) -> bool {
    a.as_ptr() == b.as_ptr() && a.len() == b.len()
}

/// What an insert did besides storing its record.
#[derive(Debug, Default)]
pub struct Inserted {
    /// The record that was stored under the same id, replaced.
    pub replaced: Option<Record>,
    /// Records dropped with their segments to make room.
    pub evicted: Vec<Record>,
    /// False when `insert_if` found its expected record gone: nothing was linked.
    pub linked: bool,
    /// Bytes of the record written.
    pub len: usize,
}

/// Why an insert stored nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The record alone is larger than the budget.
    TooLarge { len: usize, budget: usize },
}

struct Slot {
    rec: Option<Bytes>,
    /// The segment `rec` is in; the next free slot when `rec` is `None`.
    seg: u32,
    /// Set by a hit, cleared when the record is given its second chance.
    hits: AtomicU8,
}

#[derive(Default)]
struct Shard {
    slots: Vec<Slot>,
    free: u32,
    ids: HashTable<u32>,
    uris: HashTable<u32>,
}

impl Shard {
    fn with_capacity(n: usize) -> Self {
        Shard {
            slots: Vec::with_capacity(n),
            free: NIL,
            ids: HashTable::with_capacity(n),
            uris: HashTable::with_capacity(n),
        }
    }

    fn rec(&self, i: u32) -> Option<&Bytes> {
        self.slots.get(i as usize).and_then(|s| s.rec.as_ref())
    }

    fn id_at(&self, i: u32) -> Option<u128> {
        self.rec(i).map(|r| id_in(r))
    }

    fn uri_at(&self, i: u32) -> Option<u64> {
        self.rec(i).map(|r| uri_in(r))
    }

    fn find(&self, h: &RandomState, id: u128) -> Option<u32> {
        self.ids
            .find(h.hash_one(id as u64), |&i| self.id_at(i) == Some(id))
            .copied()
    }

    /// Puts `rec` in a free slot and links it by id and URI; returns the slot.
    fn put(&mut self, h: &RandomState, rec: Bytes, seg: u32) -> u32 {
        let (id, uri) = (id_in(&rec), uri_in(&rec));
        let slot = Slot {
            rec: Some(rec),
            seg,
            hits: AtomicU8::new(0),
        };
        let i = match self.free {
            NIL => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
            i => {
                self.free = self.slots[i as usize].seg;
                self.slots[i as usize] = slot;
                i
            }
        };
        let Shard {
            slots, ids, uris, ..
        } = self;
        // Slots linked in the tables always hold a record; the `0` is never hashed.
        let rec_at = |j: &u32| slots[*j as usize].rec.as_deref();
        ids.insert_unique(h.hash_one(id as u64), i, |j| {
            h.hash_one(rec_at(j).map_or(0, |r| id_in(r) as u64))
        });
        uris.insert_unique(h.hash_one(uri), i, |j| {
            h.hash_one(rec_at(j).map_or(0, uri_in))
        });
        i
    }

    /// Unlinks slot `i` and frees it; returns its record.
    fn take(&mut self, h: &RandomState, i: u32) -> Option<Bytes> {
        let id = self.id_at(i)?;
        let uri = self.uri_at(i)?;
        if let Ok(e) = self.ids.find_entry(h.hash_one(id as u64), |&j| j == i) {
            e.remove();
        }
        if let Ok(e) = self.uris.find_entry(h.hash_one(uri), |&j| j == i) {
            e.remove();
        }
        let free = self.free;
        let slot = &mut self.slots[i as usize];
        let rec = slot.rec.take();
        slot.seg = free;
        self.free = i;
        rec
    }
}

/// A segment's bookkeeping (its bytes are shared by its records' `Bytes`).
struct SegInfo {
    /// What it is charged: its bytes and [`INDEX`] for each record written in it.
    size: usize,
    class: u8,
    lane: Lane,
    /// `(shard << 28) | slot` of every record put in it ([`member`]).
    members: Vec<u32>,
}

/// Where in its class a segment is: S3-FIFO's two queues (see the module comment).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lane {
    /// Records on probation: new ones, until their segment is evicted.
    Small = 0,
    /// Records hit while on probation, records the ghost remembers, and replacements.
    Main = 1,
}

#[derive(Default)]
struct Queue {
    /// The segments records of this queue are appended to (at most [`OPEN`]), with their
    /// numbers, oldest first.
    open: Vec<(u32, BytesMut)>,
    /// Full segments, oldest first.
    sealed: VecDeque<u32>,
    /// Bytes charged to its segments.
    bytes: usize,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.open.is_empty() && self.sealed.is_empty()
    }
}

/// Ids of records lately evicted from probation unhit, so that one asked for again goes
/// straight to the main queue (S3-FIFO's ghost queue). A direct-mapped table of 32-bit
/// fingerprints, one per slot: a newer id overwrites an older one in its slot, so it
/// remembers about as many ids as it has slots, at 4 bytes each, and never grows. A false
/// match (about one in two billion: the fingerprint's low bit is always set) only sends a new
/// record to the main queue.
struct Ghost {
    prints: Box<[u32]>,
}

impl Ghost {
    fn new(slots: usize) -> Self {
        Ghost {
            prints: vec![0; slots.next_power_of_two()].into_boxed_slice(),
        }
    }

    fn bytes(&self) -> usize {
        self.prints.len() * 4
    }

    /// The slot and fingerprint of an id's hash (never 0, the empty slot).
    fn place(&self, hash: u64) -> (usize, u32) {
        let slot = hash as usize & (self.prints.len() - 1);
        (slot, (hash >> 32) as u32 | 1)
    }

    fn remember(&mut self, hash: u64) {
        let (slot, print) = self.place(hash);
        self.prints[slot] = print;
    }

    fn recalls(&self, hash: u64) -> bool {
        let (slot, print) = self.place(hash);
        self.prints[slot] == print
    }
}

struct Writer {
    /// Each class's probation and main queues, indexed by [`Lane`].
    queues: [[Queue; 2]; CLASSES],
    ghost: Ghost,
    segs: Vec<Option<SegInfo>>,
    /// Numbers free for new segments.
    free: Vec<u32>,
    /// Numbers of segments evicted during the current insert, freed when it ends (a record
    /// given its second chance still names its old segment until it is copied).
    retired: Vec<u32>,
}

impl Writer {
    fn new(ghost: usize) -> Self {
        Writer {
            queues: Default::default(),
            ghost: Ghost::new(ghost),
            segs: Vec::new(),
            free: Vec::new(),
            retired: Vec::new(),
        }
    }

    fn queue(&mut self, class: u8, lane: Lane) -> &mut Queue {
        &mut self.queues[class as usize][lane as usize]
    }

    /// Bytes of every segment held: what its queues are charged.
    fn allocated(&self) -> usize {
        self.queues.iter().flatten().map(|q| q.bytes).sum()
    }
}

/// A record given its second chance, waiting to be copied: where it is and what it was.
struct Survivor {
    shard: usize,
    slot: u32,
    rec: Bytes,
    class: u8,
}

/// The probation queues keep a `SMALL_SHARE`th of the budget before the main queues give up
/// segments, but never less than [`SMALL_SEGMENTS`] segments. A fifth rather than S3-FIFO's
/// tenth: on the replay trace a tenth hit about 2 points more at the smallest budget and
/// 0.5 to 1 point less at the largest, where an answer asked for again after probation
/// turned over misses once more than under an LRU (`benches/hit_ratio.rs`).
const SMALL_SHARE: usize = 5;
/// Segments' worth of bytes an insert may copy to keep records hit since they were written
/// (so every insert ends). One segment dropped hit records once probation's promotions and
/// the main queue's second chances both wanted it: at the largest budget of the replay trace
/// four kept the hit ratio level with an LRU's where one was 0.5 to 0.8 points under, and
/// eight did no better.
const KEEP_SEGMENTS: usize = 4;
/// Segments a probation queue keeps at least: with fewer, a budget of a handful of segments
/// would evict from probation alone and the main queue, never evicted, would keep what it
/// once promoted forever.
const SMALL_SEGMENTS: usize = 2;

/// The store. See the module comment.
pub struct Segments {
    segment: usize,
    /// The budget less the ghost's table: what segments may take.
    budget: usize,
    /// Bytes of the probation queues beyond which they are evicted first.
    small: usize,
    shards: Box<[RwLock<Shard>]>,
    writer: Mutex<Writer>,
    hasher: RandomState,
    entries: AtomicUsize,
    live: AtomicUsize,
    allocated: AtomicUsize,
    evicted: AtomicU64,
}

impl Segments {
    /// A store of `budget` bytes in segments of `segment` bytes (a record larger than a
    /// segment gets one of its own size), with room for `capacity` records before its
    /// tables grow.
    pub fn new(budget: usize, segment: usize, capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS);
        let segment = segment.max(HEAD);
        let writer = Writer::new(capacity.max(1));
        let budget = budget.saturating_sub(writer.ghost.bytes());
        Segments {
            segment,
            budget,
            small: (budget / SMALL_SHARE).max(SMALL_SEGMENTS * (segment + SEGMENT_EXTRA)),
            shards: (0..SHARDS)
                .map(|_| RwLock::new(Shard::with_capacity(per_shard)))
                .collect(),
            writer: Mutex::new(writer),
            hasher: RandomState::new(),
            entries: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            allocated: AtomicUsize::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    /// A store of `budget` bytes with segments of a 16th of it, between 4 KiB and 64 KiB: large
    /// against the records they hold, so little of a segment is left empty (a 64th lost two to
    /// five points of hit ratio at small budgets, `benches/hit_ratio.rs`), and a segment's
    /// bookkeeping is little per record. Not larger than 64 KiB: mimalloc
    /// gives an allocation of a MiB pages of its own, and at a million entries that cost 106 B
    /// an entry more than 64 KiB segments did (`benches/memory_scale.rs`,
    /// `MEMORY_SCALE_SEGMENT`: 64 KiB 14 B, 256 KiB 32 B, 1 MiB 109 B of RSS beyond the heap
    /// requested). Its tables are sized
    /// for a record per 4 KiB of budget: preallocated, they do not leave
    /// the copies a doubling table frees behind in the allocator.
    pub fn for_budget(budget: usize) -> Self {
        Self::new(
            budget,
            (budget / 16).clamp(4 << 10, 64 << 10),
            (budget / 4096).clamp(64, 1 << 20),
        )
    }

    fn shard_of(id: u128) -> usize {
        (id as usize) % SHARDS
    }

    /// The record stored under `id`.
    pub fn get(&self, id: u128) -> Option<Record> {
        let shard = self.shards[Self::shard_of(id)].read();
        let i = shard.find(&self.hasher, id)?;
        shard.rec(i).cloned().map(Record)
    }

    /// The record stored under `id`, noted as hit (it gets a second chance when its segment
    /// is evicted).
    pub fn hit(&self, id: u128) -> Option<Record> {
        let shard = self.shards[Self::shard_of(id)].read();
        let i = shard.find(&self.hasher, id)?;
        let slot = &shard.slots[i as usize];
        // Read first: a hot record's slot is not written on every hit.
        let hits = slot.hits.load(Ordering::Relaxed);
        if hits < MAX_HITS {
            slot.hits.store(hits + 1, Ordering::Relaxed);
        }
        slot.rec.clone().map(Record)
    }

    /// Removes the record stored under `id`.
    pub fn remove(&self, id: u128) -> Option<Record> {
        let rec = {
            let mut shard = self.shards[Self::shard_of(id)].write();
            let i = shard.find(&self.hasher, id)?;
            shard.take(&self.hasher, i)?
        };
        self.unlinked(rec.len());
        Some(Record(rec))
    }

    /// Every record stored for URI id `uri` (its variants).
    pub fn variants(&self, uri: u64) -> Vec<Record> {
        let h = self.hasher.hash_one(uri);
        let mut found = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read();
            for &i in shard.uris.iter_hash(h) {
                if shard.uri_at(i) == Some(uri) {
                    found.extend(shard.rec(i).cloned().map(Record));
                }
            }
        }
        found
    }

    /// Whether any record is stored for URI id `uri`.
    pub fn has_uri(&self, uri: u64) -> bool {
        let h = self.hasher.hash_one(uri);
        self.shards.iter().any(|shard| {
            let shard = shard.read();
            shard
                .uris
                .iter_hash(h)
                .any(|&i| shard.uri_at(i) == Some(uri))
        })
    }

    /// Records stored.
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the records stored.
    pub fn live_bytes(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Bytes of every segment held: what the budget bounds.
    pub fn allocated(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Records dropped to make room so far.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Stores a record of `parts` under `id` and `uri` in priority class `class` (0 is
    /// evicted first), replacing any record stored under `id`.
    pub fn insert(
        &self,
        id: u128,
        uri: u64,
        class: u8,
        parts: &[&[u8]],
    ) -> Result<Inserted, Refused> {
        self.insert_if(id, uri, class, parts, None)
    }

    /// As [`Segments::insert`], but only if `expect` is still the record stored under `id`
    /// (a revalidation must not put back what a purge removed); when it is not, `linked` is
    /// false and the written bytes are dead.
    pub fn insert_if(
        &self,
        id: u128,
        uri: u64,
        class: u8,
        parts: &[&[u8]],
        expect: Option<&Record>,
    ) -> Result<Inserted, Refused> {
        let class = class.min(CLASSES as u8 - 1);
        let len = HEAD + parts.iter().map(|p| p.len()).sum::<usize>();
        if len > self.budget {
            return Err(Refused::TooLarge {
                len,
                budget: self.budget,
            });
        }
        let mut out = Inserted {
            len,
            ..Inserted::default()
        };
        let shard_i = Self::shard_of(id);
        let hash = self.hasher.hash_one(id as u64);
        let stored = self.shards[shard_i].read().find(&self.hasher, id).is_some();
        let mut w = self.writer.lock();
        // A new record is on probation, unless it replaces one or was lately evicted from
        // probation unhit: asked for again, it has shown it is not a one-hit wonder.
        let lane = if stored || w.ghost.recalls(hash) {
            Lane::Main
        } else {
            Lane::Small
        };
        // Second chances copy at most [`KEEP_SEGMENTS`] segments' bytes per insert.
        let mut keep = KEEP_SEGMENTS * self.segment;
        let mut survivors = Vec::new();
        let (seg, rec) = self.append(
            &mut w,
            class,
            lane,
            len,
            &mut out,
            &mut survivors,
            &mut keep,
            |buf| {
                buf.extend_from_slice(&id.to_le_bytes());
                buf.extend_from_slice(&uri.to_le_bytes());
                for p in parts {
                    buf.extend_from_slice(p);
                }
            },
        );
        {
            let mut shard = self.shards[shard_i].write();
            let current = shard.find(&self.hasher, id);
            let holds_expected = match (expect, current) {
                (None, _) => true,
                (Some(e), Some(i)) => shard.rec(i).is_some_and(|r| same_bytes(r, &e.0)),
                (Some(_), None) => false,
            };
            if holds_expected {
                if let Some(i) = current {
                    out.replaced = shard.take(&self.hasher, i).map(Record);
                }
                let slot = shard.put(&self.hasher, rec, seg);
                out.linked = true;
                if let Some(Some(info)) = w.segs.get_mut(seg as usize) {
                    info.members.push(member(shard_i, slot));
                }
            }
        }
        if let Some(old) = &out.replaced {
            self.unlinked(old.len());
        }
        if out.linked {
            self.linked(len);
        }
        // Copy the records given a second chance; copying may evict further segments, whose
        // survivors join the queue while `keep` lasts.
        while let Some(s) = survivors.pop() {
            self.relocate(&mut w, s, &mut out, &mut survivors, &mut keep);
        }
        let Writer { retired, free, .. } = &mut *w;
        free.append(retired);
        self.allocated.store(w.allocated(), Ordering::Relaxed);
        Ok(out)
    }

    /// Drops every record and segment; returns the records dropped.
    pub fn clear(&self) -> Vec<Record> {
        let mut w = self.writer.lock();
        let mut dropped = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.write();
            let linked: Vec<u32> = shard.ids.iter().copied().collect();
            for i in linked {
                if let Some(rec) = shard.take(&self.hasher, i) {
                    dropped.push(Record(rec));
                }
            }
        }
        for r in &dropped {
            self.unlinked(r.len());
        }
        let ghost = w.ghost.prints.len();
        *w = Writer::new(ghost);
        self.allocated.store(0, Ordering::Relaxed);
        dropped
    }

    fn linked(&self, len: usize) {
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.live.fetch_add(len, Ordering::Relaxed);
    }

    fn unlinked(&self, len: usize) {
        self.entries.fetch_sub(1, Ordering::Relaxed);
        self.live.fetch_sub(len, Ordering::Relaxed);
    }

    /// Writes a record of `len` bytes (by `write`) in queue `lane` of class `class`, making
    /// room first; returns its segment and its bytes.
    #[allow(clippy::too_many_arguments)]
    fn append(
        &self,
        w: &mut Writer,
        class: u8,
        lane: Lane,
        len: usize,
        out: &mut Inserted,
        survivors: &mut Vec<Survivor>,
        keep: &mut usize,
        write: impl FnOnce(&mut BytesMut),
    ) -> (u32, Bytes) {
        // A record larger than a segment gets a segment of its own, sealed at once (the
        // class's open ones stay).
        let dedicated = len > self.segment;
        let room = |w: &Writer| {
            w.queues[class as usize][lane as usize]
                .open
                .iter()
                .position(|(_, b)| b.capacity() - b.len() >= len)
        };
        let found = loop {
            let found = if dedicated { None } else { room(w) };
            let need = INDEX
                + match (dedicated, found) {
                    (true, _) => len + SEGMENT_EXTRA,
                    (false, Some(_)) => 0,
                    (false, None) => self.segment + SEGMENT_EXTRA,
                };
            // Evicting may take one of this class's open segments: look again. With nothing
            // left to evict the budget is smaller than a segment; the record is written anyway.
            if w.allocated() + need <= self.budget || !self.evict_one(w, out, survivors, keep) {
                break found;
            }
        };
        let (seg, rec) = if dedicated {
            let seg = self.open(w, class, lane, len);
            let mut buf = BytesMut::with_capacity(len);
            write(&mut buf);
            w.queue(class, lane).sealed.push_back(seg);
            (seg, buf.freeze())
        } else {
            let at = match found {
                Some(at) => at,
                None => {
                    let queue = w.queue(class, lane);
                    if queue.open.len() >= OPEN {
                        // Seal the older one: it had its chance to fill its tail, and sealing
                        // it keeps the queue in write order (sealing the fuller one could keep
                        // a segment with a useless tail open, and its records, forever).
                        let (seg, _) = queue.open.remove(0);
                        queue.sealed.push_back(seg);
                    }
                    let seg = self.open(w, class, lane, self.segment);
                    let queue = w.queue(class, lane);
                    queue
                        .open
                        .push((seg, BytesMut::with_capacity(self.segment)));
                    queue.open.len() - 1
                }
            };
            let (seg, buf) = &mut w.queue(class, lane).open[at];
            write(buf);
            (*seg, buf.split().freeze())
        };
        // The record's share of the index is charged to its segment.
        if let Some(Some(info)) = w.segs.get_mut(seg as usize) {
            info.size += INDEX;
        }
        w.queue(class, lane).bytes += INDEX;
        (seg, rec)
    }

    /// Numbers a new segment of `size` bytes and counts it.
    fn open(&self, w: &mut Writer, class: u8, lane: Lane, size: usize) -> u32 {
        let size = size + SEGMENT_EXTRA;
        let info = SegInfo {
            size,
            class,
            lane,
            members: Vec::new(),
        };
        w.queue(class, lane).bytes += size;
        match w.free.pop() {
            Some(n) => {
                w.segs[n as usize] = Some(info);
                n
            }
            None => {
                w.segs.push(Some(info));
                (w.segs.len() - 1) as u32
            }
        }
    }

    /// Evicts one segment of the lowest class that has one (a strict order: a class's
    /// segments all go before a higher class's): from its probation queue while that holds
    /// more than its share or the main queue is empty, else from its main queue; the queue's
    /// oldest full segment, else its oldest open one. False if there is none.
    fn evict_one(
        &self,
        w: &mut Writer,
        out: &mut Inserted,
        survivors: &mut Vec<Survivor>,
        keep: &mut usize,
    ) -> bool {
        let victim = w.queues.iter_mut().find_map(|[small, main]| {
            let q = if main.is_empty() || (!small.is_empty() && small.bytes > self.small) {
                small
            } else {
                main
            };
            q.sealed
                .pop_front()
                .or_else(|| (!q.open.is_empty()).then(|| q.open.remove(0).0))
        });
        match victim {
            Some(seg) => {
                self.evict(w, seg, out, survivors, keep);
                true
            }
            None => false,
        }
    }

    /// Drops segment `seg`: unlinks its records, except those hit since they were written,
    /// which wait in `survivors` to be copied to the main queue (while `keep` lasts). The ids
    /// of probation records dropped unhit are remembered by the ghost.
    fn evict(
        &self,
        w: &mut Writer,
        seg: u32,
        out: &mut Inserted,
        survivors: &mut Vec<Survivor>,
        keep: &mut usize,
    ) {
        let Some(info) = w.segs.get_mut(seg as usize).and_then(Option::take) else {
            return;
        };
        w.queue(info.class, info.lane).bytes -= info.size;
        w.retired.push(seg);
        let mut members = info.members;
        members.sort_unstable();
        let mut evicted = 0;
        for group in members.chunk_by(|a, b| a >> SLOT_BITS == b >> SLOT_BITS) {
            let shard_i = (group[0] >> SLOT_BITS) as usize;
            let mut shard = self.shards[shard_i].write();
            for &m in group {
                let i = m & ((1 << SLOT_BITS) - 1);
                let Some(slot) = shard.slots.get(i as usize) else {
                    continue;
                };
                let Some(rec) = slot.rec.as_ref().filter(|_| slot.seg == seg) else {
                    continue;
                };
                let len = rec.len();
                let hits = slot.hits.load(Ordering::Relaxed);
                if len <= *keep && hits > 0 {
                    slot.hits.store(hits - 1, Ordering::Relaxed);
                    *keep -= len;
                    survivors.push(Survivor {
                        shard: shard_i,
                        slot: i,
                        rec: rec.clone(),
                        class: info.class,
                    });
                } else if let Some(rec) = shard.take(&self.hasher, i) {
                    if info.lane == Lane::Small {
                        w.ghost.remember(self.hasher.hash_one(id_in(&rec) as u64));
                    }
                    self.unlinked(rec.len());
                    out.evicted.push(Record(rec));
                    evicted += 1;
                }
            }
        }
        self.evicted.fetch_add(evicted, Ordering::Relaxed);
    }

    /// Copies a record given its second chance to its class's main queue, and points its slot
    /// at the copy if the slot still holds the record (a purge since then wins).
    fn relocate(
        &self,
        w: &mut Writer,
        s: Survivor,
        out: &mut Inserted,
        survivors: &mut Vec<Survivor>,
        keep: &mut usize,
    ) {
        let (seg, copy) = self.append(
            w,
            s.class,
            Lane::Main,
            s.rec.len(),
            out,
            survivors,
            keep,
            |buf| buf.extend_from_slice(&s.rec),
        );
        let mut shard = self.shards[s.shard].write();
        let Some(slot) = shard.slots.get_mut(s.slot as usize) else {
            return;
        };
        let still = slot.rec.as_ref().is_some_and(|r| same_bytes(r, &s.rec));
        if still {
            slot.rec = Some(copy);
            slot.seg = seg;
            drop(shard);
            if let Some(Some(info)) = w.segs.get_mut(seg as usize) {
                info.members.push(member(s.shard, s.slot));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: usize) -> Vec<u8> {
        vec![b'x'; n]
    }

    #[test]
    fn a_record_is_found_by_id_and_uri_and_shares_its_segment() {
        let s = Segments::new(1 << 20, 64 << 10, 64);
        let out = s.insert(7, 70, 1, &[b"head", b"body"]).unwrap();
        assert!(out.linked && out.replaced.is_none() && out.evicted.is_empty());
        let r = s.get(7).unwrap();
        assert_eq!((r.id(), r.uri(), r.payload()), (7, 70, &b"headbody"[..]));
        let body = r.slice(4..8);
        assert_eq!(&body[..], b"body");
        assert_eq!(
            body.as_ptr(),
            r.payload()[4..].as_ptr(),
            "a slice is the stored bytes, not a copy"
        );
        s.insert(8, 70, 1, &[b"other variant"]).unwrap();
        s.insert(9, 71, 1, &[b"other uri"]).unwrap();
        let mut ids: Vec<u128> = s.variants(70).iter().map(Record::id).collect();
        ids.sort();
        assert_eq!(ids, [7, 8]);
        assert!(s.has_uri(71) && !s.has_uri(72));
        assert_eq!(s.len(), 3);
        assert_eq!(s.remove(7).unwrap().payload(), b"headbody");
        assert!(s.get(7).is_none() && s.remove(7).is_none());
        assert_eq!(s.variants(70).len(), 1);
        assert_eq!(s.len(), 2);
        assert_eq!(s.live_bytes(), 2 * HEAD + 13 + 9);
    }

    #[test]
    fn a_second_insert_replaces_and_insert_if_respects_a_purge() {
        let s = Segments::new(1 << 20, 64 << 10, 64);
        s.insert(1, 10, 1, &[b"v1"]).unwrap();
        let v1 = s.get(1).unwrap();
        let out = s.insert(1, 10, 1, &[b"v2"]).unwrap();
        assert!(out.replaced.unwrap().same(&v1));
        assert_eq!(s.len(), 1);
        assert_eq!(s.variants(10).len(), 1, "the URI index holds one link");
        // A revalidation of a record purged meanwhile does not put it back.
        let v2 = s.get(1).unwrap();
        s.remove(1);
        let out = s.insert_if(1, 10, 1, &[b"v3"], Some(&v2)).unwrap();
        assert!(!out.linked);
        assert!(s.get(1).is_none());
        s.insert(1, 10, 1, &[b"v4"]).unwrap();
        let out = s.insert_if(1, 10, 1, &[b"v5"], Some(&v2)).unwrap();
        assert!(!out.linked, "v2 is no longer what is stored");
        assert_eq!(s.get(1).unwrap().payload(), b"v4");
        let v4 = s.get(1).unwrap();
        assert!(s.insert_if(1, 10, 1, &[b"v6"], Some(&v4)).unwrap().linked);
        assert_eq!(s.get(1).unwrap().payload(), b"v6");
    }

    #[test]
    fn the_budget_holds_and_the_oldest_segment_goes_first() {
        let seg = 8 << 10;
        let s = Segments::new(64 << 10, seg, 64);
        let per = HEAD + 1000;
        let mut evicted = Vec::new();
        for id in 0..500u128 {
            let out = s.insert(id, id as u64, 1, &[&rec(1000)]).unwrap();
            assert!(s.allocated() <= 64 << 10, "{} held", s.allocated());
            evicted.extend(out.evicted.iter().map(Record::id));
        }
        // FIFO without hits: what was evicted is exactly the oldest ids.
        let n = evicted.len();
        assert!(n > 400, "{n} evicted");
        evicted.sort();
        assert_eq!(evicted, (0..n as u128).collect::<Vec<_>>());
        assert_eq!(s.len(), 500 - n);
        assert!(s.get(499).is_some() && s.get(0).is_none());
        assert_eq!(s.evicted(), n as u64);
        // The budget is used: what is charged is within a segment (and its records' index
        // charges) of it, and full segments are full.
        assert!(
            s.allocated() + seg + SEGMENT_EXTRA + 8 * INDEX > 64 << 10,
            "{}",
            s.allocated()
        );
        assert_eq!(s.live_bytes() % per, 0);
    }

    /// Inserts `n` records of 1000 bytes that are never asked for again, from id `from`.
    fn flood(s: &Segments, from: u128, n: u128) {
        for id in from..from + n {
            s.insert(id, 0, 1, &[&rec(1000)]).unwrap();
        }
    }

    #[test]
    fn a_record_hit_on_probation_moves_to_the_main_queue_and_outlives_a_flood() {
        let s = Segments::new(64 << 10, 8 << 10, 64);
        for id in 0..8u128 {
            s.insert(id, 0, 1, &[&rec(1000)]).unwrap();
        }
        assert!(s.hit(3).is_some());
        let before = s.get(3).unwrap();
        // Ten budgets of records asked for once: FIFO with a second chance would drop the
        // hit record on the flood's second pass; probation takes the flood alone.
        flood(&s, 1000, 640);
        for id in (0..8u128).filter(|&i| i != 3) {
            assert!(s.get(id).is_none(), "{id} was not hit and is gone");
        }
        let after = s.get(3).expect("the hit record was promoted and kept");
        assert_eq!(after.payload(), before.payload());
        assert!(!after.same(&before), "it was copied to the main queue");
        assert!(s.allocated() <= 64 << 10);
    }

    #[test]
    fn a_record_of_the_main_queue_survives_its_segment_once_for_a_hit() {
        let s = Segments::new(64 << 10, 8 << 10, 64);
        // A second insert of a stored id replaces it in the main queue.
        let main = |id: u128| {
            for _ in 0..2 {
                s.insert(id, 0, 1, &[&rec(1000)]).unwrap();
            }
        };
        for id in 0..8u128 {
            main(id);
        }
        assert!(s.hit(3).is_some());
        let mut id = 100u128;
        while (0..8u128).any(|i| i != 3 && s.get(i).is_some()) && id < 400 {
            main(id);
            id += 1;
        }
        assert!(id < 400, "the main queue's first records were evicted");
        assert!(s.get(3).is_some(), "hit, it outlived its segment");
        for _ in 0..200 {
            main(id);
            id += 1;
        }
        assert!(
            s.get(3).is_none(),
            "without a new hit it gets no third chance"
        );
        assert!(s.allocated() <= 64 << 10);
    }

    #[test]
    fn a_record_asked_for_again_after_its_probation_goes_to_the_main_queue() {
        let seg = 8 << 10;
        let s = Segments::new(64 << 10, seg, 64);
        // Alone in its segment, so that its eviction is the only one the ghost remembers.
        let alone = rec(seg - HEAD);
        s.insert(1, 0, 1, &[&alone]).unwrap();
        let mut id = 1000u128;
        while s.get(1).is_some() && id < 2000 {
            flood(&s, id, 1);
            id += 1;
        }
        assert!(s.get(1).is_none(), "evicted from probation unhit");
        s.insert(1, 0, 1, &[&rec(1000)]).unwrap();
        flood(&s, id, 640);
        assert!(
            s.get(1).is_some(),
            "remembered by the ghost, it went to the main queue, which the flood leaves alone"
        );
        // Another id, never evicted before, went through probation and is gone.
        s.insert(2, 0, 1, &[&rec(1000)]).unwrap();
        flood(&s, id + 640, 640);
        assert!(s.get(2).is_none());
    }

    #[test]
    fn a_lower_class_is_evicted_first() {
        let s = Segments::new(64 << 10, 8 << 10, 64);
        for id in 0..20u128 {
            s.insert(id, 0, 2, &[&rec(1000)]).unwrap();
        }
        for id in 100..200u128 {
            s.insert(id, 0, 0, &[&rec(1000)]).unwrap();
        }
        assert!(
            (0..20u128).all(|id| s.get(id).is_some()),
            "the high class kept everything while the low one had segments to give"
        );
        assert!(s.get(100).is_none() && s.get(199).is_some());
    }

    #[test]
    fn a_large_record_has_its_own_segment_and_one_over_budget_is_refused() {
        let s = Segments::new(64 << 10, 8 << 10, 64);
        s.insert(1, 0, 1, &[&rec(100)]).unwrap();
        s.insert(2, 0, 1, &[&rec(20_000)]).unwrap();
        s.insert(3, 0, 1, &[&rec(100)]).unwrap();
        assert_eq!(s.get(2).unwrap().payload().len(), 20_000);
        assert_eq!(
            s.allocated(),
            (8 << 10) + HEAD + 20_000 + 2 * SEGMENT_EXTRA + 3 * INDEX
        );
        assert_eq!(
            s.insert(4, 0, 1, &[&rec(64 << 10)]).unwrap_err(),
            Refused::TooLarge {
                len: HEAD + (64 << 10),
                budget: (64 << 10) - 64 * 4,
            },
            "the budget less the ghost's table of 64 slots"
        );
        assert!(s.get(4).is_none() && s.get(1).is_some());
    }

    #[test]
    fn a_reader_keeps_its_bytes_after_the_segment_is_evicted_and_clear_drops_all() {
        let s = Segments::new(16 << 10, 4 << 10, 64);
        s.insert(1, 0, 1, &[b"kept by a reader"]).unwrap();
        let held = s.get(1).unwrap().slice(0..16);
        for id in 2..100u128 {
            s.insert(id, 0, 1, &[&rec(1000)]).unwrap();
        }
        assert!(s.get(1).is_none());
        assert_eq!(&held[..], b"kept by a reader");
        let n = s.len();
        assert_eq!(s.clear().len(), n);
        assert_eq!((s.len(), s.live_bytes(), s.allocated()), (0, 0, 0));
        s.insert(5, 0, 1, &[b"after"]).unwrap();
        assert_eq!(s.get(5).unwrap().payload(), b"after");
    }

    #[test]
    fn concurrent_writers_readers_and_purges_keep_the_books() {
        let s = std::sync::Arc::new(Segments::new(256 << 10, 16 << 10, 64));
        let threads: Vec<_> = (0..4u128)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..3000u128 {
                        let id = (i * 7 + t) % 900;
                        match i % 4 {
                            0 => {
                                s.insert(id, (id % 50) as u64, (id % 4) as u8, &[&rec(500)])
                                    .unwrap();
                            }
                            1 => {
                                if let Some(r) = s.hit(id) {
                                    assert_eq!(r.id(), id);
                                }
                            }
                            2 => {
                                s.remove(id);
                            }
                            _ => {
                                for r in s.variants((id % 50) as u64) {
                                    assert_eq!(r.uri(), (id % 50) as u64);
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut n = 0;
        let mut bytes = 0;
        for id in 0..900u128 {
            if let Some(r) = s.get(id) {
                n += 1;
                bytes += r.len();
            }
        }
        assert_eq!((s.len(), s.live_bytes()), (n, bytes));
        assert!(s.allocated() <= 256 << 10);
    }
}
