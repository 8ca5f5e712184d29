//! `[region]` and `[[region.peer]]`: which region this gateway's fleet is, and the other regions
//! whose fleets its invalidations must reach (through each peer's own Redis).
//!
//! Parsed here, apart from `mod.rs`, like `[[season]]` and `[[protection]]`: the table as written
//! ([`RawRegion`]) is checked into a [`RegionConfig`] with one positioned diagnostic per problem
//! (a region without its own `[redis]`, names that are not label-safe, duplicate names, a peer
//! named like this region, a peer without `redis`, a peer whose Redis and prefix are this
//! region's own). A region's name ends up in metric labels, Redis keys and audit records, so it
//! is held to a small alphabet. The peer's URL may come from `${ENV}` (it can carry a password)
//! and is printed redacted.

use super::{redis_url, RedisConfig};
use crate::diag::{Diagnostic, SourceFile};
use serde::Deserialize;
use toml::Spanned;

/// `[region]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegion {
    name: Option<Spanned<String>>,
    #[serde(default)]
    peer: Vec<Spanned<RawPeer>>,
}

/// `[[region.peer]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Option<Spanned<String>>,
    redis: Option<Spanned<String>>,
    /// The peer region's `[redis] prefix`, when it differs from this region's.
    prefix: Option<Spanned<String>>,
}

/// This gateway's region and its peers.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionConfig {
    pub name: String,
    pub peers: Vec<PeerConfig>,
}

/// Another region: its name and how to reach its Redis.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub name: String,
    /// The peer region's Redis (its `url` and `prefix`; this region's `timeout`, no keys).
    pub redis: RedisConfig,
}

impl PartialEq for PeerConfig {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.redis.url == other.redis.url
            && self.redis.prefix == other.redis.prefix
            && self.redis.timeout == other.redis.timeout
    }
}

/// Longest region name (it is a metric label and part of Redis keys).
const MAX_NAME: usize = 64;

/// A region name: 1 to 64 of `a-z`, `0-9`, `-`, `_`, `.`.
fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

fn check_name(
    src: &SourceFile<'_>,
    what: &str,
    name: &Spanned<String>,
    diags: &mut Vec<Diagnostic>,
) -> bool {
    if name_ok(name.get_ref()) {
        return true;
    }
    diags.push(src.at(
        name.span(),
        format!(
            "{what} name {:?} must be 1 to {MAX_NAME} characters of a-z, 0-9, '-', '_' or '.' \
             (it is a metric label and part of Redis keys), like \"us-east\"",
            name.get_ref()
        ),
    ));
    false
}

/// Checks `[region]` against this gateway's own `[redis]` (`own`; `None`: not configured).
pub(super) fn compile(
    src: &SourceFile<'_>,
    raw: &Spanned<RawRegion>,
    own: Option<&RedisConfig>,
    own_redis_written: bool,
    diags: &mut Vec<Diagnostic>,
) -> Option<RegionConfig> {
    let before = diags.len();
    let r = raw.get_ref();
    if !own_redis_written {
        diags.push(src.at(
            raw.span(),
            "[region] needs this region's own [redis]: relayed invalidations are kept in its \
             streams and applied to its fleet through it; add [redis] url = \"redis://...\"",
        ));
    }
    let name = match &r.name {
        None => {
            diags.push(src.at(
                raw.span(),
                "[region] needs name = \"...\", this region's name, like \"us-east\"",
            ));
            None
        }
        Some(n) => check_name(src, "[region]", n, diags).then(|| n.get_ref().clone()),
    };
    if r.peer.is_empty() {
        diags.push(src.at(
            raw.span(),
            "[region] has no [[region.peer]]: name each other region and its Redis \
             ([[region.peer]] name = \"eu-west\", redis = \"redis://...\"), or remove [region]",
        ));
    }
    let mut peers: Vec<PeerConfig> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for p in &r.peer {
        let peer = p.get_ref();
        let Some(pname) = &peer.name else {
            diags.push(src.at(
                p.span(),
                "[[region.peer]] needs name = \"...\", the other region's [region] name",
            ));
            continue;
        };
        if !check_name(src, "[[region.peer]]", pname, diags) {
            continue;
        }
        let pn = pname.get_ref();
        if name.as_deref() == Some(pn.as_str()) {
            diags.push(src.at(
                pname.span(),
                format!(
                    "[[region.peer]] {pn:?} is this region's own name: a peer is another \
                     region (this one relays to itself through nothing)"
                ),
            ));
            continue;
        }
        if seen.contains(pn) {
            diags.push(src.at(
                pname.span(),
                format!("[[region.peer]] {pn:?} is listed twice; give each region once"),
            ));
            continue;
        }
        seen.push(pn.clone());
        let Some(url) = &peer.redis else {
            diags.push(src.at(
                p.span(),
                format!(
                    "[[region.peer]] {pn:?} needs redis = \"redis://host:port\" (that region's \
                     own Redis, where its inbound relay stream lives; \"${{VAR}}\" reads it from \
                     the environment)"
                ),
            ));
            continue;
        };
        let Some(url) = redis_url(src, url.span(), url.get_ref(), diags) else {
            continue;
        };
        let prefix = match (&peer.prefix, own) {
            (Some(p), _) => p.get_ref().clone(),
            (None, Some(o)) => o.prefix.clone(),
            (None, None) => "aisle:".to_string(),
        };
        if let Some(o) = own {
            if o.url == url && o.prefix == prefix {
                diags.push(src.at(
                    peer.redis.as_ref().map_or(p.span(), |u| u.span()),
                    format!(
                        "[[region.peer]] {pn:?} uses this region's own Redis and prefix: its \
                         relay stream would be this region's; give the peer region's Redis (or \
                         its prefix = \"...\")"
                    ),
                ));
                continue;
            }
        }
        peers.push(PeerConfig {
            name: pn.clone(),
            redis: RedisConfig {
                url,
                cluster: Vec::new(),
                prefix,
                timeout: own.map_or(std::time::Duration::from_millis(50), |o| o.timeout),
                keys: None,
            },
        });
    }
    if diags.len() > before {
        return None;
    }
    Some(RegionConfig { name: name?, peers })
}

