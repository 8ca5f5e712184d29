//! Upstream quotas (`[upstreams.NAME] quota`): how many requests may go to a vendor, counted
//! where they go, fleet-wide.
//!
//! Only requests that actually go upstream count: the token is taken in
//! `proxy_upstream_filter`, which pingora calls once per request about to go upstream (a miss,
//! an expired entry's refetch, a revalidation), never for a hit, a request that waited on
//! another's fill (cache lock follower) or an answer served stale; connection retries do not
//! count again. A request kept from the upstream is answered there, so the client connection
//! is kept (an error raised later, in `upstream_peer`, would make pingora drop it).
//!
//! The count is a GCRA (one "theoretical arrival time" per upstream) in one Lua script on the
//! shared Redis, run atomically there and timed by Redis's own clock (`TIME`), so instances
//! with skewed clocks share one bucket and no read-then-write race lets two of them take the
//! last token. When Redis is absent or unavailable, each instance counts alone with the
//! limit divided by `fleet_size`, so a fleet that loses Redis stays within the quota.
//!
//! Exhausted, `on_exhausted = "stale"` answers from any stored entry, however old: a stale
//! entry looks at the quota in `cache_hit_filter` ([`Quotas::exhausted_for_stale`], without
//! taking), before pingora's own stale windows could rule it out, and is served as it is when
//! nothing is left. Otherwise (nothing stored, or the last token went between that look and the
//! take, a window of one Redis round trip) the answer is 429 with `Retry-After`; `"reject"`
//! answers 429 at once. Background fills (subrequests: revalidations, `stale_after` fills)
//! yield to client traffic: they go only while at least `burst / 2` tokens would remain.
//!
//! Shaped as one struct the gateway holds plus three small functions the hooks call, so the
//! hooks in `proxy/mod.rs` stay one line each.

use super::cache_status::{CacheStatus, Fwd};
use super::Ctx;
use crate::config::upstream::{OnExhausted, Quota, Upstream};
use crate::metrics::CacheOutcome;
use crate::redis::{Keyspace, Redis};
use bytes::Bytes;
use once_cell::sync::Lazy;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use prometheus::{register_int_counter_vec, register_int_gauge_vec, IntCounterVec, IntGaugeVec};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `aisle_upstream_quota_remaining{upstream}`: requests the quota allows now (after the last
/// check; names come from the config only).
static REMAINING: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "aisle_upstream_quota_remaining",
        "Requests the upstream's quota allows now, as of its last check",
        &["upstream"]
    )
    .expect("register aisle_upstream_quota_remaining")
});

/// `aisle_upstream_quota_rejections_total{upstream}`: requests kept from the upstream.
static REJECTIONS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "aisle_upstream_quota_rejections_total",
        "Requests kept from the upstream by its quota (answered stale or 429)",
        &["upstream"]
    )
    .expect("register aisle_upstream_quota_rejections_total")
});

/// GCRA on Redis's clock. KEYS[1]: the upstream's arrival time (µs). ARGV: the interval
/// between two requests (µs), the burst, the tokens that must remain after this one, 1 to take
/// (0 to look only). Returns {allowed, remaining, retry after (ms)}.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = interval * tonumber(ARGV[2])
local reserve = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local left = math.floor((now + tau - new_tat) / interval)
if left < reserve then
  local wait = new_tat + reserve * interval - tau - now
  return {0, math.max(left + 1, 0), math.ceil(wait / 1000)}
end
if ARGV[4] == '1' then
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(tau / 1000) + 1000)
  return {1, left, 0}
end
return {1, left + 1, 0}
"#;

/// What the quota decided for this request.
#[derive(Debug, Default)]
pub struct QuotaCtx {
    /// Answered from a stored entry because the quota is used up.
    pub exhausted: bool,
}

/// One check's outcome.
struct Verdict {
    allowed: bool,
    remaining: i64,
    retry_after: Duration,
}

/// The quotas of every upstream: on Redis when there is one, else (and while it is down) here.
pub struct Quotas {
    redis: Option<(Arc<Redis>, Keyspace)>,
    /// Per upstream name: the local arrival time, µs after `epoch`.
    local: parking_lot::Mutex<HashMap<String, u64>>,
    epoch: Instant,
}

