//! One warm job: its work list, its progress, and what its status shows.
//!
//! Progress is one small record per target (the gateway's result and a bit per CDN front that
//! failed), so counts are exact after a takeover: a checkpoint stores the *watermark* (every
//! target before it is finished) with the counts of the targets before it, and whoever resumes
//! the job starts there with those counts. Targets after the watermark that had finished are
//! sent again (at most the job's `concurrency` of them), and answer from cache.

use crate::config::warm::{JobSpec, Target};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// A target's result at the gateway.
pub const PENDING: u8 = 0;
pub const WARMED: u8 = 1;
pub const SKIPPED: u8 = 2;
pub const ERROR: u8 = 3;

/// Finished targets, by result (and failures per CDN front).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Counts {
    pub done: u64,
    pub warmed: u64,
    pub skipped: u64,
    pub errors: u64,
    #[serde(default)]
    pub front_errors: Vec<u64>,
}

impl Counts {
    fn add(&mut self, result: u8, front_failed: u16, fronts: usize) {
        if result == PENDING {
            return;
        }
        self.done += 1;
        match result {
            WARMED => self.warmed += 1,
            SKIPPED => self.skipped += 1,
            _ => self.errors += 1,
        }
        self.front_errors.resize(fronts, 0);
        for (f, n) in self.front_errors.iter_mut().enumerate() {
            if front_failed & (1 << f) != 0 {
                *n += 1;
            }
        }
    }
}

/// What is stored to resume a job elsewhere.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    pub state: String,
    /// Every target before this index is finished.
    pub watermark: usize,
    /// Counts of the targets before the watermark.
    pub counts: Counts,
    pub throttled: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// The instance running (or that ran) the job.
    pub instance: String,
    /// The status as its runner last saw it (what other instances show).
    #[serde(default)]
    pub status: serde_json::Value,
}

/// What a job is and was asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Definition {
    pub id: String,
    pub kind: String,
    pub spec: JobSpec,
    pub targets: Vec<Target>,
    pub created_ms: u64,
    #[serde(default)]
    pub schedule: Option<String>,
    /// The region that started the job, when another region's gateway wrote it into this
    /// region's store (`"regions"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_region: Option<String>,
}

pub(super) struct Progress {
    pub state: &'static str,
    /// Where this run started.
    pub from: usize,
    /// Counts before `from`.
    pub base: Counts,
    /// Per target: (result, failed fronts as bits).
    pub results: Vec<(u8, u16)>,
    pub throttled: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub run_start: Option<Instant>,
    pub instance: String,
}

/// A job this instance knows: running here, or finished here.
pub struct Job {
    pub def: Definition,
    pub(super) progress: Mutex<Progress>,
    /// Set when the job must stop (its lease went to another instance).
    pub(super) cancel: AtomicBool,
}

impl Job {
    pub(super) fn new(def: Definition, resume: Option<&Checkpoint>, instance: &str) -> Job {
        let total = def.targets.len();
        let (from, base, throttled, started_ms) = match resume {
            Some(c) => (
                c.watermark.min(total),
                c.counts.clone(),
                c.throttled,
                c.started_ms,
            ),
            None => (0, Counts::default(), 0, None),
        };
        Job {
            progress: Mutex::new(Progress {
                state: "queued",
                from,
                base,
                results: vec![(PENDING, 0); total],
                throttled,
                started_ms,
                finished_ms: None,
                run_start: None,
                instance: instance.to_string(),
            }),
            def,
            cancel: AtomicBool::new(false),
        }
    }

    pub fn id(&self) -> &str {
        &self.def.id
    }

    pub(super) fn fronts(&self) -> usize {
        self.def.spec.warm_via.len()
    }

    pub(super) fn set_state(&self, state: &'static str) {
        self.progress.lock().state = state;
    }

