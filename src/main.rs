//! The `switchyard` binary: CLI, logging, config, and running until a signal.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use switchyard::app::StartError;
use switchyard::config::Config;
use switchyard::control::Change;
use switchyard::ctl;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
use tracing_subscriber::filter::Directive;

/// jemalloc rather than glibc's malloc. A proxied request makes about a dozen allocations,
/// and glibc spent some 260 instructions on each allocation and its free: with jemalloc a
/// request costs 9 % fewer instructions over HTTP/1.1 and 6 % fewer over h2c. With its
/// purging thread on (`return_freed_memory`) it also gives memory back after a burst, and
/// an idle stream costs less (benches/RESULTS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Starts jemalloc's purging thread, which gives freed memory back to the system some
/// seconds after a burst. Without it, purging waits for later allocations, and a proxy
/// that goes quiet after a burst of streams keeps the burst's peak as its RSS. One thread
/// serves all arenas; it sleeps until there is something to purge.
fn return_freed_memory() {
    let started = tikv_jemalloc_ctl::max_background_threads::write(1)
        .and_then(|()| tikv_jemalloc_ctl::background_thread::write(true));
    if let Err(e) = started {
        tracing::warn!(error = %e, "jemalloc's purging thread did not start; freed memory is returned later");
    }
}

/// Lifts the soft open-file limit to the hard one: two sockets per proxied connection
/// (`switchyard::nofile`).
fn raise_open_file_limit() {
    match switchyard::nofile::raise() {
        Ok(limit) if limit.now > limit.was => {
            tracing::info!(from = limit.was, to = limit.now, "open-file limit raised");
        }
        Ok(limit) => tracing::debug!(limit = limit.now, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A blue/green traffic switch for Deepgram self-hosted API containers"
)]
struct Cli {
    /// Log format: human-readable text, or JSON lines for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, default_value = "config/switchyard.toml")]
        config: PathBuf,
    },
    /// Validate a config file and exit 0, or non-zero naming file, field and reason.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// The whole blue/green story on one machine: two stub upstreams and the proxy.
    Demo {
        #[arg(long, default_value_t = 8080)]
        proxy_port: u16,
        #[arg(long, default_value_t = 8081)]
        preview_port: u16,
        #[arg(long, default_value_t = 9901)]
        admin_port: u16,
    },
    /// A Deepgram-compatible stub server, for tests, demos and benchmarks.
    StubUpstream {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
        /// The `system_health` it reports at start.
        #[arg(long, default_value = "Healthy")]
        health: String,
    },
    /// A client for the admin API.
    Ctl {
        /// The admin API's base URL (`host:port` alone means `http://host:port`).
        #[arg(
            long,
            env = "SWITCHYARD_ADMIN",
            default_value = "http://127.0.0.1:9901"
        )]
        admin: String,
        /// A file holding the admin token (else SWITCHYARD_ADMIN_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Show the route table, colours and upstreams.
    Status,
    /// Send new traffic to a colour (default: the standby one).
    Flip {
        #[arg(long)]
        to: Option<String>,
        /// Flip even if the target has no healthy upstream.
        #[arg(long)]
        force: bool,
        /// How long the old colour's streams may run (default: drain.timeout).
        #[arg(long)]
        drain_timeout: Option<String>,
        #[arg(long)]
        expect_generation: Option<u64>,
        #[arg(long)]
        reason: Option<String>,
        /// With the etcd store: answer once every live replica applied the flip, waiting
        /// up to 10s (or `--wait-all=30s`); exit 1 naming the replicas that lag.
        #[arg(long, value_name = "TIMEOUT", num_args = 0..=1, require_equals = true, default_missing_value = "10s")]
        wait_all: Option<String>,
    },
    /// Send new traffic back to the rollback target.
    Rollback {
        #[arg(long)]
        force: bool,
        /// How long the colour left behind may keep its streams (default: drain.timeout).
        #[arg(long)]
        drain_timeout: Option<String>,
        #[arg(long)]
        expect_generation: Option<u64>,
        #[arg(long)]
        reason: Option<String>,
        /// As for flip.
        #[arg(long, value_name = "TIMEOUT", num_args = 0..=1, require_equals = true, default_missing_value = "10s")]
        wait_all: Option<String>,
    },
    /// Forget the rollback target.
    Commit {
        #[arg(long)]
        expect_generation: Option<u64>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Every route change, oldest first.
    History,
    /// Re-read the config file.
    Reload,
    /// Wait until a colour holds no traffic; exit 3 if the timeout passes first.
    WaitDrained {
        color: String,
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
}

/// `RUST_LOG`'s directives with every level above `max` lowered to it, and whether any
/// was. Release builds compile `trace` out (`release_max_level_debug`), and
/// tracing-subscriber answers a directive asking for it with a warning of its own on
/// stderr, coloured and not JSON, which would break a JSON log; a line through the log
/// says it instead.
fn log_directives(spec: &str, max: LevelFilter) -> (String, bool) {
    if max >= LevelFilter::TRACE {
        return (spec.to_string(), false);
    }
    let mut lowered = false;
    let directives: Vec<String> = spec
        .split(',')
        .map(|text| {
            // A directive is written back as `target[span{field}]=level` (a bare target
            // is `target=trace`); one that does not parse is left for EnvFilter to refuse.
            let Ok(directive) = text.trim().parse::<Directive>() else {
                return text.to_string();
            };
            let normal = directive.to_string();
            let written = normal.rsplit('=').next().unwrap_or_default();
            match written.parse::<LevelFilter>() {
                Ok(level) if level > max => {
                    lowered = true;
                    format!("{}{max}", &normal[..normal.len() - written.len()])
                }
                // Left as written, so nothing the user wrote is re-spelt.
                _ => text.to_string(),
            }
        })
        .collect();
    (directives.join(","), lowered)
}

fn init_logging(format: LogFormat) {
    let (filter, lowered) = match std::env::var("RUST_LOG") {
        Ok(spec) => {
            let (spec, lowered) = log_directives(&spec, STATIC_MAX_LEVEL);
            (
                tracing_subscriber::EnvFilter::try_new(spec).map(Some),
                lowered,
            )
        }
        Err(_) => (Ok(None), false),
    };
    // A RUST_LOG that does not parse is said so once logging is up, not silently `info`.
    let (filter, unreadable) = match filter {
        Ok(filter) => (filter, None),
        Err(e) => (None, Some(e)),
    };
    let filter = filter.unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, not escape codes in a log file.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder.init(),
    }
    if let Some(error) = unreadable {
        tracing::warn!(%error, "RUST_LOG is not a filter this build reads; logging at info");
    }
    // One that parses may still leave out every line of Switchyard's (`warning` is read as
    // a target's name, not a level), this one too: said on stderr all the same, as
    // `fatal` says why the process stopped.
    if std::env::var("RUST_LOG").is_ok_and(|spec| !spec.trim().eq_ignore_ascii_case("off"))
        && !tracing::enabled!(target: "switchyard", tracing::Level::ERROR)
    {
        let message = "RUST_LOG leaves out every line of Switchyard's, errors included: a level is one of error, warn, info, debug, trace, and any other word names a target (RUST_LOG=off says nothing on purpose)";
        unfiltered(format, tracing::Level::WARN, message, None);
    }
    if lowered {
        tracing::warn!(
            max = %STATIC_MAX_LEVEL,
            "RUST_LOG asks for more than this build logs: release builds leave trace out"
        );
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // A usage error exits 64 (EX_USAGE), not clap's 2, which `ctl` answers for a
            // change the API refused: automation can tell a typo from a 409.
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.log_format);
    let format = cli.log_format;
    if matches!(cli.command, Command::Run { .. } | Command::Demo { .. }) {
        return_freed_memory();
    }
    if matches!(
        cli.command,
        Command::Run { .. } | Command::Demo { .. } | Command::StubUpstream { .. }
    ) {
        raise_open_file_limit();
    }
    let runtime = match switchyard::runtime::build() {
        Ok(r) => r,
        Err(e) => {
            fatal(format, &e.to_string());
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            fatal(format, &describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error that ends the process: a JSON log line with `--log-format json`, so a log
/// pipeline reads why the process stopped; otherwise `error: ...` on stderr, as `nginx`
/// prints it.
fn fatal(format: LogFormat, message: &str) {
    match format {
        LogFormat::Json if tracing::enabled!(tracing::Level::ERROR) => {
            tracing::error!(error = %message, "switchyard stopped");
        }
        // RUST_LOG filtered errors out: the reason is still said, in the same shape.
        _ => unfiltered(
            format,
            tracing::Level::ERROR,
            "switchyard stopped",
            Some(message),
        ),
    }
}

/// A line on stderr whatever RUST_LOG lets through: shaped as the log's JSON lines with
/// `--log-format json`, else `error: ...` or `warning: ...` (the `error` when there is
/// one, else the message), as `nginx` prints them.
fn unfiltered(format: LogFormat, level: tracing::Level, message: &str, error: Option<&str>) {
    match format {
        LogFormat::Json => {
            let mut line = serde_json::json!({
                "level": level.as_str(),
                "message": message,
                "target": module_path!(),
            });
            if let Some(error) = error {
                line["error"] = error.into();
            }
            eprintln!("{line}");
        }
        LogFormat::Text => {
            let prefix = if level == tracing::Level::ERROR {
                "error"
            } else {
                "warning"
            };
            eprintln!("{prefix}: {}", error.unwrap_or(message));
        }
    }
}

/// An error and its causes on one line, each cause once: most of Switchyard's errors
/// already say what their source says.
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

async fn dispatch(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Check { config } => Ok(check(&config)),
        Command::Run { config } => {
            let config = Config::load(&config).map_err(anyhow::Error::msg)?;
            switchyard::nofile::warn_if_short(&config);
            run(config).await
        }
        Command::Demo {
            proxy_port,
            preview_port,
            admin_port,
        } => demo(proxy_port, preview_port, admin_port).await,
        Command::StubUpstream {
            listen,
            name,
            health,
        } => stub_upstream(listen, name, health).await,
        Command::Ctl {
            admin,
            token_file,
            json,
            command,
        } => {
            let token = ctl_token(token_file.as_deref())?;
            // As curl takes it: an address without a scheme is plain HTTP.
            let admin = if admin.contains("://") {
                admin
            } else {
                format!("http://{admin}")
            };
            let code = ctl::run(&ctl::Options { admin, token, json }, command.into()).await;
            Ok(u8::try_from(code).unwrap_or(1))
        }
    }
}

/// `switchyard check`: 0 when `run` would start on this config, else 1 with the reason.
fn check(config: &Path) -> u8 {
    let c = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    // The files the config names, and the admin token: `run` in this environment would
    // refuse to start without one, so `check` refuses too (a pipeline that checks without
    // the secret can set SWITCHYARD_ADMIN_TOKEN to anything for the check).
    if let Err(e) = switchyard::control::load_settings(c.clone()) {
        eprintln!("error: {e}");
        return 1;
    }
    // A state file `run` would refuse is refused here too (the etcd store's copy is only a
    // fallback, read when etcd is down).
    if c.routing.store == switchyard::config::Store::File
        && let Err(e) = switchyard::state::FileStore::new(&c.routing.state_file).load()
    {
        eprintln!("error: {e}");
        return 1;
    }
    println!("{}: ok", config.display());
    0
}

/// `switchyard stub-upstream`: serves until SIGTERM or SIGINT.
async fn stub_upstream(listen: SocketAddr, name: String, health: String) -> anyhow::Result<u8> {
    let mut stop = Stop::new()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen: cannot listen on {listen}"))?;
    tracing::info!(%listen, %name, "stub upstream listening");
    let stub = switchyard::stub::Stub::new(switchyard::stub::StubOptions {
        name,
        health,
        ..Default::default()
    });
    stub.serve(listener, async move { stop.recv().await })
        .await?;
    Ok(0)
}

/// The admin token `ctl` sends: `--token-file`'s, else SWITCHYARD_ADMIN_TOKEN's, else none.
/// Trimmed, as `run` reads them: a token written with `echo` ends in a newline, which no
/// header value may hold.
fn ctl_token(token_file: Option<&Path>) -> anyhow::Result<Option<String>> {
    if let Some(f) = token_file {
        let token = std::fs::read_to_string(f)
            .with_context(|| format!("--token-file {}", f.display()))?
            .trim()
            .to_owned();
        anyhow::ensure!(!token.is_empty(), "--token-file {} is empty", f.display());
        return Ok(Some(token));
    }
    // Not text: refused, as `run` refuses it, rather than sent as no token.
    match std::env::var("SWITCHYARD_ADMIN_TOKEN") {
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("SWITCHYARD_ADMIN_TOKEN is not UTF-8 text")
        }
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(t) => Ok(Some(t.trim().to_owned()).filter(|t| !t.is_empty())),
    }
}

impl From<CtlCommand> for ctl::Command {
    fn from(command: CtlCommand) -> ctl::Command {
        match command {
            CtlCommand::Status => ctl::Command::Status,
            CtlCommand::History => ctl::Command::History,
            CtlCommand::Reload => ctl::Command::Reload,
            CtlCommand::Flip {
                to,
                force,
                drain_timeout,
                expect_generation,
                reason,
                wait_all,
            } => ctl::Command::Flip {
                to,
                force,
                drain_timeout,
                expect_generation,
                reason,
                wait_replicas: wait_all,
            },
            CtlCommand::Rollback {
                force,
                drain_timeout,
                expect_generation,
                reason,
                wait_all,
            } => ctl::Command::Rollback {
                force,
                drain_timeout,
                expect_generation,
                reason,
                wait_replicas: wait_all,
            },
            CtlCommand::Commit {
                expect_generation,
                reason,
            } => ctl::Command::Commit {
                expect_generation,
                reason,
            },
            CtlCommand::WaitDrained { color, timeout } => {
                ctl::Command::WaitDrained { color, timeout }
            }
        }
    }
}

/// SIGTERM and SIGINT, taken over from their default action (exit at once).
///
/// Made before anything listens and kept for the life of the process: a signal that
/// arrives while no handler is installed kills the process, and one that arrives before a
/// stream exists is not seen by a stream made later.
struct Stop {
    term: Signal,
    int: Signal,
}

impl Stop {
    fn new() -> std::io::Result<Stop> {
        Ok(Stop {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Runs until SIGTERM/SIGINT, reloading on SIGHUP; a second stop signal exits at once.
async fn run(config: Config) -> anyhow::Result<u8> {
    // Before start: SIGHUP's default action would kill a proxy reloaded during start-up.
    let mut hup = signal(SignalKind::hangup())?;
    let mut stop = Stop::new()?;
    let handle = switchyard::app::start(config).await?;
    let control = handle.control.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match control.apply(Change::Reload).await {
                Ok(outcome) => tracing::info!(
                    generation = outcome.table.generation,
                    "reloaded the config (SIGHUP)"
                ),
                Err(e) => tracing::error!(error = %e, "reload refused; the old config stays"),
            }
        }
    });
    stop.recv().await;
    handle.shutdown();
    tokio::select! {
        _ = handle.wait() => Ok(0),
        _ = stop.recv() => {
            tracing::warn!("second stop signal: exiting now");
            Ok(1)
        }
    }
}

async fn demo(proxy_port: u16, preview_port: u16, admin_port: u16) -> anyhow::Result<u8> {
    use switchyard::stub::{StubOptions, spawn};
    let mut stop = Stop::new()?;
    let blue = spawn(StubOptions {
        name: "blue".into(),
        ..Default::default()
    })
    .await?;
    let green = spawn(StubOptions {
        name: "green".into(),
        ..Default::default()
    })
    .await?;
    // Removed however the demo ends, a refused start included.
    let scratch = ScratchDir::create(
        std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id())),
    )?;
    let dir = scratch.0.clone();
    let token = format!("demo-{:016x}", fastrand::u64(..));
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, &token)?;
    let config_text = format!(
        r#"
[listen]
proxy = "127.0.0.1:{proxy_port}"
preview = "127.0.0.1:{preview_port}"
admin = "127.0.0.1:{admin_port}"
[pools]
blue = ["{blue}"]
green = ["{green}"]
[routing]
state_file = "{state}"
[drain]
timeout = "20s"
grace = "5s"
[health]
interval = "1s"
[admin]
token_file = "{token_file}"
"#,
        blue = blue.url(),
        green = green.url(),
        state = dir.join("route.json").display(),
        token_file = token_file.display(),
    );
    let config_path = dir.join("switchyard.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = Config::load(&config_path).map_err(anyhow::Error::msg)?;
    let handle = switchyard::app::start(config).await.map_err(|e| match e {
        // The demo's ports are flags, not config fields.
        StartError::Bind {
            field,
            addr,
            source,
        } => {
            let flag = match field {
                "listen.proxy" => "--proxy-port",
                "listen.preview" => "--preview-port",
                _ => "--admin-port",
            };
            anyhow::anyhow!("{flag}: cannot listen on {addr}: {source}")
        }
        other => other.into(),
    })?;
    let admin = format!("http://{}", handle.admin_addr);
    // The commands name this very binary, whether cargo built it or it was installed.
    let me = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "switchyard".to_owned());
    println!(
        r#"
Switchyard demo: blue stub at {blue}, green stub at {green}.
  proxy    http://{proxy}   (active colour)
  preview  http://{preview}   (standby colour)
  admin    {admin}   token in {token_file}

Try:
  curl -si -X POST --data-binary 'hello' http://{proxy}/v1/listen | grep -i -e x-switchyard-color -e x-stub-name
  curl -s {admin}/status
  {me} ctl --admin {admin} --token-file {token_file} status
  {me} ctl --admin {admin} --token-file {token_file} flip --to green --reason demo
  curl -si -X POST --data-binary 'hello' http://{proxy}/v1/listen | grep -i x-switchyard-color
  {me} ctl --admin {admin} --token-file {token_file} rollback
  {me} ctl --admin {admin} --token-file {token_file} history
  curl -s {admin}/metrics | grep switchyard_active_color
Streams: ws://{proxy}/v1/listen keeps its colour across a flip and is drained
(CloseStream, finals, close 1012) 20 s after it. Ctrl-C to stop (twice: at once).
"#,
        blue = blue.url(),
        green = green.url(),
        proxy = handle.proxy_addr,
        preview = handle
            .preview_addr
            .map(|a| a.to_string())
            .unwrap_or_default(),
        token_file = token_file.display(),
    );
    stop.recv().await;
    handle.shutdown();
    // As for `run`, a second signal does not wait for open streams' drain; the demo has
    // nothing to keep, so it still exits 0 (and removes its scratch directory).
    tokio::select! {
        _ = handle.wait() => {}
        _ = stop.recv() => tracing::warn!("second stop signal: exiting now"),
    }
    Ok(0)
}

