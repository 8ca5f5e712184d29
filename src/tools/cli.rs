//! The operator CLI: `aisle purge`, `stats`, `purges`, `events` and `reload` talk to a running
//! gateway's admin API, the way `varnishadm` or `nginx -s` talk to theirs.
//!
//! It is a plain HTTP client of the documented `/admin/*` endpoints, not a side door: whatever
//! the CLI can do, a script with `curl` and the token can do too, and the gateway checks the token
//! as for any client. Where to connect comes from `--admin URL` or from the `admin_listen` and
//! `[admin] token` of `gateway.toml`, read lightly (only those two settings, with `${VAR}`
//! expansion) so that a purge works even when, say, a rules file being edited does not compile.
//!
//! Exit codes are part of the interface, so scripts can tell the cases apart:
//! 0 done, 1 refused or failed (bad token, 4xx/5xx, reload errors), 2 usage, 3 the gateway
//! cannot be reached. Human tables by default; `--json` prints the gateway's JSON unchanged.

use crate::config::expand_env;
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// Done.
pub const EXIT_OK: u8 = 0;
/// The gateway refused or failed the request.
pub const EXIT_REFUSED: u8 = 1;
/// The command line or the configuration it names is wrong.
pub const EXIT_USAGE: u8 = 2;
/// The admin API did not answer.
pub const EXIT_UNREACHABLE: u8 = 3;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole (non-streaming) request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest SSE line kept while waiting for its end.
const MAX_LINE: usize = 1 << 20;

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// Where the admin API is and the token to show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `http://host:port`, no trailing slash.
    pub base: String,
    pub token: Option<String>,
}

/// What to invalidate (`aisle purge`).
#[derive(Debug, Default, Clone)]
pub struct Purge {
    pub tags: Vec<String>,
    pub urls: Vec<String>,
    pub prefixes: Vec<String>,
    pub event: Option<String>,
    /// `key=value` parameters of the event.
    pub params: Vec<String>,
    pub soft: bool,
}

/// The commands.
#[derive(Debug, Clone)]
pub enum Action {
    Purge(Purge),
    Stats,
    Purges {
        retry: bool,
    },
    Events,
    Reload,
    /// `aisle protect` (status), or `aisle protect on|off NAME [--for D | --until T]`.
    Protect(Option<Protect>),
    /// `aisle warm`: start a warm job and follow it.
    Warm(Warm),
}

/// A warm job from flags and/or a JSON file (`aisle warm`); flags win over the file.
#[derive(Debug, Clone, Default, clap::Args)]
#[group(id = "warm_job")] // not "Warm": that is the subcommand's name
pub struct Warm {
    /// A job as JSON (`{"urls": [...]}`, `{"rule": ..., "grid": {...}}`, `{"top": N}`);
    /// the flags below are set over it.
    #[arg(long, value_name = "FILE")]
    pub file: Option<std::path::PathBuf>,
    /// A URL (path or absolute) to warm (repeatable).
    #[arg(long = "url", num_args = 1.., value_name = "URL")]
    pub urls: Vec<String>,
    /// A rule whose grid to render.
    #[arg(long)]
    pub rule: Option<String>,
    /// A grid axis: SOURCE=V1,V2 (e.g. query.location=NYC,LA; repeatable).
    #[arg(long = "grid", value_name = "SOURCE=VALUES")]
    pub grid: Vec<String>,
    /// The N most requested keys of recent traffic.
    #[arg(long)]
    pub top: Option<usize>,
    /// How far back `--top` looks (default 24h).
    #[arg(long)]
    pub since: Option<String>,
    /// Requests in flight at once (default 4).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Requests per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Refetch entries that are still fresh.
    #[arg(long)]
    pub refresh: bool,
    /// Also request each URL through this CDN front (repeatable).
    #[arg(long = "warm-via", value_name = "URL")]
    pub warm_via: Vec<String>,
    /// Run the job in this region (`[region] name` or a peer's; repeatable); default: here.
    #[arg(long = "region", value_name = "NAME")]
    pub regions: Vec<String>,
}

/// A protection window switch.
#[derive(Debug, Clone, Default)]
pub struct Protect {
    pub on: bool,
    pub name: String,
    /// `--for 3h`
    pub duration: Option<String>,
    /// `--until 2027-06-12T23:00:00-04:00`
    pub until: Option<String>,
}

