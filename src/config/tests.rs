//! `gateway.toml` as a whole: what loads, and where each problem is reported (`file:line:col`).

use super::*;

fn load(text: &str, rules: &[(&str, &str)]) -> Result<Config, Vec<Diagnostic>> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    for (name, body) in rules {
        std::fs::write(dir.path().join("rules").join(name), body).unwrap();
    }
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path)
}

const SPEC: &str = r#"# gateway.toml
[server]
listen = "127.0.0.1:8080"          # proxy listener
admin_listen = "127.0.0.1:9090"    # /metrics, /healthz, later /admin/*
[cache]
memory = "256MiB"                  # memory tier budget, bytes with units
max_object = "8MiB"                # larger responses are passed through, not stored
rules_dir = "rules"
[upstreams.api]
url = "http://127.0.0.1:3000"      # https:// upstreams use TLS with SNI from the host
"#;

#[test]
fn spec_example_is_accepted() {
    let c = load(SPEC, &[]).unwrap();
    assert_eq!(c.cache.memory, 256 * 1024 * 1024);
    assert_eq!(c.cache.max_object, 8 * 1024 * 1024);
    assert_eq!(c.upstreams[0].address, "127.0.0.1:3000");
    assert!(!c.upstreams[0].tls);
    assert!(
        c.rules.default_route().is_some(),
        "one upstream is the default"
    );
}

/// An entry is held whole in memory and weighed in 32 bits: `max_object` over 1 GiB is refused
/// where it is written; 1 GiB itself is taken.
#[test]
fn max_object_is_at_most_one_gib() {
    let text = SPEC.replace("max_object = \"8MiB\"", "max_object = \"2GiB\"");
    let e = load(&text, &[]).unwrap_err();
    assert_eq!(e.len(), 1);
    assert!(
        e[0].to_string().contains(":14:") && e[0].message.contains("over 1GiB"),
        "{}",
        e[0]
    );
    let text = SPEC.replace("max_object = \"8MiB\"", "max_object = \"1GiB\"");
    assert_eq!(load(&text, &[]).unwrap().cache.max_object, 1 << 30);
}

#[test]
fn bad_values_are_positioned() {
    let text = SPEC.replace("\"256MiB\"", "\"lots\"");
    let e = load(&text, &[]).unwrap_err();
    assert_eq!(e.len(), 1);
    assert!(
        e[0].to_string()
            .contains("gateway.toml:6:10: bad size \"lots\""),
        "{}",
        e[0]
    );
    let text = SPEC.replace("[cache]", "[cache]\ncolour = \"red\"");
    let e = load(&text, &[]).unwrap_err();
    assert!(
        e[0].to_string().contains("gateway.toml:6:1:")
            && e[0].message.contains("unknown field `colour`"),
        "{}",
        e[0]
    );
    let text = SPEC.replace("http://127.0.0.1:3000", "ftp://x");
    assert!(load(&text, &[]).unwrap_err()[0]
        .message
        .contains("http:// or https://"));
}

#[test]
fn rules_errors_come_through() {
    let e = load(
        SPEC,
        &[(
            "b.toml",
            "[[rule]]\nname = \"x\"\nmatch = { path = \"/x\" }\nupstream = \"nope\"\n",
        )],
    )
    .unwrap_err();
    assert!(e[0].to_string().contains("b.toml:4:"), "{}", e[0]);
}