impl Quotas {
    /// `redis`: the shared connection (`None`: every instance counts alone). `Err`: the
    /// keyspace clashes with another domain's.
    pub fn new(redis: Option<Arc<Redis>>) -> Result<Arc<Self>, String> {
        let redis = match redis {
            Some(r) => {
                let keys = r.keyspace("upstream quotas", "quota:")?;
                Some((r, keys))
            }
            None => None,
        };
        Ok(Arc::new(Quotas {
            redis,
            local: parking_lot::Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }))
    }

    /// Takes (or, `take` false, only looks for) a token of `upstream`'s quota, keeping
    /// `reserve` tokens.
    async fn check(&self, upstream: &Upstream, q: &Quota, reserve: u64, take: bool) -> Verdict {
        let interval_us = (q.per.as_micros() / u128::from(q.requests)).max(1) as u64;
        if let Some((redis, keys)) = &self.redis {
            let cmd = redis::cmd("EVAL")
                .arg(GCRA)
                .arg(1)
                .arg(keys.key(&upstream.name))
                .arg(interval_us)
                .arg(q.burst)
                .arg(reserve)
                .arg(if take { "1" } else { "0" })
                .clone();
            if let Some(v) = redis.request::<Vec<i64>>("quota", &cmd).await {
                if let [allowed, remaining, wait_ms] = v[..] {
                    return Verdict {
                        allowed: allowed == 1,
                        remaining,
                        retry_after: Duration::from_millis(wait_ms.max(0) as u64),
                    };
                }
            }
        }
        // This instance's share: the rate and the burst divided by the fleet.
        let fleet = u64::from(q.fleet_size);
        let interval = interval_us.saturating_mul(fleet);
        let burst = (q.burst / fleet).max(1);
        let reserve = reserve / fleet;
        let now = self.epoch.elapsed().as_micros() as u64;
        let mut local = self.local.lock();
        let tat = local.get(&upstream.name).copied().unwrap_or(0).max(now);
        gcra(now, tat, interval, burst, reserve, |new| {
            if take {
                local.insert(upstream.name.clone(), new);
            }
        })
    }

    /// In `cache_hit_filter`, for a stale entry about to be refetched by a client request:
    /// whether the quota (`on_exhausted = "stale"`) has nothing left, so the entry is to be
    /// served as it is. Looks only: the request takes its token in `proxy_upstream_filter`.
    pub async fn exhausted_for_stale(&self, session: &Session, ctx: &mut Ctx) -> bool {
        let live = ctx.live.clone();
        let upstream = &live.config.upstreams[ctx.rule().upstream];
        let Some(q) = upstream.quota.as_ref() else {
            return false;
        };
        if q.on_exhausted != OnExhausted::Stale || session.subrequest_ctx.is_some() {
            return false;
        }
        let v = self.check(upstream, q, 0, false).await;
        REMAINING
            .with_label_values(&[&upstream.name])
            .set(v.remaining);
        if v.allowed {
            return false;
        }
        REJECTIONS.with_label_values(&[&upstream.name]).inc();
        ctx.quota.exhausted = true;
        true
    }

    /// In `proxy_upstream_filter`: takes this request's token; `Err(seconds)` (until one
    /// frees up) keeps it from the upstream (see [`answer`]). Background fills keep
    /// `burst / 2` for client traffic.
    pub async fn take(&self, session: &Session, ctx: &mut Ctx) -> Result<(), u64> {
        let live = ctx.live.clone();
        let upstream = &live.config.upstreams[ctx.rule().upstream];
        let Some(q) = upstream.quota.as_ref() else {
            return Ok(());
        };
        let reserve = if session.subrequest_ctx.is_some() {
            q.burst / 2
        } else {
            0
        };
        let v = self.check(upstream, q, reserve, true).await;
        REMAINING
            .with_label_values(&[&upstream.name])
            .set(v.remaining);
        if v.allowed {
            return Ok(());
        }
        REJECTIONS.with_label_values(&[&upstream.name]).inc();
        Err(v.retry_after.as_millis().div_ceil(1000).max(1) as u64)
    }
}