/// Finds the admin API: `--admin` wins over the config's `admin_listen`; the token is read from
/// `--token-file`, else `AISLE_ADMIN_TOKEN`, else the config's `[admin] token`.
pub fn target(
    config: &Path,
    admin: Option<&str>,
    token_file: Option<&Path>,
    env_token: Option<String>,
) -> Result<Target, Failure> {
    let file_token = match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Failure::new(
                    EXIT_USAGE,
                    format!("cannot read the token file {}: {e}", path.display()),
                )
            })?;
            let t = text.trim().to_string();
            if t.is_empty() {
                return Err(Failure::new(
                    EXIT_USAGE,
                    format!("the token file {} is empty", path.display()),
                ));
            }
            Some(t)
        }
        None => None,
    };
    let explicit = file_token.or(env_token.filter(|t| !t.trim().is_empty()));
    if let Some(url) = admin {
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(Failure::new(
                EXIT_USAGE,
                format!("--admin {url:?}: give a URL like http://127.0.0.1:9180"),
            ));
        }
        return Ok(Target {
            base,
            token: explicit,
        });
    }
    let text = std::fs::read_to_string(config).map_err(|e| {
        Failure::new(
            EXIT_USAGE,
            format!(
                "cannot read {}: {e}; give --config gateway.toml or --admin http://host:port",
                config.display()
            ),
        )
    })?;
    let (listen, token) = admin_settings(&text).map_err(|e| {
        Failure::new(
            EXIT_USAGE,
            format!(
                "{}: {e}; or give --admin http://host:port",
                config.display()
            ),
        )
    })?;
    let token = match explicit {
        Some(t) => Some(t),
        None => token
            .map(|t| expand_env(&t))
            .transpose()
            .map_err(|e| {
                Failure::new(
                    EXIT_USAGE,
                    format!("{}: [admin] token: {e}", config.display()),
                )
            })?
            // `${AISLE_ADMIN_TOKEN:-}` with the variable unset: no token given.
            .filter(|t| !t.is_empty()),
    };
    Ok(Target {
        base: format!("http://{}", connect_address(&listen)),
        token,
    })
}

/// `[server] admin_listen` (expanded) and the unexpanded `[admin] token` of a `gateway.toml`.
fn admin_settings(text: &str) -> Result<(String, Option<String>), String> {
    let doc: toml::Table = text.parse().map_err(|e| format!("not valid TOML: {e}"))?;
    let listen = doc
        .get("server")
        .and_then(|s| s.get("admin_listen"))
        .and_then(|v| v.as_str())
        .ok_or("it has no [server] admin_listen")?;
    let listen = expand_env(listen).map_err(|e| format!("[server] admin_listen: {e}"))?;
    let token = doc
        .get("admin")
        .and_then(|a| a.get("token"))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    Ok((listen, token))
}

/// A listen address as a client connects to it: a wildcard means this host's loopback.
fn connect_address(listen: &str) -> String {
    if let Some(port) = listen.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = listen.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        listen.to_string()
    }
}

/// The body of `POST /admin/invalidate` for `p`.
pub fn invalidate_body(p: &Purge) -> Result<Value, Failure> {
    if p.tags.is_empty() && p.urls.is_empty() && p.prefixes.is_empty() && p.event.is_none() {
        return Err(Failure::new(
            EXIT_USAGE,
            "nothing to purge: give --tag, --url, --prefix or --event NAME key=value...",
        ));
    }
    if p.event.is_none() && !p.params.is_empty() {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "{:?}: key=value parameters belong to an --event NAME",
                p.params[0]
            ),
        ));
    }
    let mut events = Vec::new();
    if let Some(name) = &p.event {
        let mut params = serde_json::Map::new();
        for kv in &p.params {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(Failure::new(
                    EXIT_USAGE,
                    format!("event parameter {kv:?}: write it as key=value"),
                ));
            };
            params.insert(k.to_string(), Value::String(v.to_string()));
        }
        events.push(serde_json::json!({"name": name, "params": params}));
    }
    Ok(serde_json::json!({
        "tags": p.tags,
        "urls": p.urls,
        "prefixes": p.prefixes,
        "events": events,
        "soft": p.soft,
    }))
}