#[test]
fn redis_section() {
    let text = format!("{SPEC}[redis]\nurl = \"redis://127.0.0.1:6399\"\ntimeout = \"20ms\"\n");
    let c = load(&text, &[]).unwrap();
    let r = c.redis.unwrap();
    assert_eq!(
        (r.url.as_str(), r.prefix.as_str(), r.timeout),
        (
            "redis://127.0.0.1:6399",
            "aisle:",
            Duration::from_millis(20)
        )
    );
    let text = format!(
        "{SPEC}[redis]\ncluster = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]\n"
    );
    assert_eq!(load(&text, &[]).unwrap().redis.unwrap().cluster.len(), 2);
    let text = format!("{SPEC}[redis]\nprefix = \"x:\"\n");
    assert!(load(&text, &[]).unwrap_err()[0]
        .message
        .contains("needs url"));
    let text = format!("{SPEC}[redis]\nurl = \"http://x\"\n");
    assert!(load(&text, &[]).unwrap_err()[0]
        .to_string()
        .contains("gateway.toml:12:7: redis url"));
    let text = format!("{SPEC}[redis]\nurl = \"redis://x\"\nencryption_key = \"c2hvcnQ=\"\n");
    assert!(load(&text, &[]).unwrap_err()[0]
        .message
        .contains("32 bytes"));
    std::env::set_var(
        "AISLE_TEST_KEY",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    );
    let text =
        format!("{SPEC}[redis]\nurl = \"redis://x\"\nencryption_key = \"${{AISLE_TEST_KEY}}\"\n");
    let c = load(&text, &[]).unwrap();
    assert!(c.redis.as_ref().unwrap().keys.is_some());
    assert!(
        !format!("{:?}", c.redis).contains("AAAA"),
        "keys are never printed"
    );
}

#[test]
fn encrypt_needs_a_key() {
    let rule = "[[rule]]\nname = \"x\"\nmatch = { path = \"/x\" }\nencrypt = true\n";
    let e = load(SPEC, &[("a.toml", rule)]).unwrap_err();
    assert!(
        e[0].to_string().contains("a.toml:4:") && e[0].message.contains("encryption_key"),
        "{}",
        e[0]
    );
}

#[test]
fn https_upstreams_use_sni() {
    let (tls, a) = upstream::parse_url("https://api.vendor.example").unwrap();
    assert!(tls);
    assert_eq!(a.authority, "api.vendor.example:443");
    assert_eq!(a.host, "api.vendor.example");
    assert_eq!(a.host_header, "api.vendor.example");
    let (_, a) = upstream::parse_url("http://[::1]:8080").unwrap();
    assert_eq!(
        (a.authority.as_str(), a.host_header.as_str()),
        ("[::1]:8080", "[::1]:8080")
    );
    assert!(upstream::parse_url("http://x/path").is_err());
}

/// Two bad `[cdn.*]` values are two diagnostics, each at its own line and column.
#[test]
fn cdn_problems_are_positioned_one_each() {
    let text = format!(
        "{SPEC}[cdn.cloudflare]\nzone_id = \"\"\ntoken = \"t\"\n\n[cdn.fastly]\nservice_id = \"s\"\ntoken = \"t\"\nrate = 0\n"
    );
    let e = load(&text, &[]).unwrap_err();
    let shown: Vec<String> = e.iter().map(|d| d.to_string()).collect();
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert!(
        shown[0].ends_with("gateway.toml:12:11: [cdn.cloudflare] zone_id is empty; set it, e.g. zone_id = \"023e105f4ecef8ad9ca31a8372d0c353\""),
        "{shown:#?}"
    );
    assert!(
        shown[1].contains("gateway.toml:18:8: [cdn.fastly] rate = 0 must be a positive number"),
        "{shown:#?}"
    );
}

/// A good `[cdn.*]` table (without a `[cdn]` header) compiles into settings.
#[test]
fn cdn_settings_compile() {
    let text = format!("{SPEC}[cdn.fastly]\nservice_id = \"s\"\ntoken = \"t\"\n");
    let c = load(&text, &[]).unwrap();
    let cdn = c.cdn.expect("[cdn] configured");
    assert_eq!(cdn.fastly.unwrap().service_id, "s");
    assert!(cdn.cloudflare.is_none());
}

/// (line, col, message) of every diagnostic of [`SPEC`] followed by `extra`.
fn positions(extra: &str, rules: &[(&str, &str)]) -> Vec<(usize, usize, String)> {
    let e = load(&format!("{SPEC}{extra}"), rules).unwrap_err();
    e.into_iter().map(|d| (d.line, d.col, d.message)).collect()
}

