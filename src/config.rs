//! The gateway configuration (`gateway.toml`) and its compiled form.
//!
//! Loading reads the file with positions kept, expands `${VAR}` from the environment (secrets
//! never live in the repository), checks every value, loads the rules directory, and returns
//! either a [`Config`] ready to serve or every problem found, each as `file:line:col: message`.
//! The compiled config is immutable; a reload builds a new one and swaps it in whole.

use crate::diag::{Diagnostic, Source};
use crate::rules::{self, RuleSet};
use crate::units::{parse_duration, parse_size};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// A compiled, validated configuration.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub listen: String,
    pub admin_listen: String,
    /// Worker threads for the proxy service.
    pub threads: usize,
    pub cache: CacheConfig,
    /// Upstreams in name order; rules refer to them by index.
    pub upstreams: Vec<Upstream>,
    pub rules: RuleSet,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Memory tier budget in bytes.
    pub memory: u64,
    /// Responses larger than this are passed through, not stored.
    pub max_object: u64,
    pub rules_dir: PathBuf,
    /// How long requests coalesced behind one fill wait before going upstream themselves.
    pub lock_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub tls: bool,
    /// `host:port` to connect to.
    pub address: String,
    /// Host name for SNI and certificate checks (TLS only).
    pub sni: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    upstreams: BTreeMap<String, Spanned<RawUpstream>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Spanned<String>,
    admin_listen: Spanned<String>,
    default_upstream: Option<Spanned<String>>,
    threads: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    memory: Option<Spanned<String>>,
    max_object: Option<Spanned<String>>,
    rules_dir: Option<Spanned<String>>,
    lock_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Spanned<String>,
    connect_timeout: Option<Spanned<String>>,
    read_timeout: Option<Spanned<String>>,
}