/// Runs `action` against `target`; prints results to stdout, problems to stderr.
pub fn run(target: &Target, action: &Action, json: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aisle: cannot start the client runtime: {e}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    match runtime.block_on(execute(target, action, json)) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(f) => {
            eprintln!("aisle: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

struct Client {
    http: reqwest::Client,
    target: Target,
}

impl Client {
    fn new(target: &Target, streaming: bool) -> Result<Self, Failure> {
        let mut b = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        if !streaming {
            b = b.timeout(REQUEST_TIMEOUT);
        }
        // The admin listener is usually on this host: a loopback address never goes through
        // an `HTTP_PROXY` meant for the outside world (as curl's default `NO_PROXY` habits).
        let host = target.base.split("://").nth(1).unwrap_or_default();
        if ["127.", "localhost", "[::1]"]
            .iter()
            .any(|p| host.starts_with(p))
        {
            b = b.no_proxy();
        }
        let http = b
            .build()
            .map_err(|e| Failure::new(EXIT_REFUSED, format!("cannot build an HTTP client: {e}")))?;
        Ok(Client {
            http,
            target: target.clone(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.target.base)
    }

    /// Sends a request; maps a transport failure to exit 3 and a 401 to exit 1.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<reqwest::Response, Failure> {
        let url = self.url(path);
        let mut rb = self.http.request(method.clone(), &url);
        if let Some(t) = &self.target.token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let resp = rb.send().await.map_err(|e| {
            Failure::new(
                EXIT_UNREACHABLE,
                format!(
                    "cannot reach the admin API at {url}: {}; is aisle running, and is this its admin_listen (or --admin)?",
                    error_chain(&e)
                ),
            )
        })?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            let how = "give the [admin] token through AISLE_ADMIN_TOKEN or --token-file";
            return Err(Failure::new(
                EXIT_REFUSED,
                match &self.target.token {
                    None => format!("{method} {url}: the gateway wants the admin token and none was given; {how}"),
                    Some(_) => format!("{method} {url}: the gateway refused the admin token (401); {how}"),
                },
            ));
        }
        Ok(resp)
    }

    /// Sends and reads a JSON answer; a non-2xx answer is a failure with the gateway's `error`.
    async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let url = self.url(path);
        let resp = self.send(method.clone(), path, body).await?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            Failure::new(
                EXIT_UNREACHABLE,
                format!("{method} {url}: the answer broke off: {}", error_chain(&e)),
            )
        })?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        if !status.is_success() {
            let why = error_text(&value, &text);
            return Err(Failure::new(
                EXIT_REFUSED,
                format!("{method} {url}: {status}: {why}"),
            ));
        }
        Ok(value)
    }
}

/// What a refusal says: the error body's `message` (and `field`, when one input is at fault;
/// see `docs/admin-api.yaml`), an older gateway's `{"error": "..."}`, or the raw text.
fn error_text(value: &Value, text: &str) -> String {
    match value.get("error") {
        Some(Value::Object(e)) => {
            let message = e.get("message").and_then(Value::as_str).unwrap_or("");
            match e.get("field").and_then(Value::as_str) {
                Some(field) => format!("{message} (field: {field})"),
                None => message.to_string(),
            }
        }
        Some(Value::String(s)) => s.clone(),
        _ => text.trim().to_string(),
    }
}

