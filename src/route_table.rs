//! The immutable route table and the one `ArcSwap` that holds it.
//!
//! Everything the request path needs to decide — active colour, pools, health (through the
//! shared `Upstream`s), drain orders, timeouts, client keys, the TLS certificate — is in one
//! `RouteTable`, swapped whole. A request loads it once and keeps what it got; a change is a
//! new table built by `control`, the single writer. Streams subscribe to changes to learn
//! their drain deadlines.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::{ArcSwap, Guard};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::config::{Config, UpstreamUrl};
use crate::drain::DrainOrder;
use crate::state::RouteState;
use crate::upstream::{Color, Observed, Upstream};

/// One colour's upstreams in this table.
pub type Pool = Arc<[Arc<Upstream>]>;

/// The routing state at one generation. Never mutated; replaced whole.
#[derive(Debug)]
pub struct RouteTable {
    /// Where new traffic on the proxy listener goes.
    pub active: Color,
    /// The colour `rollback` returns to; `None` after a commit.
    pub rollback_to: Option<Color>,
    /// Grows by one on every change, so callers can detect races (`expect_generation`).
    pub generation: u64,
    /// When this generation began.
    pub changed_at: SystemTime,
    /// Upstreams per colour, indexed by `Color::index`.
    pub pools: [Pool; 2],
    /// Per colour: the order draining its older streams, if a flip moved traffic away.
    pub drains: [Option<DrainOrder>; 2],
    /// What a reload may change besides the pools.
    pub settings: Arc<Settings>,
    /// The persisted state this table was made from, history included: `/history` reads
    /// it here, so it never shows a change whose table is not yet the route. `active`,
    /// `rollback_to`, `generation` and `changed_at` above are its typed copies, read on
    /// every request without going through it; the writer sets both from one value.
    pub state: Arc<RouteState>,
}

/// Reloadable settings that travel with the table, so one load sees one consistent config.
#[derive(Debug)]
pub struct Settings {
    /// The validated config these came from.
    pub config: Arc<Config>,
    /// Keys accepted on the proxy and preview listeners; `None`: no client auth.
    pub client_keys: Option<ClientKeys>,
    /// The certificate served on the proxy and preview listeners.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Whom `https://` upstreams are trusted by (`upstream_tls.ca_file`, or the system
    /// roots): requests, upgrades and health probes use the table's, so a reload that
    /// rotates the CA applies to every connection made after it.
    pub upstream_tls: Arc<rustls::ClientConfig>,
    /// The CA file's bytes `upstream_tls` was built from (`None`: the system roots), so a
    /// reload that leaves them alone keeps the same trust and its connections.
    pub upstream_ca: Option<Vec<u8>>,
    /// The admin API's bearer token, read again on every reload so a rotated token takes
    /// effect (start-up, reload and `check` refuse a config without one).
    pub admin_token: crate::admin::Token,
}

impl Settings {
    /// Client auth for a log line: `off`, or how many keys are listed (never which).
    pub fn client_auth(&self) -> String {
        match &self.client_keys {
            Some(keys) if keys.len() == 1 => "1 key".to_owned(),
            Some(keys) => format!("{} keys", keys.len()),
            None => "off".to_owned(),
        }
    }
}

/// Client keys, compared in constant time; never printed.
pub struct ClientKeys(Vec<Box<[u8]>>);

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientKeys({} keys)", self.0.len())
    }
}

impl ClientKeys {
    /// Parses a keys file: one key per line; blank lines and lines starting with `#`
    /// skipped, a leading byte-order mark too. A key is printable ASCII without spaces,
    /// since it must fit `Authorization: Token <key>` and a `Sec-WebSocket-Protocol`
    /// element; a line that is not one is refused, naming its number but not its text (it
    /// may be a key), because it could never match: `key # note`, `Token key`, a key
    /// pasted with a control character.
    pub fn parse(text: &str) -> Result<ClientKeys, String> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut keys = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fault = line.bytes().find_map(|b| match b {
                b'!'..=b'~' => None,
                b' ' | b'\t' => {
                    Some("a space inside (a key has none, and a comment must start its line)")
                }
                0..=0x1f | 0x7f => Some("a control character"),
                _ => Some("a character that is not ASCII"),
            });
            if let Some(fault) = fault {
                return Err(format!(
                    "line {} has {fault}; a key is printable ASCII without spaces",
                    number + 1
                ));
            }
            keys.push(line.as_bytes().into());
        }
        Ok(ClientKeys(keys))
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none (every request is refused).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `presented` is a listed key. Every key is compared, in constant time, so the
    /// answer's timing says nothing about which key came close.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let mut found = subtle::Choice::from(0u8);
        for key in &self.0 {
            found |= key.as_ref().ct_eq(presented);
        }
        found.into()
    }
}

