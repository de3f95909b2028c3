//! Typed, validated configuration and the error that names what is wrong.
//!
//! Loading is two stages: `config::file` is the serde mirror of the TOML (unknown keys
//! rejected), and `Config::from_file` turns it into typed values in one place, so every
//! refusal names the file, the field and the reason. The files a config names (the admin
//! token, client keys, certificates) are read by `control::load_settings`, not here: a
//! reload reads them again, and the route table holds what they said.

mod file;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};

use crate::upstream::Color;

/// The longest timeout or interval taken: humantime's "10y".
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10 * 31_557_600);

/// A refused configuration: which file, which field (`-` when the file as a whole is
/// refused: unreadable, or not TOML), and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The config file (or the file a field points at).
    pub file: String,
    /// Dotted path of the offending key, e.g. `pools.blue[1]`.
    pub field: String,
    /// What is wrong, for a human.
    pub reason: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.field.as_str() {
            "" | "-" => write!(f, "{}: {}", self.file, self.reason),
            field => write!(f, "{}: {field}: {}", self.file, self.reason),
        }
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from; reload re-reads it.
    pub source: PathBuf,
    pub listen: Listen,
    pub tls: Option<TlsFiles>,
    pub pools: Pools,
    pub routing: Routing,
    pub drain: Drain,
    pub health: Health,
    pub admin: Admin,
    pub client_auth: Option<ClientAuth>,
    pub limits: Limits,
    pub upstream_tls: UpstreamTls,
}

/// Listener addresses; these cannot change on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub proxy: SocketAddr,
    pub preview: Option<SocketAddr>,
    pub admin: SocketAddr,
}

/// PEM files for TLS termination on the proxy and preview listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The two colours' upstream URLs, each non-empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pools {
    pub blue: Vec<UpstreamUrl>,
    pub green: Vec<UpstreamUrl>,
}

/// Where the route state lives.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Active colour on the very first start (no state yet).
    pub initial: Color,
    /// The state file; with the etcd store it is the fail-static copy.
    pub state_file: PathBuf,
    pub store: Store,
}

/// The route state store.
#[derive(Debug, Clone, PartialEq)]
pub enum Store {
    /// One proxy, one file.
    File,
    /// Several replicas share one key in etcd.
    Etcd(EtcdStore),
}

/// `routing.etcd`.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdStore {
    pub endpoints: Vec<String>,
    pub key: String,
    pub replica_id: Option<String>,
    pub lease_ttl: Duration,
    pub timeout: Duration,
}

/// How long old-colour streams may run after a flip, and how long finals may take after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    pub timeout: Duration,
    pub grace: Duration,
}

/// How an upstream's health is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthMode {
    /// A 200 whose JSON `system_health` is Ready, Healthy or Degraded.
    Deepgram,
    /// Any 2xx.
    Http,
    /// No probes; only connect errors on live traffic mark an upstream down.
    Off,
}

/// Active health checking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub mode: HealthMode,
    pub path: PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// The admin API's bearer token source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub token_file: PathBuf,
}

/// Client keys for the proxy and preview listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    pub keys_file: PathBuf,
}

/// Timeouts and connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// A WebSocket stream whose client or upstream takes none of the bytes Switchyard
    /// holds for it for this long is ended (a side that stopped reading would hold the
    /// stream, and its connections, until a drain); so is a plain request whose client
    /// stops reading its answer or sending its body, or whose upstream stops sending a
    /// body it began (`proxy::stall`). Not in SPEC's table; default 5m.
    pub stall_timeout: Duration,
}

/// Trust for `https://` upstreams.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamTls {
    /// `None`: the system roots.
    pub ca_file: Option<PathBuf>,
}