/// An error and its causes, which is where reqwest says "connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn execute(target: &Target, action: &Action, json: bool) -> Result<(), Failure> {
    let client = Client::new(target, matches!(action, Action::Events))?;
    match action {
        Action::Purge(p) => {
            let body = invalidate_body(p)?;
            let v = client
                .json(reqwest::Method::POST, "/admin/invalidate", Some(&body))
                .await?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "invalidation {}: {} tags, {} urls, {} prefixes{}; CDN: {}; fleet: {}",
                    str_of(&v, "id"),
                    num_of(&v, "tags"),
                    num_of(&v, "urls"),
                    num_of(&v, "prefixes"),
                    if p.soft { " (soft)" } else { "" },
                    str_of(&v, "cdn"),
                    str_of(&v, "fleet"),
                );
            }
        }
        Action::Warm(w) => warm(&client, w, json).await?,
        Action::Protect(switch) => {
            if let Some(p) = switch {
                let mut body = serde_json::json!({"name": p.name, "on": p.on});
                if let Some(d) = &p.duration {
                    body["for"] = Value::String(d.clone());
                }
                if let Some(t) = &p.until {
                    body["until"] = Value::String(t.clone());
                }
                client
                    .json(reqwest::Method::POST, "/admin/protection", Some(&body))
                    .await?;
            }
            let v = client
                .json(reqwest::Method::GET, "/admin/protection", None)
                .await?;
            if json {
                println!("{v}");
            } else {
                print!("{}", protection_table(&v));
            }
        }
        Action::Stats => {
            let v = client
                .json(reqwest::Method::GET, "/admin/stats", None)
                .await?;
            if json {
                println!("{v}");
            } else {
                print!("{}", stats_table(&v));
            }
        }
        Action::Purges { retry } => {
            let retried = if *retry {
                let r = client
                    .json(reqwest::Method::POST, "/admin/purges/retry", None)
                    .await?;
                Some(r)
            } else {
                None
            };
            let v = client
                .json(reqwest::Method::GET, "/admin/purges", None)
                .await?;
            if json {
                match retried {
                    Some(r) => println!("{}", serde_json::json!({"retry": r, "status": v})),
                    None => println!("{v}"),
                }
            } else {
                if let Some(r) = retried {
                    println!("retried {} dead letters", num_of(&r, "retried"));
                }
                print!("{}", purges_table(&v));
            }
        }
        Action::Reload => {
            let resp = client
                .send(reqwest::Method::POST, "/admin/reload", None)
                .await?;
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
            if status.is_success() {
                if json {
                    println!("{v}");
                } else {
                    println!("reloaded: {}", summary(&v));
                }
            } else if status == reqwest::StatusCode::UNPROCESSABLE_ENTITY {
                if json {
                    println!("{v}");
                }
                let errors: Vec<String> = v
                    .get("errors")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(plain).collect())
                    .unwrap_or_default();
                for e in &errors {
                    eprintln!("{e}");
                }
                return Err(Failure::new(
                    EXIT_REFUSED,
                    format!(
                        "the new configuration was refused ({} problem{}); the running one stays in force",
                        errors.len(),
                        if errors.len() == 1 { "" } else { "s" }
                    ),
                ));
            } else if status == reqwest::StatusCode::NOT_FOUND {
                return Err(Failure::new(
                    EXIT_REFUSED,
                    "this gateway has no /admin/reload (an older version?); restart it or send it SIGHUP",
                ));
            } else {
                let why = error_text(&v, &text);
                return Err(Failure::new(
                    EXIT_REFUSED,
                    format!("reload failed: {status}: {why}"),
                ));
            }
        }
        Action::Events => follow(&client, json).await?,
    }
    Ok(())
}

/// Follows `GET /admin/events` and prints one line per invalidation until the stream ends.
async fn follow(client: &Client, json: bool) -> Result<(), Failure> {
    let url = client.url("/admin/events");
    let mut resp = client
        .send(reqwest::Method::GET, "/admin/events", None)
        .await?;
    if !resp.status().is_success() {
        return Err(Failure::new(
            EXIT_REFUSED,
            format!("GET {url}: {}", resp.status()),
        ));
    }
    eprintln!("aisle: following invalidations at {url} (Ctrl-C to stop)");
    let mut buf: Vec<u8> = Vec::new();
    let mut event = String::new();
    let mut data = String::new();
    let stdout = std::io::stdout();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                return Err(Failure::new(
                    EXIT_UNREACHABLE,
                    format!("the event stream broke off: {}", error_chain(&e)),
                ))
            }
        };
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !data.is_empty() {
                    let out = event_line(&event, &data, json);
                    let mut lock = stdout.lock();
                    if writeln!(lock, "{out}").and_then(|_| lock.flush()).is_err() {
                        // The reader went away (`aisle events | head`).
                        return Ok(());
                    }
                }
                event.clear();
                data.clear();
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.trim_start());
            }
        }
        if buf.len() > MAX_LINE {
            return Err(Failure::new(
                EXIT_REFUSED,
                format!("the event stream sent a line longer than {MAX_LINE} bytes"),
            ));
        }
    }
    Err(Failure::new(
        EXIT_UNREACHABLE,
        "the gateway closed the event stream (shutting down?)",
    ))
}

