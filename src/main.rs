//! The `aisle` command line: `run` (default), `check`, `demo`, `replay`, `trace`, and the
//! operator commands (`purge`, `stats`, `purges`, `events`, `reload`) that talk to a running
//! gateway's admin API ([`aisle::tools::cli`]).

use aisle::config::Config;
use aisle::tools::cli;

/// mimalloc: the request path allocates small short-lived objects (headers, keys, contexts);
/// a thread-caching allocator serves them faster than the system one ([`aisle::alloc`]).
#[global_allocator]
static GLOBAL: aisle::alloc::Allocator = aisle::alloc::Allocator;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "aisle",
    version,
    about = "A rules-driven caching gateway for HTTP APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (for the default `run`).
    #[arg(long, default_value = "gateway.toml", global = true)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with the given configuration (the default).
    Run {
        /// Take over the listening sockets of the running gateway (graceful upgrade): start
        /// this, then send the running process SIGQUIT; it hands its listeners over and drains.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate the configuration and every rules file; print problems as file:line:col.
    Check,
    /// Serve the repository's gateway.toml and rules/ with a built-in demo origin.
    Demo,
    /// Replay a JSON-lines request trace against the rules alone (no origin) and print the hit
    /// ratio per rule, with and without normalizers.
    Replay {
        /// The trace: one JSON object per line (method, path, query, headers, body, timestamp).
        #[arg(long)]
        trace: PathBuf,
        /// Lifetime of entries of rules without `ttl` (their origin would decide; a replay has none).
        #[arg(long, default_value = "5m", value_parser = duration_arg)]
        default_ttl: std::time::Duration,
        /// Treat every request as from `[server] trusted_clients` (its `Aisle-*` headers count);
        /// by default a trace's requests are untrusted clients, as a trace has no peer address.
        #[arg(long)]
        trusted: bool,
        /// How long a background refresh (refresh-ahead, stale-while-revalidate) takes to land.
        #[arg(long, default_value = "50ms", value_parser = duration_arg)]
        origin_latency: std::time::Duration,
    },
    /// Write a synthetic, seeded wedding-planning request trace for `aisle replay`.
    Trace {
        /// Number of requests.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        /// The same seed gives the same trace.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Arrivals are spread over this long.
        #[arg(long, default_value = "2h", value_parser = duration_arg)]
        duration: std::time::Duration,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Invalidate cached entries on a running gateway (POST /admin/invalidate).
    Purge {
        /// A tag to purge (repeatable; several values allowed).
        #[arg(long = "tag", num_args = 1.., value_name = "TAG")]
        tags: Vec<String>,
        /// A URL to purge (repeatable).
        #[arg(long = "url", num_args = 1.., value_name = "URL")]
        urls: Vec<String>,
        /// A path prefix to purge (repeatable).
        #[arg(long = "prefix", num_args = 1.., value_name = "PREFIX")]
        prefixes: Vec<String>,
        /// A configured `[[event]]` to fire, with its parameters as key=value arguments.
        #[arg(long, value_name = "NAME")]
        event: Option<String>,
        /// The event's parameters.
        #[arg(value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Mark entries stale (served while revalidated) instead of removing them.
        #[arg(long)]
        soft: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Per-rule requests, hit ratio, bytes stored and cost saved of a running gateway.
    Stats {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The CDN purge queue: depth and dead letters.
    Purges {
        /// Put the dead letters back in the queue first.
        #[arg(long)]
        retry: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Follow the live stream of invalidations, one line each.
    Events {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make a running gateway reload its configuration; prints the errors if it refuses.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Start a warm job on a running gateway (POST /admin/warm) and follow it with a progress
    /// bar; exits 1 if any of its requests failed.
    Warm {
        #[command(flatten)]
        job: aisle::tools::cli::Warm,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show the protection windows, or switch one for the fleet: `aisle protect on NAME --for 3h`,
    /// `aisle protect off NAME` (POST /admin/protection).
    Protect {
        /// `on` or `off` (omit both to show the windows).
        #[arg(value_parser = ["on", "off"])]
        state: Option<String>,
        /// The window's name (`[[protection]] name`).
        name: Option<String>,
        /// Keep the switch this long (`3h`), then the schedule rules again.
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        /// Keep the switch until this RFC 3339 time.
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// How the operator commands reach the admin API. Exit codes: 0 ok, 1 refused or failed,
/// 2 usage, 3 the gateway cannot be reached.
#[derive(clap::Args)]
struct AdminArgs {
    /// The admin API's URL (default: http://<admin_listen of --config>).
    #[arg(long, value_name = "URL")]
    admin: Option<String>,
    /// A file holding the admin token (default: $AISLE_ADMIN_TOKEN, else the config's [admin] token).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Print the gateway's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    aisle::units::parse_duration(s)
}

fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("AISLE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
        // Access lines (`[log] access`) have their own layer below; `[log] access` turns them
        // on and off, not the level.
        .add_directive(
            format!("{}=off", aisle::proxy::access::TARGET)
                .parse()
                .expect("a static directive"),
        );
    let most = filter.max_level_hint();
    // Logs go to stderr (as README says), coloured only for a terminal.
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter.and(no_pingora_debug()));
    let access = AccessLog.with_filter(tracing_subscriber::filter::filter_fn(|m| {
        m.target() == aisle::proxy::access::TARGET
    }));
    tracing_subscriber::registry().with(fmt).with(access).init();
    // Pingora logs through the `log` crate, at debug level several times per request; `init`
    // lets every level through to tracing (the access layer has no level), where each call
    // was then filtered out at a cost (3% of a hit, issue 16). The level `AISLE_LOG` asks for
    // is the most any `log` line can reach, so `log`'s own cheap check drops the rest.
    log::set_max_level(match most {
        Some(tracing::level_filters::LevelFilter::OFF) => log::LevelFilter::Off,
        Some(tracing::level_filters::LevelFilter::ERROR) => log::LevelFilter::Error,
        Some(tracing::level_filters::LevelFilter::WARN) => log::LevelFilter::Warn,
        Some(tracing::level_filters::LevelFilter::INFO) => log::LevelFilter::Info,
        Some(tracing::level_filters::LevelFilter::DEBUG) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });
}

/// Pingora's own debug and trace output prints whole request heads (`Authorization`, API keys,
/// cookies) and bodies: it never reaches the log, whatever `AISLE_LOG` says. Aisle's own debug
/// lines name a request by its rule, path and key hash.
fn no_pingora_debug(
) -> tracing_subscriber::filter::FilterFn<impl Fn(&tracing::Metadata<'_>) -> bool> {
    tracing_subscriber::filter::filter_fn(|m| {
        !(m.target().starts_with("pingora") && *m.level() > tracing::Level::INFO)
    })
}

/// Writes access lines to stderr exactly as formatted (logfmt or JSON, time included), with no
/// level or time prefix, so a log shipper parses every line as one record.
struct AccessLog;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AccessLog {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "{}", m.0);
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    let loaded = Config::load(path).map_err(|diags| {
        for d in &diags {
            eprintln!("{d}");
        }
        eprintln!(
            "aisle: {} problem{} in the configuration; nothing was started",
            diags.len(),
            if diags.len() == 1 { "" } else { "s" }
        );
        ExitCode::FAILURE
    });
    if let Ok(c) = &loaded {
        for w in &c.rules.warnings {
            eprintln!("{w}");
        }
    }
    loaded
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command.unwrap_or(Command::Run { upgrade: false }) {
        Command::Check => match load(&cli.config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} rules, {} upstreams)",
                    cli.config.display(),
                    c.rules.len(),
                    c.upstreams.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { upgrade } => match load(&cli.config) {
            Ok(c) => serve(c, upgrade),
            Err(code) => code,
        },
        Command::Demo => demo(&cli.config),
        Command::Replay {
            trace,
            default_ttl,
            trusted,
            origin_latency,
        } => match load(&cli.config) {
            Ok(c) => {
                let client = if trusted {
                    aisle::trust::Client::Trusted
                } else {
                    aisle::trust::Client::Untrusted
                };
                aisle::tools::replay::run(&c, &trace, default_ttl, client, origin_latency)
            }
            Err(code) => code,
        },
        Command::Trace {
            requests,
            seed,
            duration,
            out,
        } => trace(requests, seed, duration, out.as_deref()),
        Command::Purge {
            tags,
            urls,
            prefixes,
            event,
            params,
            soft,
            admin,
        } => operate(
            &cli.config,
            &admin,
            cli::Action::Purge(cli::Purge {
                tags,
                urls,
                prefixes,
                event,
                params,
                soft,
            }),
        ),
        Command::Stats { admin } => operate(&cli.config, &admin, cli::Action::Stats),
        Command::Purges { retry, admin } => {
            operate(&cli.config, &admin, cli::Action::Purges { retry })
        }
        Command::Events { admin } => operate(&cli.config, &admin, cli::Action::Events),
        Command::Reload { admin } => operate(&cli.config, &admin, cli::Action::Reload),
        Command::Warm { job, admin } => operate(&cli.config, &admin, cli::Action::Warm(job)),
        Command::Protect {
            state,
            name,
            duration,
            until,
            admin,
        } => {
            let switch = match (state, name) {
                (None, None) => None,
                (Some(state), Some(name)) => Some(cli::Protect {
                    on: state == "on",
                    name,
                    duration,
                    until,
                }),
                _ => {
                    eprintln!("aisle protect: write `aisle protect on|off NAME` (or no arguments to show the windows)");
                    return ExitCode::from(2);
                }
            };
            operate(&cli.config, &admin, cli::Action::Protect(switch))
        }
    }
}

/// Runs an operator command against the admin API named by `--admin` or the config.
fn operate(config: &Path, args: &AdminArgs, action: cli::Action) -> ExitCode {
    let target = match cli::target(
        config,
        args.admin.as_deref(),
        args.token_file.as_deref(),
        std::env::var("AISLE_ADMIN_TOKEN").ok(),
    ) {
        Ok(t) => t,
        Err(f) => {
            eprintln!("aisle: {}", f.message);
            return ExitCode::from(f.code);
        }
    };
    cli::run(&target, &action, args.json)
}

fn trace(
    requests: usize,
    seed: u64,
    duration: std::time::Duration,
    out: Option<&Path>,
) -> ExitCode {
    let opts = aisle::tools::tracegen::Options {
        requests,
        seed,
        duration,
        ..Default::default()
    };
    let written = match out {
        Some(path) => std::fs::File::create(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))
            .and_then(|f| {
                aisle::tools::tracegen::write_trace(&opts, &mut std::io::BufWriter::new(f))
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))
            }),
        None => match aisle::tools::tracegen::write_trace(&opts, &mut std::io::stdout().lock()) {
            // `aisle trace | head`: the reader has seen enough.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other.map_err(|e| format!("cannot write the trace to standard output: {e}")),
        },
    };
    match written {
        Ok(()) => {
            if let Some(path) = out {
                eprintln!(
                    "aisle trace: {requests} requests (seed {seed}) written to {}",
                    path.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aisle trace: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config, upgrade: bool) -> ExitCode {
    eprintln!(
        "aisle: proxy on {}://{}, admin on http://{} ({} rules)",
        if config.listener.tls.is_some() {
            "https"
        } else {
            "http"
        },
        config.listen,
        config.admin_listen,
        config.rules.len()
    );
    if config.admin.token.is_none() {
        eprintln!(
            "aisle: warning: the admin API is disabled (no [admin] token; the shipped config reads \
             AISLE_ADMIN_TOKEN): /admin/* answers 401 and PURGE only works from [admin] purge_allow"
        );
    }
    let isolating = config
        .rules
        .rules()
        .iter()
        .find(|r| matches!(r.authorization, aisle::rules::Authorization::Isolate { .. }));
    if let (None, Some(rule)) = (&config.cache.key_secret, isolating) {
        eprintln!(
            "aisle: warning: no [cache] key_secret: rule {:?} ({}) and any other with \
             authorization = \"isolate\" hash API keys with a random secret made for this process, \
             so isolated entries are not shared with other instances nor found after a restart; \
             set key_secret = \"${{AISLE_KEY_SECRET}}\", the same on every instance",
            rule.name, rule.origin
        );
    }
    if upgrade {
        eprintln!(
            "aisle: upgrade: waiting for the running gateway's sockets on {}; send it SIGQUIT now",
            config.upgrade_socket.display()
        );
    }
    match aisle::server::run(config, upgrade) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aisle: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(path: &Path) -> ExitCode {
    let token = aisle::tools::demo::admin_token();
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(origin) = config.upstreams.first().map(|u| u.address.clone()) else {
        eprintln!("aisle demo: the configuration has no upstream to play");
        return ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aisle demo: cannot start the demo origin: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match runtime.block_on(tokio::net::TcpListener::bind(&origin)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("aisle demo: cannot listen on {origin} for the demo origin: {e}; is something else using it?");
            return ExitCode::FAILURE;
        }
    };
    runtime.spawn(async move {
        if let Err(e) = aisle::tools::demo::serve(listener).await {
            eprintln!("aisle demo: the demo origin stopped: {e}");
        }
    });
    println!("{}", aisle::tools::demo::banner(&config, &origin, token));
    serve(config, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap's own consistency checks of every subcommand (names, groups, flags), which clap
    /// otherwise runs only when that subcommand is parsed.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