/// A parsed pool entry: `http://host:port` or `https://host:port`, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl UpstreamUrl {
    /// Parses a pool entry; the error is the reason, for `ConfigError`.
    pub fn parse(text: &str) -> Result<UpstreamUrl, String> {
        let shown = without_credentials(text);
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("`{shown}` is not a URL: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            Some(other) => return Err(format!("`{shown}`: scheme `{other}` is not http or https")),
            None => return Err(format!("`{shown}` has no scheme (http:// or https://)")),
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{shown}` has no host"))?;
        if authority.host().is_empty() {
            return Err(format!("`{shown}` has no host"));
        }
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{shown}`: credentials in the URL are not supported"
            ));
        }
        // `http` reads a port that is not a u16 as no port at all, which would mean 80 or
        // 443 here: one written must be a port.
        let port = authority.as_str().strip_prefix(authority.host());
        if let Some(port) = port.and_then(|rest| rest.strip_prefix(':'))
            && !(port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().is_ok_and(|p| p > 0))
        {
            return Err(format!(
                "`{shown}`: the port must be a number from 1 to 65535"
            ));
        }
        if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
            return Err(format!(
                "`{shown}`: a pool URL is scheme://host:port only; paths are passed from the client"
            ));
        }
        Ok(UpstreamUrl { scheme, authority })
    }

    /// True for `https://`.
    pub fn is_tls(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// The port, defaulting by scheme.
    pub fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.is_tls() { 443 } else { 80 })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            field: "-".into(),
            reason: format!("cannot read the file: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file_name = path.display().to_string();
        let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError {
            file: file_name.clone(),
            field: "-".into(),
            reason: toml_reason(&e, text),
        })?;
        let raw: file::File = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let field = e.path().to_string();
            ConfigError {
                file: file_name.clone(),
                field: if field == "." { "-".into() } else { field },
                reason: toml_reason(&e.into_inner(), text),
            }
        })?;
        Config::from_file(path, raw)
    }

    fn from_file(path: &Path, raw: file::File) -> Result<Config, ConfigError> {
        let err = |field: &str, reason: String| ConfigError {
            file: path.display().to_string(),
            field: field.into(),
            reason,
        };
        // Bounded above too: hyper adds `header_read_timeout` to the clock, and a shutdown
        // adds `drain.timeout` and `drain.grace`, and both panic past what the clock can
        // hold; no real timeout or interval is anywhere near ten years.
        let bounded = |field: &str, d: Duration| {
            if d > MAX_TIMEOUT {
                Err(err(field, "must be at most 10 years".into()))
            } else {
                Ok(d)
            }
        };
        let positive = |field: &str, d: Duration| {
            if d.is_zero() {
                Err(err(field, "must be greater than zero".into()))
            } else {
                bounded(field, d)
            }
        };
        let addr = |field: &str, value: Option<&String>| -> Result<SocketAddr, ConfigError> {
            let value = value.ok_or_else(|| err(field, "is required".into()))?;
            value
                .parse()
                .map_err(|e| err(field, format!("`{value}` is not an address (ip:port): {e}")))
        };

        let listen = raw
            .listen
            .ok_or_else(|| err("listen", "is required".into()))?;
        let listen = Listen {
            proxy: addr("listen.proxy", listen.proxy.as_ref())?,
            preview: match &listen.preview {
                Some(p) => Some(addr("listen.preview", Some(p))?),
                None => None,
            },
            admin: addr("listen.admin", listen.admin.as_ref())?,
        };
        // Two listeners cannot share an address (port 0 asks the system for a fresh one).
        if let Some(preview) = listen.preview
            && clash(preview, listen.proxy)
        {
            return Err(err(
                "listen.preview",
                format!("{preview} overlaps listen.proxy ({})", listen.proxy),
            ));
        }
        if clash(listen.admin, listen.proxy) {
            return Err(err(
                "listen.admin",
                format!("{} overlaps listen.proxy ({})", listen.admin, listen.proxy),
            ));
        }
        if let Some(preview) = listen.preview
            && clash(listen.admin, preview)
        {
            return Err(err(
                "listen.admin",
                format!("{} overlaps listen.preview ({preview})", listen.admin),
            ));
        }

        let pools = raw
            .pools
            .ok_or_else(|| err("pools", "is required".into()))?;
        let pool = |name: &str,
                    urls: Option<Vec<String>>|
         -> Result<Vec<UpstreamUrl>, ConfigError> {
            let field = format!("pools.{name}");
            let urls =
                urls.ok_or_else(|| err(&field, "is required (both colours need a pool)".into()))?;
            if urls.is_empty() {
                return Err(err(
                    &field,
                    "is empty: a pool needs at least one upstream URL".into(),
                ));
            }
            let mut parsed: Vec<UpstreamUrl> = Vec::with_capacity(urls.len());
            for (i, url) in urls.iter().enumerate() {
                let u = UpstreamUrl::parse(url).map_err(|r| err(&format!("{field}[{i}]"), r))?;
                if parsed.contains(&u) {
                    return Err(err(
                        &format!("{field}[{i}]"),
                        format!("`{url}` is listed twice"),
                    ));
                }
                parsed.push(u);
            }
            Ok(parsed)
        };
        let pools = Pools {
            blue: pool("blue", pools.blue)?,
            green: pool("green", pools.green)?,
        };

        let initial: Color = raw
            .routing
            .initial
            .parse()
            .map_err(|e: String| err("routing.initial", e))?;
        if raw.routing.state_file.is_empty() {
            return Err(err("routing.state_file", "must not be empty".into()));
        }
        let store = match raw.routing.store.as_str() {
            "file" => {
                if raw.routing.etcd.is_some() {
                    return Err(err(
                        "routing.etcd",
                        "is set but routing.store is \"file\"; set store = \"etcd\" to use it"
                            .into(),
                    ));
                }
                Store::File
            }
            "etcd" => {
                let etcd = raw.routing.etcd.ok_or_else(|| {
                    err("routing.etcd", "is required when store = \"etcd\"".into())
                })?;
                if etcd.endpoints.is_empty() {
                    return Err(err(
                        "routing.etcd.endpoints",
                        "needs at least one endpoint".into(),
                    ));
                }
                for endpoint in &etcd.endpoints {
                    check_etcd_endpoint(endpoint)
                        .map_err(|reason| err("routing.etcd.endpoints", reason))?;
                }
                if etcd.key.is_empty() {
                    return Err(err("routing.etcd.key", "must not be empty".into()));
                }
                if etcd
                    .replica_id
                    .as_ref()
                    .is_some_and(|id| id.trim().is_empty())
                {
                    return Err(err(
                        "routing.etcd.replica_id",
                        "must not be empty (leave it out for host:admin-port)".into(),
                    ));
                }
                positive("routing.etcd.lease_ttl", etcd.lease_ttl)?;
                positive("routing.etcd.timeout", etcd.timeout)?;
                if !cfg!(feature = "etcd") {
                    return Err(err(
                        "routing.store",
                        "\"etcd\" needs a build with the etcd feature: \
                         `cargo build --release --features etcd` (needs protoc)"
                            .into(),
                    ));
                }
                Store::Etcd(EtcdStore {
                    endpoints: etcd.endpoints,
                    key: etcd.key,
                    replica_id: etcd.replica_id,
                    lease_ttl: etcd.lease_ttl,
                    timeout: etcd.timeout,
                })
            }
            other => {
                return Err(err(
                    "routing.store",
                    format!("`{other}` is not a store; use \"file\" or \"etcd\""),
                ));
            }
        };

        let health = raw.health;
        let mode = match health.mode.as_str() {
            "deepgram" => HealthMode::Deepgram,
            "http" => HealthMode::Http,
            "off" => HealthMode::Off,
            other => {
                return Err(err(
                    "health.mode",
                    format!("`{other}` is not a mode; use \"deepgram\", \"http\" or \"off\""),
                ));
            }
        };
        if !health.path.starts_with('/') {
            return Err(err(
                "health.path",
                format!("`{}` must start with /", health.path),
            ));
        }
        let health_path: PathAndQuery = health.path.parse().map_err(|e| {
            err(
                "health.path",
                format!("`{}` is not a path: {e}", health.path),
            )
        })?;
        let health = Health {
            mode,
            path: health_path,
            interval: positive("health.interval", health.interval)?,
            timeout: positive("health.timeout", health.timeout)?,
            rise: if health.rise == 0 {
                return Err(err("health.rise", "must be at least 1".into()));
            } else {
                health.rise
            },
            fall: if health.fall == 0 {
                return Err(err("health.fall", "must be at least 1".into()));
            } else {
                health.fall
            },
        };

        let limits = Limits {
            connect_timeout: positive("limits.connect_timeout", raw.limits.connect_timeout)?,
            response_timeout: positive("limits.response_timeout", raw.limits.response_timeout)?,
            header_read_timeout: positive(
                "limits.header_read_timeout",
                raw.limits.header_read_timeout,
            )?,
            max_connections: if raw.limits.max_connections == 0 {
                return Err(err("limits.max_connections", "must be at least 1".into()));
            } else {
                raw.limits.max_connections
            },
            stall_timeout: positive("limits.stall_timeout", raw.limits.stall_timeout)?,
        };

        let non_empty = |field: &str, value: String| -> Result<PathBuf, ConfigError> {
            if value.is_empty() {
                Err(err(field, "must not be empty".into()))
            } else {
                Ok(PathBuf::from(value))
            }
        };

        Ok(Config {
            source: path.to_path_buf(),
            listen,
            tls: match raw.tls {
                Some(t) => Some(TlsFiles {
                    cert: non_empty("tls.cert", t.cert)?,
                    key: non_empty("tls.key", t.key)?,
                }),
                None => None,
            },
            pools,
            routing: Routing {
                initial,
                state_file: PathBuf::from(raw.routing.state_file),
                store,
            },
            drain: Drain {
                timeout: bounded("drain.timeout", raw.drain.timeout)?,
                grace: bounded("drain.grace", raw.drain.grace)?,
            },
            health,
            admin: Admin {
                token_file: non_empty("admin.token_file", raw.admin.token_file)?,
            },
            client_auth: match raw.client_auth {
                Some(c) => Some(ClientAuth {
                    keys_file: non_empty("client_auth.keys_file", c.keys_file)?,
                }),
                None => None,
            },
            limits,
            upstream_tls: UpstreamTls {
                ca_file: match raw.upstream_tls.and_then(|u| u.ca_file) {
                    Some(f) => Some(non_empty("upstream_tls.ca_file", f)?),
                    None => None,
                },
            },
        })
    }

    /// The refusal of a config that leaves the admin API without a token (`check`, a
    /// reload): neither its token file nor `SWITCHYARD_ADMIN_TOKEN` holds one. `read`: why
    /// the file could not be read, when it could not (a missing Secret mount and a
    /// permission denied call for different fixes).
    pub fn no_token_error(&self, read: Option<&std::io::Error>) -> ConfigError {
        let path = self.admin.token_file.display();
        let file = match read {
            Some(e) => format!("{path} cannot be read ({e})"),
            None => format!("{path} is empty"),
        };
        self.refused(
            "admin.token_file",
            format!(
                "no admin token: {file} and SWITCHYARD_ADMIN_TOKEN is not set or empty; admin writes are never open"
            ),
        )
    }

    /// The refusal of this config's `field` for `reason`, naming its file.
    pub fn refused(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.source.display().to_string(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Names the first field a reload may not change, if any (listeners and the store).
    pub fn reload_conflict(&self, new: &Config) -> Option<ConfigError> {
        let err = |field: &str| {
            new.refused(
                field,
                "cannot change on reload; restart Switchyard to change it",
            )
        };
        if self.listen.proxy != new.listen.proxy {
            return Some(err("listen.proxy"));
        }
        if self.listen.preview != new.listen.preview {
            return Some(err("listen.preview"));
        }
        if self.listen.admin != new.listen.admin {
            return Some(err("listen.admin"));
        }
        if self.tls.is_some() != new.tls.is_some() {
            return Some(err("tls"));
        }
        match (&self.routing.store, &new.routing.store) {
            (Store::Etcd(old), Store::Etcd(new)) => {
                let fields = [
                    (old.endpoints != new.endpoints, "routing.etcd.endpoints"),
                    (old.key != new.key, "routing.etcd.key"),
                    (old.replica_id != new.replica_id, "routing.etcd.replica_id"),
                    (old.lease_ttl != new.lease_ttl, "routing.etcd.lease_ttl"),
                    (old.timeout != new.timeout, "routing.etcd.timeout"),
                ];
                if let Some((_, field)) = fields.into_iter().find(|&(changed, _)| changed) {
                    return Some(err(field));
                }
            }
            (old, new) if old != new => return Some(err("routing.store")),
            _ => {}
        }
        if self.routing.state_file != new.routing.state_file {
            return Some(err("routing.state_file"));
        }
        None
    }
}

/// An etcd endpoint is a host and a port, with `http://` or without a scheme (etcdctl's
/// way, which the etcd client reads as http), nothing more. This build's etcd client has
/// no TLS, so `https://` is refused here rather than when it first connects.
fn check_etcd_endpoint(endpoint: &str) -> Result<(), String> {
    let shown = without_credentials(endpoint);
    let bad = |why: &str| format!("`{shown}` {why}; write it as http://host:2379");
    let with_scheme = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let uri: Uri = with_scheme.parse().map_err(|_| bad("is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "uses TLS, which this build's etcd client does not support",
            ));
        }
        _ => return Err(bad("needs the scheme http://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("names no host"));
    }
    if uri.port_u16().is_none_or(|port| port == 0) {
        return Err(bad("needs a port from 1 to 65535"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad("must not have a path"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(bad(
            "has credentials, which this build's etcd client would not send (no etcd auth)",
        ));
    }
    Ok(())
}

/// `text` (a URL, a bare `user:password@host:port`, or a message quoting one) with all
/// up to its last `@` left out, from after its first `://` or opening quote before that
/// `@` (else from the start): a password written into the config must not be repeated in
/// logs or API answers. Where a URL ends cannot be told (a password may hold spaces,
/// quotes, `/` or `#`), so this may leave out more than the user-info, never less.
fn without_credentials(text: &str) -> String {
    let Some((before, after)) = text.rsplit_once('@') else {
        return text.to_owned();
    };
    let start = [
        before.find("://").map(|i| i + "://".len()),
        before.find(['"', '`']).map(|i| i + 1),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(0);
    let (kept, _) = before.split_at(start);
    format!("{kept}…@{after}")
}

/// toml's message on one line, with where in `text` it is. toml's own rendering is not
/// used: its source excerpt would repeat the line, value and all, into logs and API answers.
fn toml_reason(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    // A value of the wrong type is quoted whole ("invalid type: string \"http://...\"").
    let message = without_credentials(&message);
    match e.span().and_then(|span| text.get(..span.start)) {
        Some(before) => {
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// Whether two listeners would take one address: the same port (not 0) and the same IP,
/// or a wildcard that covers the other (`0.0.0.0` covers IPv4; `[::]` covers both, as
/// Linux binds it dual-stack).
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |w: std::net::IpAddr, x: std::net::IpAddr| {
        w.is_unspecified() && (w.is_ipv6() || x.is_ipv4())
    };
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

#[cfg(test)]
mod tests;