/// One printed line for an SSE event.
fn event_line(event: &str, data: &str, json: bool) -> String {
    if json {
        return data.to_string();
    }
    let v: Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(_) => return format!("{event}: {data}"),
    };
    if event == "lagged" {
        return format!(
            "(missed {} invalidations: this client was too slow)",
            num_of(&v, "missed")
        );
    }
    let at = v
        .get("at_ms")
        .and_then(Value::as_i64)
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || "-".to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        );
    let mut line = format!("{at} {}", str_of(&v, "source"));
    for field in ["tags", "urls", "prefixes", "events"] {
        if let Some(list) = v.get(field).and_then(Value::as_array) {
            if !list.is_empty() {
                let items: Vec<String> = list.iter().map(plain).collect();
                line.push_str(&format!(" {field}={}", items.join(",")));
            }
        }
    }
    if v.get("soft").and_then(Value::as_bool) == Some(true) {
        line.push_str(" soft");
    }
    line.push_str(&format!(
        " cdn={} id={}",
        str_of(&v, "cdn"),
        str_of(&v, "id")
    ));
    line
}

/// The per-rule table of `GET /admin/stats`.
pub fn stats_table(v: &Value) -> String {
    let mut rows = vec![[
        "RULE".to_string(),
        "REQUESTS".to_string(),
        "HITS".to_string(),
        "HIT RATIO".to_string(),
        "BYTES".to_string(),
        "COST SAVED".to_string(),
        "TOKENS SAVED".to_string(),
    ]];
    if let Some(rules) = v.get("rules").and_then(Value::as_object) {
        for (name, r) in rules {
            let ratio = r.get("hit_ratio").and_then(Value::as_f64).unwrap_or(0.0);
            let cost = r.get("cost_saved").and_then(Value::as_f64).unwrap_or(0.0);
            rows.push([
                name.clone(),
                num_of(r, "requests"),
                num_of(r, "hits"),
                format!("{:.1}%", ratio * 100.0),
                bytesize::ByteSize::b(r.get("bytes_stored").and_then(Value::as_u64).unwrap_or(0))
                    .to_string(),
                format!("{cost:.4}"),
                num_of(r, "tokens_saved"),
            ]);
        }
    }
    table(&rows)
}

/// The windows of `GET /admin/protection`.
pub fn protection_table(v: &Value) -> String {
    let mut rows = vec![[
        "WINDOW".to_string(),
        "ON".to_string(),
        "SCHEDULED".to_string(),
        "SWITCH".to_string(),
    ]];
    for w in v
        .get("windows")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let switch = match w.get("switch") {
            Some(s) if !s.is_null() => format!(
                "{} by {}{}",
                if s.get("on") == Some(&Value::Bool(true)) {
                    "on"
                } else {
                    "off"
                },
                str_of(s, "actor"),
                match s.get("until_ms").and_then(Value::as_u64) {
                    Some(ms) => chrono::DateTime::from_timestamp_millis(ms as i64)
                        .map(|t| format!(" until {}", t.format("%Y-%m-%dT%H:%M:%SZ")))
                        .unwrap_or_default(),
                    None => String::new(),
                }
            ),
            _ => "-".to_string(),
        };
        let yes = |k: &str| {
            if w.get(k) == Some(&Value::Bool(true)) {
                "yes"
            } else {
                "no"
            }
        };
        rows.push([
            str_of(w, "name"),
            yes("on").into(),
            yes("scheduled").into(),
            switch,
        ]);
    }
    if rows.len() == 1 {
        return "no protection windows ([[protection]] in gateway.toml)\n".to_string();
    }
    let mut out = table(&rows);
    if let Some(n) = v
        .get("deferred_purges")
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
    {
        out.push_str(&format!(
            "{n} purge{} deferred: applied once no deferring window is on\n",
            if n == 1 { "" } else { "s" }
        ));
    }
    out
}

