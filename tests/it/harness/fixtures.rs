//! Rule fixtures: every rules file the integration tests give a gateway (or `aisle check`),
//! named in one place.
//!
//! Several areas test the same rules (the vendor search, the market table, the chat rule, the
//! availability event, a catch-all); each such piece is written once below as a macro that
//! expands to a string literal, and the rule sets are assembled from the pieces with `concat!`,
//! so that they stay `&'static str` constants a test passes as `("rules.toml", SET)`. A set
//! used by one area only is still kept here, next to the pieces it could share, so that a new
//! test looks here first before writing another copy.
//!
//! The tests assert on the rule names and paths below (`rule="vendor-search"` in metrics,
//! `/swr/rule` in requests, ...): renaming one here means updating those tests.

// ---------------------------------------------------------------------------
// Pieces shared by several sets
// ---------------------------------------------------------------------------

/// The vendor search: a GET keyed on three query parameters (location through the `market`
/// table, budget bucketed), tagged, invalidated by the `vendor_update` event. Its keys end the
/// expansion, so a set may append more keys to this rule right after it.
macro_rules! vendor_search_rule {
    () => {
        r#"
[[rule]]
name = "vendor-search"
match = { method = "GET", path = "/api/vendors/search" }
upstream = "api"
ttl = "30m"
vary = ["query.location", "query.vendorType", "query.budget"]
normalize = { "query.location" = ["trim", "lowercase", "market"], "query.budget" = "bucket:1000" }
tags = ["vendors", "vendor-type:{query.vendorType}"]
invalidate_on = ["vendor_update"]
"#
    };
}

/// The `market` lookup table used by the `market` normalizer: New York and Brooklyn are one
/// market; anything else falls back to its state.
macro_rules! market_table {
    () => {
        r#"
[tables.market]
map = { "new york" = "nyc", "brooklyn" = "nyc" }
fallback = "state"
"#
    };
}

/// An OpenAI-style chat completion keyed on its whole JSON body minus the fields that do not
/// change the answer.
macro_rules! chat_rule {
    () => {
        r#"
[[rule]]
name = "chat"
match = { method = "POST", path = "/v1/chat/completions" }
upstream = "openai"
ttl = "1h"
body_key = { all = true, ignore = ["/user", "/metadata", "/stream_options"] }
"#
    };
}

/// The `availability_changed` webhook event: invalidates the `availability_change` event
/// name and the vendor's tag, and purges the CDN too.
macro_rules! availability_event {
    () => {
        r#"
[[event]]
name = "availability_changed"
invalidates = ["availability_change", "vendor:{vendorId}"]
cdn = true
"#
    };
}