/// Every problem points at the value it is about, not at its table or at line 0.
#[test]
fn problems_point_at_their_value() {
    // SPEC has 10 lines; `extra` starts on line 11.
    let p = positions(
        "[admin]\npurge_allow = [\"10.0.0.0/8\", \"nonsense\"]\n",
        &[],
    );
    assert_eq!((p[0].0, p[0].1), (12, 30), "{p:?}");

    let p = positions(
        "[redis]\ncluster = [\"redis://127.0.0.1:7000\", \"http://x\"]\npatch = 1\n",
        &[],
    );
    assert!(p[0].2.contains("unknown field `patch`"), "{p:?}");
    let p = positions(
        "[redis]\ncluster = [\"redis://127.0.0.1:7000\", \"http://x\"]\n",
        &[],
    );
    assert_eq!((p[0].0, p[0].1), (12, 38), "{p:?}");

    let hook =
        "[webhooks.v]\nsecret = \"s\"\nsignature = \"hmac-sha256\"\nheader = \"bad header\"\n";
    let p = positions(hook, &[]);
    assert_eq!(
        (p[0].0, p[0].1),
        (14, 10),
        "the header, not the scheme: {p:?}"
    );

    let map = "[webhooks.v]\nsecret = \"s\"\nsignature = \"github\"\n[[webhooks.v.map]]\ntype = \"event\"\nwhen = \"x\"\nfire = { event = \"e\", params = { id = \"data/id\" } }\n";
    let p = positions(map, &[]);
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!((p[0].0, p[0].1, p[1].0, p[1].1), (15, 8, 17, 39), "{p:?}");

    let map = "[webhooks.v]\nsecret = \"s\"\nsignature = \"github\"\n[[webhooks.v.map]]\ntype = \"/event\"\nwhen = \"x\"\nfire = { event = \"nope\" }\n";
    let p = positions(map, &[]);
    assert!(
        p[0].2.contains("fire.event \"nope\" is not defined"),
        "{p:?}"
    );
    assert_eq!((p[0].0, p[0].1), (17, 18), "{p:?}");
}

#[test]
fn a_missing_rules_dir_points_at_rules_dir() {
    let text = SPEC.replace("rules_dir = \"rules\"", "rules_dir = \"no-such-dir\"");
    let e = load(&text, &[]).unwrap_err();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].to_string()
            .contains("gateway.toml:8:13: cannot read the rules directory"),
        "{}",
        e[0]
    );
}

#[test]
fn trusted_networks_load_and_bad_ones_are_positioned() {
    let c = load(SPEC, &[]).unwrap();
    assert!(
        c.trust.proxies.is_empty() && c.trust.clients.is_empty(),
        "nobody is trusted by default"
    );
    let text = SPEC.replace(
        "[cache]",
        "trusted_proxies = [\"10.0.0.0/8\", \"::1\"]\ntrusted_clients = [\"192.0.2.0/24\"]\n[cache]",
    );
    let c = load(&text, &[]).unwrap();
    assert!(c.trust.proxies.contains("10.1.2.3".parse().unwrap()));
    assert!(c.trust.proxies.contains("::1".parse().unwrap()));
    assert!(c.trust.clients.contains("192.0.2.9".parse().unwrap()));
    assert!(!c.trust.clients.contains("10.1.2.3".parse().unwrap()));
    let text = SPEC.replace(
        "[cache]",
        "trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/99\"]\ntrusted_clients = [\"office\"]\n[cache]",
    );
    let e = load(&text, &[]).unwrap_err();
    let e: Vec<String> = e.iter().map(|d| d.to_string()).collect();
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e[0].contains("gateway.toml:5:34:") && e[0].contains("\"10.0.0.0/99\" is not a network"),
        "{e:?}"
    );
    assert!(
        e[1].contains("gateway.toml:6:20:") && e[1].contains("\"office\" is not a network"),
        "{e:?}"
    );
}