/// Replaces `${VAR}` with the environment variable's value.
pub fn expand_env(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("{s:?} has a \"${{\" without a closing '}}'"));
        };
        let name = &after[..end];
        match std::env::var(name) {
            Ok(v) => out.push_str(&v),
            Err(_) => {
                return Err(format!(
                    "environment variable {name} is not set (referenced as ${{{name}}}); export it before starting aisle"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl Config {
    /// Loads `path` and the rules it points to.
    pub fn load(path: &Path) -> Result<Config, Vec<Diagnostic>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![Diagnostic {
                file: path.to_path_buf(),
                line: 0,
                col: 0,
                message: format!("cannot read the configuration: {e}"),
            }]
        })?;
        Self::from_str(path, &text)
    }

    /// Compiles configuration text as if read from `path` (rules_dir is relative to it).
    pub fn from_str(path: &Path, text: &str) -> Result<Config, Vec<Diagnostic>> {
        let src = Source::new(path, text);
        let raw: RawConfig = toml::from_str(text).map_err(|e| vec![src.toml_error(&e)])?;
        let mut diags = Vec::new();

        let check = |field: &Spanned<String>, what: &str, diags: &mut Vec<Diagnostic>| {
            let v = field.get_ref();
            if v.parse::<std::net::SocketAddr>().is_err() {
                diags.push(src.at(
                    field.span(),
                    format!(
                        "{what} {v:?} is not an address; write IP:PORT, like \"127.0.0.1:8080\""
                    ),
                ));
            }
        };
        check(&raw.server.listen, "listen", &mut diags);
        check(&raw.server.admin_listen, "admin_listen", &mut diags);

        let size = |f: &Option<Spanned<String>>, default: u64, diags: &mut Vec<Diagnostic>| match f
        {
            None => default,
            Some(s) => parse_size(s.get_ref()).unwrap_or_else(|e| {
                diags.push(src.at(s.span(), e));
                default
            }),
        };
        let dur =
            |f: &Option<Spanned<String>>, default: Duration, diags: &mut Vec<Diagnostic>| match f {
                None => default,
                Some(s) => parse_duration(s.get_ref()).unwrap_or_else(|e| {
                    diags.push(src.at(s.span(), e));
                    default
                }),
            };
        let memory = size(&raw.cache.memory, 256 << 20, &mut diags);
        let max_object = size(&raw.cache.max_object, 8 << 20, &mut diags);
        let lock_timeout = dur(&raw.cache.lock_timeout, Duration::from_secs(10), &mut diags);
        let base = path.parent().unwrap_or(Path::new("."));
        let rules_dir = base.join(
            raw.cache
                .rules_dir
                .as_ref()
                .map_or("rules", |s| s.get_ref().as_str()),
        );

        let mut upstreams = Vec::new();
        for (name, u) in &raw.upstreams {
            let u_ref = u.get_ref();
            let url = match expand_env(u_ref.url.get_ref()) {
                Ok(url) => url,
                Err(e) => {
                    diags.push(src.at(u_ref.url.span(), e));
                    continue;
                }
            };
            match parse_upstream_url(&url) {
                Ok((tls, address, sni)) => upstreams.push(Upstream {
                    name: name.clone(),
                    tls,
                    address,
                    sni,
                    connect_timeout: dur(
                        &u_ref.connect_timeout,
                        Duration::from_secs(2),
                        &mut diags,
                    ),
                    read_timeout: dur(&u_ref.read_timeout, Duration::from_secs(30), &mut diags),
                }),
                Err(e) => diags.push(src.at(u_ref.url.span(), e)),
            }
        }
        let names: Vec<String> = raw.upstreams.keys().cloned().collect();
        let default_upstream = match &raw.server.default_upstream {
            Some(d) => match names.iter().position(|n| n == d.get_ref()) {
                Some(i) => Some(i),
                None => {
                    diags.push(src.at(
                        d.span(),
                        format!(
                            "default_upstream {:?} is not defined; defined upstreams: {}",
                            d.get_ref(),
                            names.join(", ")
                        ),
                    ));
                    None
                }
            },
            None if names.len() == 1 => Some(0),
            None => None,
        };
        if names.is_empty() {
            diags.push(
                src.whole("no upstreams are defined; add an [upstreams.NAME] table with a url"),
            );
        }

        let rules = if diags.is_empty() {
            let ctx = rules::Context {
                upstreams: &names,
                default_upstream,
            };
            match rules::load_dir(&rules_dir, &ctx) {
                Ok(r) => Some(r),
                Err(mut e) => {
                    diags.append(&mut e);
                    None
                }
            }
        } else {
            None
        };
        if !diags.is_empty() {
            return Err(diags);
        }
        Ok(Config {
            path: path.to_path_buf(),
            listen: raw.server.listen.into_inner(),
            admin_listen: raw.server.admin_listen.into_inner(),
            threads: raw
                .server
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            cache: CacheConfig {
                memory,
                max_object,
                rules_dir,
                lock_timeout,
            },
            upstreams,
            rules: rules.expect("no diagnostics means rules loaded"),
        })
    }
}

/// `http://host[:port]` or `https://host[:port]` -> (tls, "host:port", sni host).
fn parse_upstream_url(url: &str) -> Result<(bool, String, String), String> {
    let uri: http::Uri = url.parse().map_err(|e| {
        format!("bad upstream url {url:?}: {e}; write it like \"http://127.0.0.1:3000\"")
    })?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(format!(
                "upstream url {url:?} must start with http:// or https://"
            ))
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("upstream url {url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "upstream url {url:?} has a path; Aisle forwards the request's own path, so give only scheme, host and port"
        ));
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((tls, address, host))
}

#[cfg(test)]
mod tests {
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
    fn env_expansion() {
        std::env::set_var("AISLE_TEST_HOST", "10.1.2.3");
        assert_eq!(
            expand_env("http://${AISLE_TEST_HOST}:80").unwrap(),
            "http://10.1.2.3:80"
        );
        assert!(expand_env("${AISLE_SURELY_UNSET_VAR}")
            .unwrap_err()
            .contains("not set"));
        assert!(expand_env("${OPEN").is_err());
    }

    #[test]
    fn https_upstreams_use_sni() {
        assert_eq!(
            parse_upstream_url("https://api.vendor.example").unwrap(),
            (
                true,
                "api.vendor.example:443".to_string(),
                "api.vendor.example".to_string()
            )
        );
        assert!(parse_upstream_url("http://x/path").is_err());
    }
}
