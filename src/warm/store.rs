//! Warm jobs in Redis: what each job is, where it got to, who runs it, and which scheduled runs
//! were started, so a job outlives the instance running it and runs on one instance at a time.
//!
//! Keys (all under the `warm:job:` tag, schedules under `warm:sched:`; a job's own keys share the
//! hash tag `{id}`): `{id}:def` the job
//! (spec and expanded targets), `{id}:cp` its last [`Checkpoint`], `{id}:lease` the instance
//! running it (a `SET NX PX` lease, renewed by its runner, taken over by another instance once
//! it lapses), and `index`, a sorted set of job ids by creation time trimmed to the newest
//! [`super::MAX_KEPT`]. Every key of a finished job expires after a week. A scheduled run is
//! claimed with `SET NX` on `warm:sched:{name}:{due ms}`, so one instance starts it.

use super::job::{Checkpoint, Definition};
use crate::redis::{Keyspace, Redis};
use std::sync::Arc;

/// How long a lease lasts without renewal.
pub const LEASE_MS: u64 = 3_000;
/// How long a finished job's keys are kept.
const KEEP_MS: u64 = 7 * 24 * 3_600_000;

/// Renews the lease if it is still ours. KEYS[1] lease; ARGV owner, ms.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Releases the lease if it is still ours.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

pub struct Store {
    redis: Arc<Redis>,
    jobs: Keyspace,
    schedules: Keyspace,
}

impl Store {
    pub fn new(redis: Arc<Redis>) -> Result<Store, String> {
        Ok(Store {
            jobs: redis.keyspace("warm jobs", "warm:job:")?,
            schedules: redis.keyspace("warm schedules", "warm:sched:")?,
            redis,
        })
    }

    /// Stores a new job and takes its lease for `owner`. `false`: Redis did not take it (the
    /// job then runs here, in memory only).
    pub async fn create(&self, def: &Definition, cp: &Checkpoint, owner: &str) -> bool {
        self.put(def, cp, Some(owner)).await
    }

    /// Stores a new job nobody holds (one another region's gateway wrote here): the first
    /// instance of this region whose tick sees it takes its lease and runs it. `false`: Redis
    /// did not take it.
    pub async fn offer(&self, def: &Definition, cp: &Checkpoint) -> bool {
        self.put(def, cp, None).await
    }

    async fn put(&self, def: &Definition, cp: &Checkpoint, owner: Option<&str>) -> bool {
        let Ok(def_json) = serde_json::to_string(def) else {
            return false;
        };
        let cp_json = serde_json::to_string(cp).unwrap_or_default();
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.jobs.key(format_args!("{{{}}}:def", def.id)))
            .arg(def_json)
            .ignore()
            .cmd("SET")
            .arg(self.jobs.key(format_args!("{{{}}}:cp", def.id)))
            .arg(cp_json)
            .ignore();
        if let Some(owner) = owner {
            pipe.cmd("SET")
                .arg(self.jobs.key(format_args!("{{{}}}:lease", def.id)))
                .arg(owner)
                .arg("PX")
                .arg(LEASE_MS)
                .ignore();
        }
        pipe.cmd("ZADD")
            .arg(self.jobs.key("index"))
            .arg(def.created_ms)
            .arg(&def.id)
            .ignore()
            .cmd("ZREMRANGEBYRANK")
            .arg(self.jobs.key("index"))
            .arg(0)
            .arg(-(super::MAX_KEPT as i64) - 1)
            .ignore();
        self.redis
            .background_pipe::<()>("warm job", &pipe)
            .await
            .is_some()
    }

    /// Job ids, newest first.
    pub async fn ids(&self) -> Option<Vec<String>> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(self.jobs.key("index")).arg(0).arg(-1).arg("REV");
        self.redis.background("warm job", &cmd).await
    }

    pub async fn definition(&self, id: &str) -> Option<Definition> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.jobs.key(format_args!("{{{id}}}:def")));
        let text: Option<String> = self.redis.background("warm job", &cmd).await?;
        serde_json::from_str(&text?).ok()
    }

    pub async fn checkpoint(&self, id: &str) -> Option<Checkpoint> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.jobs.key(format_args!("{{{id}}}:cp")));
        let text: Option<String> = self.redis.background("warm job", &cmd).await?;
        serde_json::from_str(&text?).ok()
    }

    /// Saves a checkpoint and renews `owner`'s lease. `Some(false)`: the lease is no longer
    /// ours (another instance runs the job now); `None`: Redis unavailable.
    pub async fn save(&self, id: &str, cp: &Checkpoint, owner: &str) -> Option<bool> {
        let lease = self.jobs.key(format_args!("{{{id}}}:lease"));
        let ours: i64 = self
            .redis
            .background(
                "warm lease",
                &script_cmd(RENEW, &lease, owner, Some(LEASE_MS)),
            )
            .await?;
        if ours == 0 {
            return Some(false);
        }
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.jobs.key(format_args!("{{{id}}}:cp")))
            .arg(serde_json::to_string(cp).unwrap_or_default());
        let _: Option<()> = self.redis.background("warm job", &cmd).await;
        Some(true)
    }

    /// The final checkpoint; the lease is released and the job's keys expire after a week.
    pub async fn finish(&self, id: &str, cp: &Checkpoint, owner: &str) {
        let lease = self.jobs.key(format_args!("{{{id}}}:lease"));
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.jobs.key(format_args!("{{{id}}}:cp")))
            .arg(serde_json::to_string(cp).unwrap_or_default())
            .arg("PX")
            .arg(KEEP_MS)
            .ignore()
            .cmd("PEXPIRE")
            .arg(self.jobs.key(format_args!("{{{id}}}:def")))
            .arg(KEEP_MS)
            .ignore();
        let _: Option<()> = self.redis.background_pipe("warm job", &pipe).await;
        let _: Option<i64> = self
            .redis
            .background("warm lease", &script_cmd(RELEASE, &lease, owner, None))
            .await;
    }

    /// Takes the lease of a job nobody holds. `true`: it is ours now.
    pub async fn claim(&self, id: &str, owner: &str) -> bool {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.jobs.key(format_args!("{{{id}}}:lease")))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(LEASE_MS);
        let r: Option<Option<String>> = self.redis.background("warm lease", &cmd).await;
        matches!(r, Some(Some(_)))
    }

    /// Claims a schedule's run due at `due_ms` for this fleet. `true`: start it here.
    pub async fn claim_schedule(&self, name: &str, due_ms: u64, owner: &str) -> Option<bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.schedules.key(format_args!("{name}:{due_ms}")))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(KEEP_MS);
        let r: Option<String> = self.redis.background("warm schedule", &cmd).await?;
        Some(r.is_some())
    }
}

/// `EVAL script 1 key owner [ms]` (scripts are tiny; EVAL keeps the cluster routing simple).
fn script_cmd(script: &str, key: &str, owner: &str, ms: Option<u64>) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(1).arg(key).arg(owner);
    if let Some(ms) = ms {
        cmd.arg(ms);
    }
    cmd
}