/// A catch-all rule named `everything` for `$method` (a string literal) on upstream `api`.
macro_rules! everything_rule {
    ($method:literal) => {
        concat!(
            r#"
[[rule]]
name = "everything"
match = { method = ""#,
            $method,
            r#"", path = "/*" }
upstream = "api"
ttl = "60s"
"#
        )
    };
}

// ---------------------------------------------------------------------------
// Rule sets
// ---------------------------------------------------------------------------

/// `caching`: the vendor search, a slow path, a path parameter in the key, `Set-Cookie`
/// handling, a rule TTL against the origin's `no-store`/`private`, and a `cache = false` rule.
pub const CACHING_RULES: &str = concat!(
    vendor_search_rule!(),
    r#"
[[rule]]
name = "slow"
match = { method = "GET", path = "/api/slow" }
upstream = "api"
ttl = "5m"

[[rule]]
name = "item-reviews"
match = { method = "GET", path = "/api/items/:id/reviews" }
upstream = "api"
ttl = "10m"
vary = ["path.id"]

[[rule]]
name = "cookie-default"
match = { method = "GET", path = "/cookie/default" }
upstream = "api"
ttl = "10m"

[[rule]]
name = "cookie-allowed"
match = { method = "GET", path = "/cookie/allowed" }
upstream = "api"
ttl = "10m"
cache_set_cookie = true

[[rule]]
name = "ttl-vs-no-store"
match = { method = "GET", path = "/rule/no-store" }
upstream = "api"
ttl = "10m"

[[rule]]
name = "ttl-vs-private"
match = { method = "GET", path = "/rule/private" }
upstream = "api"
ttl = "10m"

[[rule]]
name = "uncached"
match = { method = "GET", path = "/rule/uncached" }
upstream = "api"
cache = false
"#,
    market_table!(),
);

/// `check_cli`: a valid rules file using most of what `aisle check` validates (stale
/// windows, several methods, header and cookie sources, a host, every normalizer kind).
pub const CHECKED_RULES: &str = concat!(
    vendor_search_rule!(),
    // Two more keys of the vendor-search rule above.
    r#"stale_while_revalidate = "1m"
stale_if_error = "1h"
"#,
    r#"
[[rule]]
name = "vendor"
match = { method = ["GET", "HEAD"], path = "/api/vendors/:id" }
upstream = "api"
ttl = "5m"
vary = ["path.id", "header.accept-language", "cookie.currency"]
normalize = { "path.id" = "lowercase", "cookie.currency" = "uppercase" }

[[rule]]
name = "writes"
match = { method = "POST", path = "/api/*" }
upstream = "api"
cache = false

[[rule]]
name = "api-rest"
match = { method = "GET", host = "api.example.test", path = "/api/*" }
upstream = "api"
ttl = "1m"
cache_set_cookie = true
vary = ["query.tags", "query.season", "query.q"]
normalize = { "query.tags" = "sorted_list", "query.season" = "season", "query.q" = "text" }
"#,
    market_table!(),
);

/// `ai_caching`: recommendations keyed on chosen JSON body fields (normalised, with a cost
/// model), and the chat rule; upstreams `ai` and `openai`.
pub const AI_RULES: &str = concat!(
    r#"
[[rule]]
name = "ai-recommendations"
match = { method = "POST", path = "/api/ai/recommendations" }
upstream = "ai"
ttl = "10m"
vary = ["body./query/type", "body./query/content", "body./weddingContext/location/city", "body./weddingContext/budgetRange", "body./weddingContext/weddingDate"]
normalize = { "body./weddingContext/location/city" = "market", "body./weddingContext/weddingDate" = "season", "body./query/content" = "text" }
cost = { per_request = 0.002, tokens = "/usage/total_tokens", per_1k_tokens = 0.01 }
"#,
    chat_rule!(),
    market_table!(),
);

/// `ai_streaming`: the chat rule alone (upstream `openai`).
pub const CHAT_RULES: &str = chat_rule!();

/// `cdn_pipeline`: every GET cached for 60 s.
pub const EVERYTHING_GET_RULES: &str = everything_rule!("GET");

/// `invalidation`: tagged vendor pages invalidated by the availability event (with a stale
/// window), a rule that keeps its tag headers, and a catch-all for every method.
pub const INVALIDATION_RULES: &str = concat!(
    availability_event!(),
    r#"
[[rule]]
name = "vendor"
match = { method = "GET", path = "/api/vendors/:id" }
upstream = "api"
ttl = "60s"
tags = ["vendors", "vendor:{path.id}"]
invalidate_on = ["availability_change"]
stale_while_revalidate = "1m"

[[rule]]
name = "kept"
match = { method = "GET", path = "/api/kept/*" }
upstream = "api"
ttl = "60s"
keep_tag_headers = true
"#,
    everything_rule!("*"),
);

/// `webhooks`: the availability event, and three rules it reaches differently (by tag, by
/// event name, not at all).
pub const WEBHOOK_RULES: &str = concat!(
    availability_event!(),
    r#"
[[rule]]
name = "vendor"
match = { method = "GET", path = "/api/vendors/:id" }
upstream = "api"
ttl = "60s"
tags = ["vendor:{path.id}"]

[[rule]]
name = "availability"
match = { method = "GET", path = "/api/availability/:id" }
upstream = "api"
ttl = "60s"
invalidate_on = ["availability_change"]

[[rule]]
name = "venue"
match = { method = "GET", path = "/api/venues/:id" }
upstream = "api"
ttl = "60s"
tags = ["venue:{path.id}"]
"#,
);

/// `attacks::exhaustion`: the vendor search (tagged `vendor-type:{query.vendorType}`), an event
/// purging that tag by parameter, and `/t/*` tagged three times with the request's `query.v`;
/// the availability event, for the webhooks the same gateway configures.
pub const EXHAUSTION_RULES: &str = concat!(
    availability_event!(),
    vendor_search_rule!(),
    market_table!(),
    r#"
[[event]]
name = "vendor_type_changed"
invalidates = ["vendor-type:{type}"]

[[rule]]
name = "tagged"
match = { method = "GET", path = "/t/*" }
upstream = "api"
ttl = "10m"
tags = ["a:{query.v}", "b:{query.v}", "c:{query.v}"]
"#,
);

/// `redis_encryption`: `/s/*` stored encrypted in Redis, `/p/*` in the clear.
pub const ENCRYPTION_RULES: &str = r#"
[[rule]]
name = "secret"
match = { method = "GET", path = "/s/*" }
upstream = "api"
ttl = "60s"
encrypt = true

[[rule]]
name = "public"
match = { method = "GET", path = "/p/*" }
upstream = "api"
ttl = "60s"
"#;

/// `stale`: a 2 s rule with a minute of stale-while-revalidate, and a 1 s rule with an hour of
/// stale-if-error.
pub const STALE_RULES: &str = r#"
[[rule]]
name = "swr"
match = { method = "GET", path = "/swr/rule" }
upstream = "api"
ttl = "2s"
stale_while_revalidate = "1m"

[[rule]]
name = "sie"
match = { method = "GET", path = "/sie/rule" }
upstream = "api"
ttl = "1s"
stale_if_error = "1h"
"#;

/// The shared-tier scenarios (`redis_tier`, `redis_cluster`, `ai_caching`'s fleet): `/r/*`
/// for 60 s, with stale windows.
pub const SHARED_TIER_RULES: &str = r#"
[[rule]]
name = "shared"
match = { method = "GET", path = "/r/*" }
upstream = "api"
ttl = "60s"
stale_while_revalidate = "10s"
stale_if_error = "30s"
"#;