/// A directory of the process's own, removed with everything in it when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `path` readable by this user only (it holds the demo's admin token); one
    /// left by an earlier process of the same PID is replaced.
    fn create(path: PathBuf) -> anyhow::Result<ScratchDir> {
        use std::os::unix::fs::DirBuilderExt;
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        let created = match builder.create(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_dir_all(&path).and_then(|()| builder.create(&path))
            }
            other => other,
        };
        created.with_context(|| format!("creating {}", path.display()))?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use tracing::level_filters::LevelFilter;

    #[test]
    fn log_levels_beyond_the_build_are_lowered_to_it() {
        let debug = LevelFilter::DEBUG;
        let lowered = |spec: &str| super::log_directives(spec, debug);
        assert_eq!(lowered("info"), ("info".into(), false));
        assert_eq!(lowered("trace"), ("debug".into(), true));
        assert_eq!(
            lowered("info,switchyard=trace,hyper=warn"),
            ("info,switchyard=debug,hyper=warn".into(), true)
        );
        // A bare target means every level; a span filter's `=` is not the level's.
        assert_eq!(lowered("h2"), ("h2=debug".into(), true));
        assert_eq!(
            lowered("switchyard[stream{session=trace}]=debug"),
            ("switchyard[stream{session=trace}]=debug".into(), false)
        );
        // What does not parse is left for EnvFilter to refuse; a build that keeps trace
        // changes nothing.
        assert_eq!(lowered("=nonsense="), ("=nonsense=".into(), false));
        assert_eq!(
            super::log_directives("trace", LevelFilter::TRACE),
            ("trace".into(), false)
        );
    }
    /// The purging thread is what gives a burst's memory back; it needs jemalloc built with
    /// background-thread support (tikv-jemallocator's default features).
    #[test]
    fn jemalloc_purges_with_one_background_thread() {
        super::return_freed_memory();
        assert_eq!(tikv_jemalloc_ctl::background_thread::read(), Ok(true));
        assert_eq!(tikv_jemalloc_ctl::max_background_threads::read(), Ok(1));
    }

    /// A wrapper that prints its source, over one that does not: each cause once.
    #[test]
    fn describe_names_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("state file x.json: not valid ({0}); fix or remove it")]
        struct Inner(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("{0}")]
        struct Outer(#[from] Inner);
        let io = std::io::Error::other("EOF at line 2");
        let error = anyhow::Error::new(Outer(Inner(io))).context("cannot start");
        assert_eq!(
            super::describe(&error),
            "cannot start: state file x.json: not valid (EOF at line 2); fix or remove it"
        );
    }
}
