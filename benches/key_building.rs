//! Rule matching + key building: the per-request work before a cache lookup.
//!
//! `cargo bench --bench key_building`. Reports the cost of finding the rule for a request and
//! building its cache key, for a plain rule, a rule with normalizers, and the default route.

use aisle::key::{cache_key, KeyInput};
use aisle::rules::source::RequestView;
use aisle::rules::{compile, Context};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::path::Path;

const RULES: &str = r#"
[tables.market]
map = { "new york" = "nyc", brooklyn = "nyc", manhattan = "nyc", "san francisco" = "sf-bay" }
fallback = "state"

[[rule]]
name = "wedding-timeline"
match = { method = "GET", path = "/api/weddings/:id/timeline" }
ttl = "5m"
vary = ["path.id"]
tags = ["wedding:{path.id}"]

[[rule]]
name = "vendor-search"
match = { method = "GET", path = "/api/vendors/search" }
ttl = "30m"
vary = ["query.location", "query.vendorType", "query.budget"]
normalize = { "query.location" = ["trim", "market"], "query.budget" = "bucket:1000", "query.vendorType" = "lowercase" }

[[rule]]
name = "vendor-details"
match = { method = "GET", path = "/api/vendors/:id" }
vary = ["path.id"]
"#;

fn bench(c: &mut Criterion) {
    let ups = vec!["api".to_string()];
    let ctx = Context::with_upstreams(&ups);
    let set = compile(&[(Path::new("bench.toml"), RULES)], &ctx).expect("bench rules compile");
    let headers = http::HeaderMap::new();
    let cases = [
        ("timeline", "/api/weddings/w-42/timeline"),
        ("search-normalized", "/api/vendors/search?location=Brooklyn,%20NY&vendorType=Photographer&budget=5400&utm_source=mail"),
        ("default-route", "/bench/1k/k17?v=1"),
    ];
    for (name, uri) in cases {
        let uri: http::Uri = uri.parse().unwrap();
        c.bench_function(&format!("match+key/{name}"), |b| {
            b.iter(|| {
                let m = set
                    .find(&http::Method::GET, "api.example.com", uri.path())
                    .unwrap();
                let input = KeyInput {
                    host: "api.example.com",
                    method: &http::Method::GET,
                    view: RequestView {
                        path: uri.path(),
                        query: uri.query(),
                        headers: &headers,
                        params: &m.params,
                        body: None,
                    },
                    namespace: None,
                };
                black_box(cache_key(m.rule, &input))
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