    pub(super) fn state(&self) -> &'static str {
        self.progress.lock().state
    }

    pub(super) fn finish_target(&self, index: usize, result: u8, front_failed: u16) {
        if let Some(slot) = self.progress.lock().results.get_mut(index) {
            *slot = (result, front_failed);
        }
    }

    pub(super) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Counts over every finished target.
    pub fn counts(&self) -> Counts {
        let p = self.progress.lock();
        let mut c = p.base.clone();
        c.front_errors.resize(self.fronts(), 0);
        for &(r, f) in &p.results[p.from..] {
            c.add(r, f, self.fronts());
        }
        c
    }

    /// The resume point and its counts.
    pub(super) fn checkpoint(&self) -> Checkpoint {
        let status = self.status();
        let p = self.progress.lock();
        let mut counts = p.base.clone();
        counts.front_errors.resize(self.fronts(), 0);
        let mut watermark = p.from;
        while let Some(&(r, f)) = p.results.get(watermark) {
            if r == PENDING {
                break;
            }
            counts.add(r, f, self.fronts());
            watermark += 1;
        }
        Checkpoint {
            state: p.state.to_string(),
            watermark,
            counts,
            throttled: p.throttled,
            started_ms: p.started_ms,
            finished_ms: p.finished_ms,
            instance: p.instance.clone(),
            status,
        }
    }

    /// `GET /admin/jobs/{id}`.
    pub fn status(&self) -> serde_json::Value {
        let c = self.counts();
        let p = self.progress.lock();
        let total = self.def.targets.len() as u64;
        let done_here = c.done.saturating_sub(p.base.done);
        let eta = match (p.state, p.run_start) {
            ("done", _) => Some(0.0),
            (_, Some(start)) if done_here > 0 => {
                let per = start.elapsed().as_secs_f64() / done_here as f64;
                Some((total.saturating_sub(c.done) as f64 * per * 10.0).round() / 10.0)
            }
            _ => None,
        };
        let fronts: Vec<serde_json::Value> = (self.def.spec.warm_via.iter().enumerate())
            .map(|(i, front)| {
                let errors = c.front_errors.get(i).copied().unwrap_or(0);
                serde_json::json!({"front": front, "done": c.done, "ok": c.done - errors.min(c.done), "errors": errors})
            })
            .collect();
        serde_json::json!({
            "id": self.def.id,
            "kind": self.def.kind,
            "state": p.state,
            "total": total,
            "done": c.done,
            "warmed": c.warmed,
            "skipped": c.skipped,
            "errors": c.errors,
            "throttled": p.throttled,
            "eta_seconds": eta,
            "refresh": self.def.spec.refresh,
            "concurrency": self.def.spec.concurrency.unwrap_or(crate::config::warm::DEFAULT_CONCURRENCY),
            "rate": self.def.spec.rate,
            "fronts": fronts,
            "schedule": self.def.schedule,
            "from_region": self.def.from_region,
            "created_ms": self.def.created_ms,
            "started_ms": p.started_ms,
            "finished_ms": p.finished_ms,
            "instance": p.instance,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(n: usize, fronts: usize) -> Definition {
        Definition {
            id: "j".into(),
            kind: "urls".into(),
            spec: JobSpec {
                warm_via: (0..fronts).map(|i| format!("http://f{i}")).collect(),
                ..Default::default()
            },
            targets: (0..n)
                .map(|i| Target {
                    method: "GET".into(),
                    path: format!("/{i}"),
                    host: None,
                    body: None,
                })
                .collect(),
            created_ms: 0,
            schedule: None,
            from_region: None,
        }
    }

    #[test]
    fn a_checkpoint_resumes_with_exact_counts() {
        let job = Job::new(def(5, 2), None, "a");
        job.finish_target(0, WARMED, 0);
        job.finish_target(1, SKIPPED, 0b10);
        job.finish_target(3, ERROR, 0);
        let cp = job.checkpoint();
        assert_eq!(cp.watermark, 2);
        assert_eq!(cp.counts.done, 2);
        assert_eq!(cp.counts.front_errors, vec![0, 1]);
        // Another instance resumes: target 3 is sent again, 2 and 4 for the first time.
        let again = Job::new(def(5, 2), Some(&cp), "b");
        again.finish_target(2, WARMED, 0);
        again.finish_target(3, ERROR, 0);
        again.finish_target(4, SKIPPED, 0);
        let c = again.counts();
        assert_eq!((c.done, c.warmed, c.skipped, c.errors), (5, 2, 2, 1));
        assert_eq!(again.status()["total"], 5);
    }
}