#[test]
fn stale_after_is_read_and_must_be_shorter_than_read_timeout() {
    let with = |v: &str| {
        SPEC.replace(
            "url = \"http://127.0.0.1:3000\"",
            &format!(
                "url = \"http://127.0.0.1:3000\"\nread_timeout = \"10s\"\nstale_after = \"{v}\""
            ),
        )
    };
    let c = load(&with("2s"), &[]).unwrap();
    assert_eq!(c.upstreams[0].stale_after, Some(Duration::from_secs(2)));
    assert_eq!(load(SPEC, &[]).unwrap().upstreams[0].stale_after, None);
    for bad in ["10s", "0s"] {
        let e = load(&with(bad), &[]).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].to_string().contains("gateway.toml:12:15:")
                && e[0].message.contains(
                    "upstreams.api.stale_after must be more than 0 and less than its read_timeout"
                ),
            "{}",
            e[0]
        );
    }
    let e = load(&with("soon"), &[]).unwrap_err();
    assert_eq!(
        e.len(),
        1,
        "one diagnostic for an unreadable duration: {e:?}"
    );
}

/// `[purge]`: the give-up horizon and backoff (issue 10 item 4), the lease and instance id (item
/// 5); defaults, and a bad duration reported at its value.
#[test]
fn purge_settings_and_their_defaults() {
    let c = load(SPEC, &[]).unwrap();
    assert_eq!(c.purge.give_up_after, Duration::from_secs(86_400));
    assert_eq!(c.purge.max_attempts, None, "max_attempts is opt-in");
    assert_eq!(c.purge.backoff_base, Duration::from_millis(500));
    assert_eq!(c.purge.backoff_max, Duration::from_secs(60));
    assert_eq!(c.purge.lease, Duration::from_secs(15));
    assert_eq!(c.purge.instance_id, None);
    let c = load(
        &format!(
            "{SPEC}[purge]\ngive_up_after = \"2h\"\nmax_attempts = 5\nbackoff_base = \"50ms\"\n\
             backoff_max = \"5s\"\nlease = \"10s\"\ninstance_id = \"gw-1\"\n"
        ),
        &[],
    )
    .unwrap();
    assert_eq!(c.purge.give_up_after, Duration::from_secs(7200));
    assert_eq!(c.purge.max_attempts, Some(5));
    assert_eq!(c.purge.backoff_base, Duration::from_millis(50));
    assert_eq!(c.purge.backoff_max, Duration::from_secs(5));
    assert_eq!(c.purge.lease, Duration::from_secs(10));
    assert_eq!(c.purge.instance_id.as_deref(), Some("gw-1"));
    let p = positions("[purge]\ngive_up_after = \"soon\"\n", &[]);
    assert_eq!((p[0].0, p[0].1), (12, 17), "{p:?}");
    assert!(p[0].2.contains("bad duration"), "{p:?}");
}

/// `[server]`'s listener settings: the defaults, and each bad value reported where it is.
#[test]
fn listener_settings_defaults_and_errors() {
    let c = load(SPEC, &[]).unwrap();
    assert_eq!(c.listener, ListenerConfig::default());
    assert_eq!(c.listener.header_timeout, Duration::from_secs(10));
    assert_eq!(c.listener.keepalive_timeout, Duration::from_secs(60));
    assert_eq!(c.listener.max_connections, 10_000);
    assert_eq!(c.listener.max_connections_per_client, 0);

    let set = |extra: &str| {
        SPEC.replace(
            "admin_listen = \"127.0.0.1:9090\"    # /metrics, /healthz, later /admin/*\n",
            &format!("admin_listen = \"127.0.0.1:9090\"\n{extra}\n"),
        )
    };
    let c = load(
        &set("header_timeout = \"2s\"\nkeepalive_timeout = \"1500ms\"\nmax_connections = 5\nmax_connections_per_client = 2\nh2c = true"),
        &[],
    )
    .unwrap();
    assert_eq!(c.listener.header_timeout, Duration::from_secs(2));
    assert_eq!(
        c.listener.keepalive_timeout,
        Duration::from_secs(2),
        "whole seconds, rounded up"
    );
    assert_eq!(c.listener.max_connections, 5);
    assert_eq!(c.listener.max_connections_per_client, 2);
    assert!(c.listener.h2c);

    let e = load(&set("header_timeout = \"0s\""), &[]).unwrap_err();
    assert!(e[0].message.contains("header_timeout cannot be 0"), "{e:?}");
    assert_eq!(e[0].line, 5);
    let e = load(&set("max_connections = -1"), &[]).unwrap_err();
    assert!(
        e[0].message.contains("max_connections = -1 is negative"),
        "{e:?}"
    );
    let e = load(
        &set("tls = { cert = \"missing.pem\", key = \"missing.key\" }"),
        &[],
    )
    .unwrap_err();
    assert!(
        e[0].message.contains("[server] tls: cannot read cert")
            && e[0].message.contains("missing.pem"),
        "{e:?}"
    );
    assert_eq!(e[0].line, 5);
}