#[cfg(test)]
mod tests {
    use super::name_ok;
    use crate::config::Config;

    const BASE: &str = "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:9090\"\n\
                        [upstreams.api]\nurl = \"http://127.0.0.1:3000\"\n";
    const REDIS: &str = "[redis]\nurl = \"redis://127.0.0.1:7001\"\n";

    /// The diagnostics of `gateway.toml` = BASE + `text`, as `file:line:col: message` lines
    /// without the directory.
    fn problems(text: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, format!("{BASE}{text}")).unwrap();
        match Config::load(&path) {
            Ok(_) => Vec::new(),
            Err(d) => d
                .iter()
                .map(|d| {
                    d.to_string()
                        .replace(&format!("{}/", dir.path().display()), "")
                })
                .collect(),
        }
    }

    #[test]
    fn a_region_loads_with_its_peers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            format!(
                "{BASE}{REDIS}prefix = \"a:\"\n[region]\nname = \"us-east\"\n\
                 [[region.peer]]\nname = \"eu-west\"\nredis = \"${{AISLE_TEST_UNSET_EU_REDIS:-redis://:pw@127.0.0.1:7002}}\"\n\
                 [[region.peer]]\nname = \"ap-south\"\nredis = \"redis://127.0.0.1:7001\"\nprefix = \"ap:\"\n"
            ),
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        let r = c.region.unwrap();
        assert_eq!(r.name, "us-east");
        assert_eq!(r.peers.len(), 2);
        assert_eq!(r.peers[0].redis.url, "redis://:pw@127.0.0.1:7002");
        assert_eq!(r.peers[0].redis.prefix, "a:", "the own prefix by default");
        assert_eq!(r.peers[1].redis.prefix, "ap:");
        assert!(
            !format!("{:?}", r.peers[0]).contains("pw"),
            "the peer URL's password is redacted"
        );
    }

    #[test]
    fn region_problems_are_positioned() {
        let p = problems("[region]\nname = \"us-east\"\n[[region.peer]]\nname = \"eu\"\nredis = \"redis://h:1\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("gateway.toml:6:1: [region] needs this region's own [redis]"),
            "{p:?}"
        );
        let p = problems(&format!(
            "{REDIS}[region]\nname = \"us-east\"\n\
             [[region.peer]]\nname = \"eu\"\nredis = \"redis://h:1\"\n\
             [[region.peer]]\nname = \"eu\"\nredis = \"redis://h:2\"\n\
             [[region.peer]]\nname = \"us-east\"\nredis = \"redis://h:3\"\n\
             [[region.peer]]\nname = \"ap\"\n\
             [[region.peer]]\nname = \"Bad Name\"\nredis = \"redis://h:4\"\n\
             [[region.peer]]\nname = \"self\"\nredis = \"redis://127.0.0.1:7001\"\n"
        ));
        let want = [
            "gateway.toml:14:8: [[region.peer]] \"eu\" is listed twice",
            "gateway.toml:17:8: [[region.peer]] \"us-east\" is this region's own name",
            "gateway.toml:19:1: [[region.peer]] \"ap\" needs redis = \"redis://host:port\"",
            "gateway.toml:22:8: [[region.peer]] name \"Bad Name\" must be 1 to 64 characters",
            "gateway.toml:26:9: [[region.peer]] \"self\" uses this region's own Redis and prefix",
        ];
        assert_eq!(p.len(), want.len(), "{p:#?}");
        for (got, want) in p.iter().zip(want) {
            assert!(got.starts_with(want), "{got}\nwanted: {want}");
        }
        let p = problems(&format!("{REDIS}[region]\nname = \"x\"\n"));
        assert!(p[0].contains("has no [[region.peer]]"), "{p:?}");
        let p = problems(&format!(
            "{REDIS}[region]\n[[region.peer]]\nname = \"eu\"\nredis = \"http://h:1\"\n"
        ));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("[region] needs name"), "{p:?}");
        assert!(p[1].contains("must start with redis://"), "{p:?}");
    }

    #[test]
    fn region_names_are_label_safe() {
        assert!(name_ok("us-east"));
        assert!(name_ok("eu_west.2"));
        assert!(!name_ok(""));
        assert!(!name_ok("US-East"));
        assert!(!name_ok("eu west"));
        assert!(!name_ok("a:b"));
        assert!(!name_ok(&"x".repeat(65)));
    }
}