impl RouteTable {
    /// The colour that is not active.
    pub fn standby(&self) -> Color {
        self.active.other()
    }

    /// A colour's upstreams.
    pub fn pool(&self, color: Color) -> &Pool {
        &self.pools[color.index()]
    }

    /// The drain order on a colour, if any.
    pub fn drain_order(&self, color: Color) -> Option<DrainOrder> {
        self.drains[color.index()]
    }

    /// Whether a colour has an upstream judged healthy: the flip's gate and /readyz.
    pub fn has_healthy(&self, color: Color) -> bool {
        // An upstream no probe has judged yet (its first probe outran the wait for it, or
        // checks were just turned on) is presumed healthy for traffic, but not counted
        // here: the flip's gate and /readyz wait for a verdict. With health checks off
        // there is none to wait for.
        let checked = self.settings.config.health.mode != crate::config::HealthMode::Off;
        let judged = |u: &Upstream| {
            !checked || !matches!(u.observed(), Observed::Unknown | Observed::NotChecked)
        };
        self.pool(color).iter().any(|u| u.is_healthy() && judged(u))
    }

    /// Builds the pools for `config`, keeping the `Upstream` of every URL that stays in
    /// the same colour, so health and counts carry over a reload.
    pub fn pools_for(config: &Config, previous: Option<&RouteTable>) -> [Pool; 2] {
        Color::ALL.map(|color| {
            let urls: &[UpstreamUrl] = match color {
                Color::Blue => &config.pools.blue,
                Color::Green => &config.pools.green,
            };
            urls.iter()
                .map(|url| {
                    previous
                        .and_then(|t| t.pool(color).iter().find(|u| &u.url == url).cloned())
                        .unwrap_or_else(|| Arc::new(Upstream::new(url.clone(), color)))
                })
                .collect()
        })
    }
}

/// The handle to the current table: one atomic load per request, change notifications
/// for streams.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<RouteTable>,
    changes: watch::Sender<u64>,
}

impl Router {
    /// A router starting at `table`.
    pub fn new(table: RouteTable) -> Router {
        let generation = table.generation;
        Router {
            table: ArcSwap::from_pointee(table),
            changes: watch::Sender::new(generation),
        }
    }

    /// The current table, for one request.
    pub fn load(&self) -> Guard<Arc<RouteTable>> {
        self.table.load()
    }

    /// The current table, to keep for a long time (a stream, a connection).
    pub fn load_full(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Publishes a new table and wakes every stream to re-check its deadline.
    pub fn store(&self, table: RouteTable) {
        let generation = table.generation;
        self.table.store(Arc::new(table));
        self.changes.send_replace(generation);
    }

    /// Wakes on every published table.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Wakes streams without a new generation (a health change does not need one, but a
    /// retired upstream's streams must look again).
    pub fn nudge(&self) {
        self.changes.send_modify(|_| {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_match_exactly() {
        let keys = ClientKeys::parse("\u{feff}# team keys\r\nalpha\r\n\n  beta  \n");
        let keys = keys.expect("a valid keys file");
        assert_eq!(keys.len(), 2);
        assert!(keys.accepts(b"alpha"));
        assert!(keys.accepts(b"beta"));
        assert!(!keys.accepts(b"alph"));
        assert!(!keys.accepts(b"alphaa"));
        assert!(!keys.accepts(b""));
        assert_eq!(format!("{keys:?}"), "ClientKeys(2 keys)");
    }

    /// A line that no request could ever match is refused, and the error does not
    /// repeat it.
    #[test]
    fn a_keys_line_that_cannot_match_is_refused_by_number() {
        for (text, fault) in [
            ("alpha\nbeta # ops team\n", "line 2 has a space inside"),
            ("Token alpha\n", "line 1 has a space inside"),
            ("alpha\rbeta\n", "line 1 has a control character"),
            (
                "alpha\n\nbéta\n",
                "line 3 has a character that is not ASCII",
            ),
        ] {
            let e = ClientKeys::parse(text).expect_err(text);
            assert!(e.starts_with(fault), "{text:?}: {e}");
            assert!(!e.contains("alpha") && !e.contains("beta"), "{e}");
        }
    }
}