/// The purge queue of `GET /admin/purges`.
pub fn purges_table(v: &Value) -> String {
    let mut out = format!(
        "queue: depth {}, in flight {}, dead letters {} (redis: {}){}\n",
        num_of(v, "depth"),
        num_of(v, "in_flight"),
        num_of(v, "dead_letters"),
        v.get("redis").and_then(Value::as_str).unwrap_or(
            if v.get("configured") == Some(&Value::Bool(false)) {
                "no CDN configured"
            } else {
                "-"
            }
        ),
        if v.get("held") == Some(&Value::Bool(true)) {
            "; held by a protection window: sent when it ends"
        } else {
            ""
        },
    );
    if let Some(providers) = v.get("providers").and_then(Value::as_array) {
        if !providers.is_empty() {
            let mut rows = vec![[
                "PROVIDER".to_string(),
                "DEPTH".to_string(),
                "IN FLIGHT".to_string(),
                "DEAD LETTERS".to_string(),
                "LOCAL".to_string(),
                "SKIPPED".to_string(),
            ]];
            for p in providers {
                let mut name = str_of(p, "provider");
                if p.get("configured") == Some(&Value::Bool(false)) {
                    name.push_str(" (removed)");
                }
                rows.push([
                    name,
                    num_of(p, "depth"),
                    num_of(p, "in_flight"),
                    num_of(p, "dead_letters"),
                    num_of(p, "local"),
                    num_of(p, "skipped"),
                ]);
            }
            out.push_str(&table(&rows));
            // Why purges were not sent: the latest examples, so "skipped" is never a bare count.
            for p in providers {
                let recent = p.get("skipped_recent").and_then(Value::as_array);
                for s in recent.into_iter().flatten().rev().take(3) {
                    out.push_str(&format!(
                        "  {} skipped {} {} ({})\n",
                        str_of(p, "provider"),
                        str_of(s, "kind"),
                        str_of(s, "item"),
                        str_of(s, "reason")
                    ));
                }
            }
        }
    }
    out
}

/// Left-aligned columns, two spaces apart.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A JSON value as text without the quotes of a string.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn str_of(v: &Value, field: &str) -> String {
    v.get(field).map_or_else(|| "-".to_string(), plain)
}

fn num_of(v: &Value, field: &str) -> String {
    v.get(field).map_or_else(|| "0".to_string(), plain)
}

/// A short `key=value` rendering of a JSON object (the reload answer).
fn summary(v: &Value) -> String {
    match v.as_object() {
        Some(o) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", plain(v)))
            .collect::<Vec<_>>()
            .join(" "),
        None => plain(v),
    }
}

/// The job `aisle warm` sends: the file's JSON, then the flags over it.
pub fn warm_body(w: &Warm) -> Result<Value, Failure> {
    let mut body = match &w.file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Failure::new(EXIT_USAGE, format!("cannot read {}: {e}", path.display()))
            })?;
            let v: Value = serde_json::from_str(&text).map_err(|e| {
                Failure::new(EXIT_USAGE, format!("{}: not JSON: {e}", path.display()))
            })?;
            if !v.is_object() {
                return Err(Failure::new(
                    EXIT_USAGE,
                    format!("{}: a warm job is a JSON object", path.display()),
                ));
            }
            v
        }
        None => Value::Object(Default::default()),
    };
    let set = |body: &mut Value, k: &str, v: Value| {
        body[k] = v;
    };
    if !w.urls.is_empty() {
        set(&mut body, "urls", serde_json::json!(w.urls));
    }
    if let Some(r) = &w.rule {
        set(&mut body, "rule", Value::String(r.clone()));
    }
    if !w.grid.is_empty() {
        let mut grid = serde_json::Map::new();
        for g in &w.grid {
            let (k, vals) = g.split_once('=').ok_or_else(|| {
                Failure::new(
                    EXIT_USAGE,
                    format!("--grid {g:?}: write SOURCE=V1,V2 (e.g. query.location=NYC,LA)"),
                )
            })?;
            grid.insert(
                k.to_string(),
                serde_json::json!(vals.split(',').collect::<Vec<_>>()),
            );
        }
        set(&mut body, "grid", Value::Object(grid));
    }
    if let Some(t) = w.top {
        set(&mut body, "top", serde_json::json!(t));
    }
    if let Some(s) = &w.since {
        set(&mut body, "since", Value::String(s.clone()));
    }
    if let Some(c) = w.concurrency {
        set(&mut body, "concurrency", serde_json::json!(c));
    }
    if let Some(r) = w.rate {
        set(&mut body, "rate", serde_json::json!(r));
    }
    if w.refresh {
        set(&mut body, "refresh", Value::Bool(true));
    }
    if !w.warm_via.is_empty() {
        set(&mut body, "warm_via", serde_json::json!(w.warm_via));
    }
    if !w.regions.is_empty() {
        set(&mut body, "regions", serde_json::json!(w.regions));
    }
    Ok(body)
}

/// How often `aisle warm` asks for the job's progress.
const WARM_POLL: Duration = Duration::from_millis(250);

fn count_of(v: &Value, field: &str) -> u64 {
    v.get(field).and_then(Value::as_u64).unwrap_or(0)
}