/// GCRA at `now` with arrival time `tat` (both µs): allowed while at least `reserve` tokens
/// remain after this one; `store` gets the new arrival time when allowed.
fn gcra(
    now: u64,
    tat: u64,
    interval: u64,
    burst: u64,
    reserve: u64,
    store: impl FnOnce(u64),
) -> Verdict {
    let tau = interval.saturating_mul(burst);
    let new_tat = tat.max(now) + interval;
    // Tokens left after this one: (now + tau - new_tat) / interval, possibly negative.
    let room = (now + tau) as i128 - new_tat as i128;
    let left = room.div_euclid(interval as i128) as i64;
    if left < reserve as i64 {
        let wait = new_tat as i128 + (reserve * interval) as i128 - (now + tau) as i128;
        return Verdict {
            allowed: false,
            remaining: (left + 1).max(0),
            retry_after: Duration::from_micros(wait.max(0) as u64),
        };
    }
    store(new_tat);
    Verdict {
        allowed: true,
        remaining: left,
        retry_after: Duration::ZERO,
    }
}

/// The 429 with `Retry-After` (`seconds`) for a request the quota kept from the upstream
/// (nothing stored could answer it, or `on_exhausted = "reject"`). The client connection is
/// kept: this is an answer, not a failure.
pub async fn answer(session: &mut Session, ctx: &mut Ctx, seconds: u64) -> pingora::Result<()> {
    // The access log and the outcome metric say what the header says (counted as a miss:
    // nothing stored answered it).
    let status = CacheStatus {
        fwd: Some(Fwd::Miss),
        detail: Some("quota-exhausted"),
        ..CacheStatus::default()
    };
    let header = status.to_header_value();
    ctx.answered = Some((status, CacheOutcome::Miss));
    let live = ctx.live.clone();
    let upstream = &live.config.upstreams[ctx.rule().upstream].name;
    let body = serde_json::json!({
        "error": format!(
            "the request quota of upstream {upstream:?} is used up and nothing stored may \
             answer this request; retry after {seconds}s (or raise upstreams.{upstream}.quota)"
        ),
    })
    .to_string();
    let mut resp = ResponseHeader::build(429, Some(5))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(http::header::RETRY_AFTER, seconds.to_string())?;
    resp.insert_header(&super::cache_status::HEADER, header)?;
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `n` takes at `now` from `tat`, returning how many were allowed and the final tat.
    fn takes(
        n: u32,
        now: u64,
        mut tat: u64,
        interval: u64,
        burst: u64,
        reserve: u64,
    ) -> (u32, u64) {
        let mut allowed = 0;
        for _ in 0..n {
            let v = gcra(now, tat.max(now), interval, burst, reserve, |t| tat = t);
            allowed += u32::from(v.allowed);
        }
        (allowed, tat)
    }

    #[test]
    fn a_burst_then_one_per_interval() {
        // 10 per minute, burst 10: 10 at once, then the 11th waits one interval (6 s).
        let (allowed, tat) = takes(30, 1_000_000, 0, 6_000_000, 10, 0);
        assert_eq!(allowed, 10);
        let v = gcra(1_000_000, tat, 6_000_000, 10, 0, |_| {});
        assert!(!v.allowed);
        assert_eq!(v.remaining, 0);
        assert_eq!(v.retry_after, Duration::from_secs(6));
        // One interval later, exactly one more.
        let (allowed, _) = takes(5, 7_000_000, tat, 6_000_000, 10, 0);
        assert_eq!(allowed, 1);
    }

    #[test]
    fn background_fills_keep_half_the_burst() {
        let (allowed, tat) = takes(30, 0, 0, 1_000, 10, 5);
        assert_eq!(allowed, 5, "a background fill leaves 5 of 10 for clients");
        let (allowed, _) = takes(30, 0, tat, 1_000, 10, 0);
        assert_eq!(allowed, 5, "clients still get the rest");
    }

    #[test]
    fn remaining_counts_down() {
        let mut tat = 0;
        let left: Vec<i64> = (0..3)
            .map(|_| gcra(0, tat, 100, 3, 0, |t| tat = t).remaining)
            .collect();
        assert_eq!(left, vec![2, 1, 0]);
    }
}