/// `[upstreams.*]` from issue 13: what loads, and each mistake at its own position.
#[test]
fn upstream_pools_headers_and_tls_files() {
    std::env::set_var("AISLE_TEST_UPSTREAM_SECRET", "sk-unit-4b3a2c1d");
    let ok = SPEC.replace(
        "url = \"http://127.0.0.1:3000\"      # https:// upstreams use TLS with SNI from the host",
        "urls = [\"http://127.0.0.1:3000\", \"http://127.0.0.1:3001\"]\nhost = \"API.Vendor.example\"\n\
         set_headers = { \"X-API-Key\" = \"${AISLE_TEST_UPSTREAM_SECRET}\" }\nremove_headers = [\"cookie\"]\n\
         balance = \"least_conn\"\nhealth_check = { path = \"/health\", interval = \"2s\" }\n\
         resolve_every = \"30s\"\nretries = 2\nmax_connections = 8",
    );
    let c = load(&ok, &[]).unwrap();
    let u = &c.upstreams[0];
    assert_eq!(u.addresses.len(), 2);
    assert_eq!(u.host.as_deref(), Some("api.vendor.example"));
    assert_eq!(u.set_headers[0].value.expose(), "sk-unit-4b3a2c1d");
    assert_eq!(
        (
            u.set_headers[0].name.as_str(),
            u.set_headers[0].spelling.as_str()
        ),
        ("x-api-key", "X-API-Key"),
        "the name is matched case-insensitively and sent as written"
    );
    assert_eq!(u.balance, Balance::LeastConn);
    let hc = u.health_check.as_ref().unwrap();
    assert_eq!(
        (hc.path.as_str(), hc.interval),
        ("/health", Duration::from_secs(2))
    );
    assert_eq!(
        (hc.timeout, hc.unhealthy_after, hc.healthy_after),
        (Duration::from_secs(1), 3, 2)
    );
    assert_eq!((u.retries, u.max_connections), (2, Some(8)));
    assert!(
        !format!("{c:?}").contains("sk-unit-4b3a2c1d"),
        "a set_headers value is never printed"
    );

    let bad = SPEC.replace(
        "url = \"http://127.0.0.1:3000\"      # https:// upstreams use TLS with SNI from the host",
        "url = \"http://127.0.0.1:3000\"\nset_headers = { \"x-key\" = \"${AISLE_TEST_UPSTREAM_SECRET}\\nevil\" }\n\
         balance = \"fastest\"\nca_file = \"missing.pem\"\nclient_key = \"k.pem\"",
    );
    let e = load(&bad, &[]).unwrap_err();
    let text: Vec<String> = e.iter().map(|d| d.to_string()).collect();
    let all = text.join("\n");
    assert!(
        !all.contains("sk-unit-4b3a2c1d"),
        "diagnostics never quote a secret: {all}"
    );
    for expected in [
        "set_headers.x-key",
        "\"fastest\" is not a balance",
        "ca_file applies to https upstreams only",
        "client_cert and client_key go together",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }

    let https = SPEC.replace(
        "url = \"http://127.0.0.1:3000\"      # https:// upstreams use TLS with SNI from the host",
        "url = \"https://vendor.example\"\nca_file = \"missing.pem\"",
    );
    let e = load(&https, &[]).unwrap_err();
    assert!(
        e[0].message.contains("cannot read") && e[0].message.contains("missing.pem"),
        "{}",
        e[0]
    );
    let both = SPEC.replace(
        "url = \"http://127.0.0.1:3000\"      # https:// upstreams use TLS with SNI from the host",
        "url = \"http://a:1\"\nurls = [\"http://b:1\"]",
    );
    assert!(load(&both, &[]).unwrap_err()[0]
        .message
        .contains("both url and urls"));
}