/// One line of a job's progress.
fn warm_line(v: &Value) -> String {
    let mut line = format!(
        "warm job {}: {}/{} done: {} warmed, {} skipped, {} errors",
        str_of(v, "id"),
        num_of(v, "done"),
        num_of(v, "total"),
        num_of(v, "warmed"),
        num_of(v, "skipped"),
        num_of(v, "errors"),
    );
    if count_of(v, "throttled") > 0 {
        line.push_str(&format!(", {} throttled (retried)", num_of(v, "throttled")));
    }
    for f in v["fronts"].as_array().into_iter().flatten() {
        line.push_str(&format!(
            "; via {}: {} ok, {} errors",
            str_of(f, "front"),
            num_of(f, "ok"),
            num_of(f, "errors")
        ));
    }
    line
}

/// `aisle warm`: starts the job, shows its progress (a bar on a terminal, lines otherwise)
/// until it is done, and fails (exit 1) if any request failed.
async fn warm(client: &Client, w: &Warm, json: bool) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let body = warm_body(w)?;
    let started = client
        .json(reqwest::Method::POST, "/admin/warm", Some(&body))
        .await?;
    // With `regions`: each region's job id (or "unavailable"); only this region's job can be
    // followed here (a peer's shows in that region's /admin/jobs).
    let mut unavailable: Vec<String> = Vec::new();
    if let Some(regions) = started["regions"].as_object() {
        for (name, id) in regions {
            let id = id.as_str().unwrap_or("?");
            eprintln!("region {name}: {id}");
            if id == "unavailable" {
                unavailable.push(name.clone());
            }
        }
    }
    let not_started = |unavailable: &[String]| {
        Failure::new(
            EXIT_REFUSED,
            format!(
                "warm job not started in {} (its Redis did not answer)",
                unavailable.join(", ")
            ),
        )
    };
    if started.get("id").is_none() {
        if json {
            println!("{started}");
        }
        if !unavailable.is_empty() {
            return Err(not_started(&unavailable));
        }
        return Ok(());
    }
    let id = str_of(&started, "id");
    let path = format!("/admin/jobs/{id}");
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} warm {msg} [{bar:30}] {pos}/{len} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    });
    let mut last = String::new();
    let status = loop {
        let v = client.json(reqwest::Method::GET, &path, None).await?;
        match &bar {
            Some(bar) => {
                bar.set_length(count_of(&v, "total"));
                bar.set_position(count_of(&v, "done"));
                bar.set_message(format!(
                    "{id} ({} skipped, {} errors)",
                    num_of(&v, "skipped"),
                    num_of(&v, "errors")
                ));
            }
            None => {
                let line = warm_line(&v);
                if line != last {
                    eprintln!("{line}");
                    last = line;
                }
            }
        }
        if matches!(v["state"].as_str(), Some("done" | "failed")) {
            break v;
        }
        tokio::time::sleep(WARM_POLL).await;
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
        eprintln!("{}", warm_line(&status));
    }
    if json {
        println!("{status}");
    }
    let front_errors: u64 = status["fronts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| count_of(f, "errors"))
        .sum();
    let errors = count_of(&status, "errors") + front_errors;
    if errors > 0 {
        return Err(Failure::new(
            EXIT_REFUSED,
            format!("warm job {id}: {errors} requests failed"),
        ));
    }
    if !unavailable.is_empty() {
        return Err(not_started(&unavailable));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_print_message_and_field() {
        let v = serde_json::json!({"error": {"code": "invalid_field", "message": "a tag must not be empty", "field": "tags[0]"}});
        assert_eq!(
            error_text(&v, ""),
            "a tag must not be empty (field: tags[0])"
        );
        let v = serde_json::json!({"error": {"code": "not_found", "message": "no such endpoint"}});
        assert_eq!(error_text(&v, ""), "no such endpoint");
        let v = serde_json::json!({"error": "old shape"});
        assert_eq!(error_text(&v, ""), "old shape");
        assert_eq!(error_text(&Value::Null, " raw \n"), "raw");
    }

    #[test]
    fn wildcard_listen_connects_to_loopback() {
        assert_eq!(connect_address("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(connect_address("[::]:9090"), "[::1]:9090");
        assert_eq!(connect_address("10.0.0.2:9090"), "10.0.0.2:9090");
    }

    #[test]
    fn reads_admin_settings_only() {
        let (listen, token) = admin_settings(
            "[server]\nadmin_listen = \"127.0.0.1:9\"\n[admin]\ntoken = \"${X}\"\n[cache]\nbogus = 1\n",
        )
        .unwrap();
        assert_eq!(listen, "127.0.0.1:9");
        assert_eq!(token.as_deref(), Some("${X}"));
        assert!(admin_settings("[server]\n").is_err());
    }

    #[test]
    fn protection_table_says_what_is_on_and_why() {
        let v = serde_json::json!({"windows": [
            {"name": "wedding-day", "on": true, "scheduled": false,
             "switch": {"on": true, "actor": "admin-token", "at_ms": 1, "until_ms": 1_812_000_000_000u64}},
            {"name": "gala", "on": false, "scheduled": false, "switch": null}
        ]});
        let t = protection_table(&v);
        assert!(t.contains("wedding-day  yes"), "{t}");
        assert!(t.contains("on by admin-token until 2027-06-03T"), "{t}");
        assert!(t.contains("gala         no   no         -"), "{t}");
        assert!(protection_table(&serde_json::json!({"windows": []}))
            .starts_with("no protection windows"));
        let mut deferred = v.clone();
        deferred["deferred_purges"] = serde_json::json!(2);
        assert!(protection_table(&deferred).contains("2 purges deferred"));
    }

    #[test]
    fn purges_table_shows_what_was_skipped_and_why() {
        let v = serde_json::json!({
            "redis": "disabled", "depth": 1, "in_flight": 0, "dead_letters": 0,
            "providers": [
                {"provider": "fastly", "configured": true, "depth": 0, "in_flight": 0,
                 "dead_letters": 0, "local": 0, "skipped": 2, "skipped_recent": [
                    {"job": "j1", "kind": "prefix", "item": "/api/", "reason": "unsupported"},
                    {"job": "j2", "kind": "host", "item": "a.example", "reason": "unsupported"}]},
                {"provider": "cloudflare", "configured": false, "depth": 1, "in_flight": 0,
                 "dead_letters": 0, "local": 1, "skipped": 0, "skipped_recent": []}
            ]
        });
        let t = purges_table(&v);
        assert!(t.contains("SKIPPED"), "{t}");
        assert!(t.contains("cloudflare (removed)"), "{t}");
        assert!(
            t.contains("fastly skipped host a.example (unsupported)"),
            "{t}"
        );
        assert!(
            t.contains("fastly skipped prefix /api/ (unsupported)"),
            "{t}"
        );
    }

    #[test]
    fn purge_body() {
        let p = Purge {
            event: Some("vendor_updated".into()),
            params: vec!["vendor_id=v1".into(), "city=a=b".into()],
            soft: true,
            ..Default::default()
        };
        let b = invalidate_body(&p).unwrap();
        assert_eq!(b["events"][0]["name"], "vendor_updated");
        assert_eq!(b["events"][0]["params"]["vendor_id"], "v1");
        assert_eq!(b["events"][0]["params"]["city"], "a=b");
        assert_eq!(b["soft"], true);
        assert_eq!(
            invalidate_body(&Purge::default()).unwrap_err().code,
            EXIT_USAGE
        );
        let stray = Purge {
            tags: vec!["t".into()],
            params: vec!["k=v".into()],
            ..Default::default()
        };
        assert_eq!(invalidate_body(&stray).unwrap_err().code, EXIT_USAGE);
    }

    #[test]
    fn tables_align() {
        let v = serde_json::json!({"rules": {"a-long-rule": {"requests": 10, "hits": 5,
            "hit_ratio": 0.5, "bytes_stored": 2048, "cost_saved": 0.25, "tokens_saved": 7}}});
        let t = stats_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].starts_with("a-long-rule  10"), "{t}");
        assert!(lines[1].contains("50.0%"), "{t}");
        assert_eq!(lines[0].find("REQUESTS"), lines[1].find("10"));
    }

    #[test]
    fn warm_flags_name_the_regions() {
        let w = Warm {
            urls: vec!["/a".into()],
            regions: vec!["us-east".into(), "eu-west".into()],
            ..Default::default()
        };
        let body = warm_body(&w).unwrap();
        assert_eq!(body["regions"], serde_json::json!(["us-east", "eu-west"]));
        let plain = warm_body(&Warm {
            urls: vec!["/a".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(plain.get("regions").is_none(), "{plain}");
    }
}
