//! The single writer of route changes: flip, rollback, commit and reload, and (with the
//! etcd store) the changes other replicas made.
//!
//! Changes arrive over a channel and are applied one at a time by one task, so no lock is
//! needed and none is held across the store's write. Each change is checked
//! (`expect_generation` first; with etcd, against the key as etcd holds it then, read
//! first: `Writer::catch_up`), stored (`store`), and only then published to the `Router`
//! and acknowledged. A state another replica stored arrives as `Change::Observed` and is
//! published the same way, with this replica's own drain orders.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, HealthMode};
use crate::drain::{DrainOrder, Tracker};
use crate::health::Prober;
use crate::metrics::Metrics;
use crate::route_table::{ClientKeys, Pool, RouteTable, Router, Settings};
use crate::state::{Action, RouteState};
use crate::store::{Observed, Saved, Store, StoreError, View};
use crate::upstream::Color;

/// A flip or rollback as the admin API takes it.
#[derive(Debug, Clone, Default)]
pub struct FlipRequest {
    /// Target colour; `None`: the standby colour. Refused by rollback.
    pub to: Option<Color>,
    /// Skip the health gate.
    pub force: bool,
    /// Overrides `drain.timeout` for the streams this change drains.
    pub drain_timeout: Option<Duration>,
    /// Refuse unless the current generation is this one.
    pub expect_generation: Option<u64>,
    /// Free text for the history.
    pub reason: Option<String>,
    /// With the etcd store: answer only once every live replica applied the change, or
    /// `ReplicasLagging` after this long. Nothing to wait for with the file store.
    pub wait_replicas: Option<Duration>,
}

/// The longest `reason` a change takes, in characters (JSON Schema's `maxLength`): the
/// history keeps 1,000 of them in the state file (and in etcd), which is written before
/// every change is acknowledged.
pub const MAX_REASON: usize = 1024;

/// A change to apply.
#[derive(Debug, Clone)]
pub enum Change {
    Flip(FlipRequest),
    Rollback(FlipRequest),
    Commit {
        expect_generation: Option<u64>,
        reason: Option<String>,
    },
    /// Re-read the config file.
    Reload,
    /// The route state as the store's watch (or a lost race) found it: another replica's
    /// change, applied here with this replica's drain settings. Sent by the etcd store,
    /// never by the admin API.
    Observed(Observed),
    /// The route state as etcd holds it after its history went back (restored from a
    /// backup, or rebuilt): news whatever its revision, since the revision this replica
    /// followed belongs to a history etcd no longer has (an older state is written over,
    /// as any older state is: `Writer::observe`).
    Rewound(Observed),
}

/// What a change did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// False when the request asked for what already was (a flip to the active colour).
    pub changed: bool,
    /// The table after the change.
    pub table: Arc<RouteTable>,
}

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("expected generation {expected}, but the current generation is {actual}")]
    GenerationMismatch { expected: u64, actual: u64 },
    #[error(
        "{0} has no healthy upstream (none a probe has judged healthy); pass force to flip anyway"
    )]
    TargetUnhealthy(Color),
    #[error("there is no rollback target (nothing to roll back, or the last change was committed)")]
    NoRollbackTarget,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(StoreError),
    #[error("`reason` is {0} characters; at most {MAX_REASON} are recorded")]
    ReasonTooLong(usize),
    #[error("rollback takes no `to`: it returns to rollback_to")]
    RollbackTo,
    #[error("switchyard is shutting down")]
    Stopped,
    /// The change is stored and applied here, but not yet by every live replica.
    #[error(
        "generation {generation} is stored, but after {} these replicas had not applied it: {}",
        humantime::format_duration(*waited),
        lagging.join(", ")
    )]
    ReplicasLagging {
        generation: u64,
        waited: Duration,
        lagging: Vec<String>,
    },
}

impl From<StoreError> for ChangeError {
    fn from(e: StoreError) -> ChangeError {
        match e {
            StoreError::Stopped => ChangeError::Stopped,
            other => ChangeError::Store(other),
        }
    }
}

/// Fails start-up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(#[from] ConfigError),
}

type Reply = oneshot::Sender<Result<Outcome, ChangeError>>;

/// A change, where its answer goes, when it was asked for (a change that waited behind a
/// write etcd failed slowly is refused at once: `Store::refused_since`), and by whom (the
/// admin API's client address, for the log).
type Asked = (Change, Reply, Instant, Option<std::net::IpAddr>);

/// The handle the admin API and the signal handler use.
#[derive(Clone)]
pub struct Control {
    tx: mpsc::Sender<Asked>,
    router: Arc<Router>,
    /// The store as `/status` shows it, and what `wait_replicas` waits on.
    view: View,
    /// Cancelled once a shutdown has drained the traffic: the store stops following etcd
    /// and the admin API closes soon after, so a wait for replicas answers then.
    stop: CancellationToken,
}

struct Writer {
    router: Arc<Router>,
    store: Store,
    metrics: Metrics,
    config_path: std::path::PathBuf,
    /// Gives the upstreams a reload adds their first verdict before they take traffic.
    prober: Prober,
    /// Reloads whose writes etcd did not confirm in time, oldest first: refused, but etcd
    /// may still commit one of them (a retry is conditioned on the same revision as the
    /// first try, so at most one lands). If the state etcd later holds has its history
    /// entry, that reload did happen, and this replica applies the config it read then.
    pending_reloads: Vec<PendingReload>,
    /// Keeps the upstreams a reload removed, while their streams or requests keep them
    /// alive: a reload that lists one again puts it back, cancelling its streams' drain.
    tracker: Arc<Tracker>,
}

/// Unconfirmed reloads kept at most; a longer run of them keeps the newest.
const MAX_PENDING_RELOADS: usize = 8;

/// A reload's new generation, its history entry's time, and the table it would have made.
struct PendingReload {
    generation: u64,
    at: String,
    table: RouteTable,
}

/// Reads the admin token, the client keys, the TLS certificate and the upstream CA a
/// config names.
pub fn load_settings(config: Config) -> Result<Settings, ConfigError> {
    let client_keys = match &config.client_auth {
        Some(auth) => {
            let field = "client_auth.keys_file";
            let path = auth.keys_file.display();
            let text = std::fs::read_to_string(&auth.keys_file)
                .map_err(|e| config.refused(field, format!("cannot read {path}: {e}")))?;
            let keys = ClientKeys::parse(&text)
                .map_err(|reason| config.refused(field, format!("{path}: {reason}")))?;
            // Like an empty admin token: refused, since every request would get 401. A
            // file truncated by mistake must not take every client off the air at a reload.
            if keys.is_empty() {
                return Err(config.refused(
                    field,
                    format!(
                        "{path} lists no key, so every request would get 401; list at least one, or remove [client_auth]"
                    ),
                ));
            }
            Some(keys)
        }
        None => None,
    };
    let tls = match &config.tls {
        Some(files) => {
            Some(crate::tls::server_config(files).map_err(|e| config.refused(e.field, e.reason))?)
        }
        None => None,
    };
    let pools = &config.pools;
    let https_pools = pools.blue.iter().chain(&pools.green).any(|u| u.is_tls());
    let upstream_tls = crate::tls::upstream_client_config(&config.upstream_tls, https_pools)
        .map_err(|e| config.refused(e.field, e.reason))?;
    // Read again (it was just parsed) only to tell a later reload whether it changed.
    let upstream_ca = config
        .upstream_tls
        .ca_file
        .as_ref()
        .and_then(|path| std::fs::read(path).ok());
    Ok(Settings {
        admin_token: crate::admin::Token::read(&config)?,
        config: Arc::new(config),
        client_keys,
        tls,
        upstream_tls,
        upstream_ca,
    })
}

impl Control {
    /// Loads (or creates) the route state, builds the first table, and starts the writer
    /// and the store's background tasks (returned, to be awaited after `stop`).
    /// `admin_port` names this replica in the etcd store when `etcd.replica_id` does not.
    pub async fn start(
        config: Config,
        metrics: Metrics,
        admin_port: u16,
        prober: Prober,
        tracker: Arc<Tracker>,
        stop: CancellationToken,
    ) -> Result<(Control, Arc<Router>, Vec<JoinHandle<()>>), StartError> {
        let (mut store, view) = Store::open(&config, &metrics, admin_port).await?;
        let initial = config.routing.initial;
        let config_path = config.source.clone();
        // The files the config names (certificates, CA, client keys) are read before the
        // route state: a start that fails on one must not leave a first-start state behind,
        // which would make the next start resume it instead of using `routing.initial`.
        let settings = Arc::new(load_settings(config)?);
        let (state, first_start) = store
            .load(|| RouteState::first_start(initial, SystemTime::now()))
            .await?;
        if first_start {
            metrics.route_change(Action::Startup.as_str());
        }
        log_loaded(&state, first_start, &settings.config.routing);
        let table = RouteTable {
            active: state.active,
            rollback_to: state.rollback_to,
            generation: state.generation,
            changed_at: state.changed_at_time(),
            pools: RouteTable::pools_for(&settings.config, None),
            drains: [None, None],
            settings,
            state: Arc::new(state),
        };
        metrics.route(table.active, table.generation);
        for pool in &table.pools {
            for u in pool.iter() {
                metrics.publish_upstream(u);
            }
        }
        let router = Arc::new(Router::new(table));
        let (tx, rx) = mpsc::channel(64);
        let control = Control {
            tx,
            router: router.clone(),
            view,
            stop: stop.clone(),
        };
        let tasks = store.spawn(control.clone(), router.clone(), stop);
        let writer = Writer {
            router: router.clone(),
            store,
            metrics,
            config_path,
            prober,
            pending_reloads: Vec::new(),
            tracker,
        };
        tokio::spawn(writer.run(rx));
        Ok((control, router, tasks))
    }

    /// Applies a change and waits for it to be stored and published (and, for a flip or
    /// rollback with `wait_replicas`, applied by every live replica).
    pub async fn apply(&self, change: Change) -> Result<Outcome, ChangeError> {
        self.apply_from(change, None).await
    }

    /// `apply`, for a caller whose address the `route changed` line names.
    pub async fn apply_from(
        &self,
        change: Change,
        client: Option<std::net::IpAddr>,
    ) -> Result<Outcome, ChangeError> {
        let wait = match &change {
            Change::Flip(r) | Change::Rollback(r) => r.wait_replicas,
            _ => None,
        };
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((change, reply, Instant::now(), client))
            .await
            .map_err(|_| ChangeError::Stopped)?;
        let outcome = answer.await.map_err(|_| ChangeError::Stopped)??;
        if let Some(waited) = wait {
            let generation = outcome.table.generation;
            let started = Instant::now();
            let answer = tokio::select! {
                answer = self.view.wait_replicas(generation, waited) => answer,
                // Shutting down: who lags now, rather than no answer when the admin API
                // closes under the wait.
                () = self.stop.cancelled() => {
                    self.view.wait_replicas(generation, Duration::ZERO).await
                }
            };
            answer.map_err(|lagging| ChangeError::ReplicasLagging {
                generation,
                waited: started.elapsed().min(waited),
                lagging,
            })?;
        }
        Ok(outcome)
    }

    /// The `store` object of `/status`.
    pub fn store_status(&self) -> Value {
        self.view.status()
    }

    /// Why this replica should not be ready: its route state is a guess (`store::View`).
    pub fn not_ready(&self) -> Option<&'static str> {
        self.view.not_ready()
    }

    /// The persisted state (history included) as of the last change.
    pub fn state(&self) -> Arc<RouteState> {
        self.router.load().state.clone()
    }

    /// The router this control writes to.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }
}

/// One line at start-up saying which colour serves and why: a proxy that came up on an
/// empty volume serves `routing.initial`, which may not be the colour the rest of the
/// fleet is on, and this line is where that shows.
fn log_loaded(state: &RouteState, first_start: bool, routing: &crate::config::Routing) {
    let store = match &routing.store {
        crate::config::Store::File => routing.state_file.display().to_string(),
        crate::config::Store::Etcd(etcd) => format!("etcd key {}", etcd.key),
    };
    let rollback_to = state.rollback_to.map(|c| c.as_str());
    if first_start {
        tracing::info!(
            active = %state.active,
            generation = state.generation,
            store,
            "no route state yet: first start on routing.initial"
        );
    } else {
        tracing::info!(
            active = %state.active,
            rollback_to,
            generation = state.generation,
            store,
            "route state resumed"
        );
    }
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Asked>) {
        while let Some((change, reply, asked, client)) = rx.recv().await {
            let result = match change {
                Change::Reload => self.reload_retried(asked, client).await,
                change => self.apply(change, asked, client).await,
            };
            self.store.end_change();
            // The caller may have gone (client disconnected); the change stands regardless.
            let _ = reply.send(result);
        }
    }

    /// A reload, tried again when another replica's change got to etcd first: it asks
    /// for no generation, so losing that race says nothing to its caller, and a SIGHUP
    /// has no caller to try again. Each try follows what won first; a replica whose
    /// watch is late learns of the change only by losing to it. Three tries at most.
    async fn reload_retried(
        &mut self,
        asked: Instant,
        client: Option<std::net::IpAddr>,
    ) -> Result<Outcome, ChangeError> {
        let mut tries = 1;
        loop {
            match self.apply(Change::Reload, asked, client).await {
                Err(ChangeError::GenerationMismatch { .. }) if tries < 3 => tries += 1,
                result => return result,
            }
        }
    }

    async fn apply(
        &mut self,
        change: Change,
        asked: Instant,
        client: Option<std::net::IpAddr>,
    ) -> Result<Outcome, ChangeError> {
        // A flip past the health gate: traffic may now go to a colour with no upstream
        // a probe has judged healthy, which the log must not make look ordinary.
        let forced = matches!(&change, Change::Flip(r) | Change::Rollback(r) if r.force);
        let (action_asked, expect, reason) = match &change {
            Change::Flip(r) => (Some(Action::Flip), r.expect_generation, r.reason.as_deref()),
            Change::Rollback(r) => (
                Some(Action::Rollback),
                r.expect_generation,
                r.reason.as_deref(),
            ),
            Change::Commit {
                expect_generation,
                reason,
            } => (Some(Action::Commit), *expect_generation, reason.as_deref()),
            Change::Reload | Change::Observed(_) | Change::Rewound(_) => (None, None, None),
        };
        // Checked after `expect_generation`, but a request that is wrong in itself is
        // told so (400) even while etcd cannot be read.
        let malformed = if let Some(chars) = reason
            .map(|r| r.chars().count())
            .filter(|&n| n > MAX_REASON)
        {
            Some(ChangeError::ReasonTooLong(chars))
        } else if let Change::Rollback(r) = &change
            && r.to.is_some()
        {
            Some(ChangeError::RollbackTo)
        } else {
            None
        };
        if let Some(action) = action_asked {
            // The read and the write answer within one `etcd.timeout` together: nothing
            // else waits in between (a reload's probes may take longer; it does not read).
            self.store.begin_change();
            if let Err(e) = self.catch_up(asked).await {
                // Generations only grow: one older than this replica's is stale whatever
                // etcd holds now, and is refused as such (checked first, as ever).
                let seen = self.router.load().generation;
                if let Some(expected) = expect.filter(|&expected| expected < seen) {
                    return Err(ChangeError::GenerationMismatch {
                        expected,
                        actual: seen,
                    });
                }
                if let Some(malformed) = malformed {
                    return Err(malformed);
                }
                tracing::error!(action = action.as_str(), error = %e, "could not read the route from etcd; the change is refused and the route stays as it was");
                return Err(e);
            }
        }
        let current = self.router.load_full();
        if let Some(expected) = expect
            && expected != current.generation
        {
            return Err(ChangeError::GenerationMismatch {
                expected,
                actual: current.generation,
            });
        }
        if let Some(malformed) = malformed {
            return Err(malformed);
        }
        let now = SystemTime::now();
        let state = current.state.clone();
        let (action, table) = match change {
            Change::Flip(req) => {
                let to = req.to.unwrap_or(current.standby());
                if to == current.active {
                    return Ok(Outcome {
                        changed: false,
                        table: current,
                    });
                }
                self.switch(&current, &state, Action::Flip, to, req, now)?
            }
            Change::Rollback(req) => {
                let to = current.rollback_to.ok_or(ChangeError::NoRollbackTarget)?;
                if to == current.active {
                    return Ok(Outcome {
                        changed: false,
                        table: current,
                    });
                }
                self.switch(&current, &state, Action::Rollback, to, req, now)?
            }
            Change::Commit { reason, .. } => {
                if current.rollback_to.is_none() {
                    return Ok(Outcome {
                        changed: false,
                        table: current,
                    });
                }
                let new_state = state.next(Action::Commit, current.active, None, now, reason);
                let table = RouteTable {
                    rollback_to: None,
                    generation: new_state.generation,
                    changed_at: new_state.changed_at_time(),
                    pools: current.pools.clone(),
                    drains: current.drains,
                    settings: current.settings.clone(),
                    active: current.active,
                    state: Arc::new(new_state),
                };
                (Action::Commit, table)
            }
            Change::Reload => self.reload(&current, &state, now).await?,
            Change::Observed(seen) => return self.observe(seen).await,
            Change::Rewound(seen) => {
                self.store.rewind();
                return self.observe(seen).await;
            }
        };
        // A change that waited behind a write etcd failed slowly is refused without waiting
        // as long again, so changes asked for together are answered about together.
        let saved = match self.store.refused_since(asked) {
            Some(e) => Err(e),
            None => self.store.save(&table.state).await,
        };
        let saved = match saved {
            Ok(saved) => saved,
            Err(e) => {
                tracing::error!(action = action.as_str(), error = %e, "could not store the route change; it is refused and the route stays as it was");
                if action == Action::Reload && matches!(e, StoreError::Unavailable(_)) {
                    if self.pending_reloads.len() == MAX_PENDING_RELOADS {
                        self.pending_reloads.remove(0);
                    }
                    self.pending_reloads.push(PendingReload {
                        generation: table.generation,
                        at: table.state.changed_at.clone(),
                        table,
                    });
                }
                return Err(e.into());
            }
        };
        if matches!(saved, Saved::Done) {
            // This write went in, conditioned on the revision this replica follows, so
            // none of the unconfirmed ones (conditioned on that one or older) ever will.
            self.pending_reloads.clear();
        }
        if let Saved::Conflict(now) = saved {
            // Another replica changed the state since this one read it: follow what won,
            // and refuse as if `expect_generation` had been stale.
            let expected = expect.unwrap_or(current.generation);
            tracing::info!(
                action = action.as_str(),
                generation = current.generation,
                "lost a race to another replica's change; following the change that won"
            );
            if let Err(e) = self.observe(now).await {
                tracing::warn!(error = %e, "could not follow the state that won the race");
            }
            return Err(ChangeError::GenerationMismatch {
                expected,
                actual: self.router.load().generation,
            });
        }
        let entry = table.state.history.last().cloned();
        let reloaded = action == Action::Reload;
        let table = self.publish(&current, table, Some(action), reloaded);
        let reason = entry.as_ref().and_then(|e| e.reason.as_deref());
        let drain_timeout = entry.as_ref().and_then(|e| e.drain_timeout);
        tracing::info!(
            action = action.as_str(),
            from = %current.active,
            active = %table.active,
            generation = table.generation,
            reason,
            drain_timeout = drain_timeout.map(|d| tracing::field::display(humantime::format_duration(d))),
            forced = forced.then_some(true),
            client = client.map(tracing::field::display),
            "route changed"
        );
        if action == Action::Reload {
            tracing::info!(client_auth = %table.settings.client_auth(), "config reloaded");
            self.judge_retrusted(&current, &table).await;
        }
        Ok(Outcome {
            changed: true,
            table,
        })
    }

    /// After a reload that changed the upstream trust (the CA), the https upstreams it
    /// kept are judged again with the new trust before it answers: a verdict made with
    /// the old one says nothing of the new, and a flip right after must not pass its gate
    /// on it. Done once the reload is stored and published, since these upstreams are the
    /// live table's too; each keeps its old verdict until its probe answers.
    async fn judge_retrusted(&self, old: &RouteTable, new: &RouteTable) {
        let health = &new.settings.config.health;
        if Arc::ptr_eq(&old.settings.upstream_tls, &new.settings.upstream_tls)
            || health.mode == HealthMode::Off
            || old.settings.config.health.mode == HealthMode::Off
        {
            return;
        }
        let kept: Vec<_> = new
            .pools
            .iter()
            .flat_map(|p| p.iter())
            .filter(|u| u.url.is_tls())
            .filter(|u| {
                old.pools
                    .iter()
                    .flat_map(|p| p.iter())
                    .any(|o| Arc::ptr_eq(o, u))
            })
            .cloned()
            .collect();
        self.prober
            .judge_afresh(&kept, health, &new.settings.upstream_tls)
            .await;
        for u in &kept {
            self.metrics.publish_upstream(u);
        }
    }

    /// With etcd, the table trails the key by the watch's delay, so a change another
    /// replica acknowledged a moment ago may not be here yet. A flip, rollback or commit
    /// is decided on what etcd holds now: "already active", "no rollback target" and a
    /// stale `expect_generation` are never answered from an older view. (A reload's
    /// answer does not depend on the route; a race it loses is tried again instead:
    /// `reload_retried`.)
    async fn catch_up(&mut self, asked: Instant) -> Result<(), ChangeError> {
        if let Some(e) = self.store.refused_since(asked) {
            return Err(e.into());
        }
        if let Some(seen) = self.store.latest().await?
            && self.store.is_news(seen.revision)
        {
            self.observe(seen).await?;
        }
        Ok(())
    }

    fn switch(
        &self,
        current: &RouteTable,
        state: &RouteState,
        action: Action,
        to: Color,
        req: FlipRequest,
        now: SystemTime,
    ) -> Result<(Action, RouteTable), ChangeError> {
        if !req.force && !current.has_healthy(to) {
            return Err(ChangeError::TargetUnhealthy(to));
        }
        let from = current.active;
        let timeout = req
            .drain_timeout
            .unwrap_or(current.settings.config.drain.timeout);
        let mut new_state = state.next(action, to, Some(from), now, req.reason);
        if let Some(entry) = new_state.history.last_mut() {
            // Kept as it takes effect: an absurd value is the longest drain, as
            // `DrainOrder::starting_now` takes it, not a number no reader would take.
            entry.drain_timeout = req.drain_timeout.map(|d| d.min(crate::drain::MAX_DRAIN));
        }
        let mut drains = current.drains;
        let grace = current.settings.config.drain.grace;
        drains[from.index()] = Some(DrainOrder::starting_now(
            new_state.generation,
            timeout,
            grace,
        ));
        // Traffic returning to a colour cancels the drain of its streams.
        drains[to.index()] = None;
        let table = RouteTable {
            active: to,
            rollback_to: Some(from),
            generation: new_state.generation,
            changed_at: new_state.changed_at_time(),
            pools: current.pools.clone(),
            drains,
            settings: current.settings.clone(),
            state: Arc::new(new_state),
        };
        Ok((action, table))
    }

    async fn reload(
        &self,
        current: &RouteTable,
        state: &RouteState,
        now: SystemTime,
    ) -> Result<(Action, RouteTable), ChangeError> {
        let path = self.config_path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let config = Config::load(&path)?;
            let previous = config.clone();
            load_settings(config).map(|s| (previous, s))
        })
        .await
        .map_err(|_| ChangeError::Stopped)?;
        let (config, mut settings) = loaded?;
        let before = &current.settings;
        if settings.config.upstream_tls == before.config.upstream_tls
            && settings.upstream_ca == before.upstream_ca
        {
            // The same trust: kept connections and the probe client stay as they are.
            settings.upstream_tls = before.upstream_tls.clone();
        }
        if let Some(conflict) = current.settings.config.reload_conflict(&config) {
            return Err(conflict.into());
        }
        // Said at start already; again only when the reload changes what is needed.
        if config.limits.max_connections != current.settings.config.limits.max_connections {
            crate::nofile::warn_if_short(&config);
        }
        let pools = self.put_back_retired(RouteTable::pools_for(&config, Some(current)), current);
        let every = |pools: &[Pool; 2]| {
            pools
                .iter()
                .flat_map(|p| p.iter().cloned())
                .collect::<Vec<_>>()
        };
        // Probed before the reload answers: the upstreams it adds or puts back, or all of
        // them when it turns health checks on (none has a verdict then). Those it keeps
        // are judged again only once it is stored, if it changes their trust (`apply`).
        let known = every(&current.pools);
        let mut judge = every(&pools);
        if current.settings.config.health.mode != HealthMode::Off {
            judge.retain(|u| !known.iter().any(|k| Arc::ptr_eq(k, u)));
        }
        self.prober
            .first_verdicts(&judge, &settings.config.health, &settings.upstream_tls)
            .await;
        // The change takes effect now, after the probes: its history entry says when.
        let now = now.max(SystemTime::now());
        let new_state = state.next(
            Action::Reload,
            current.active,
            current.rollback_to,
            now,
            None,
        );
        let table = RouteTable {
            active: current.active,
            rollback_to: current.rollback_to,
            generation: new_state.generation,
            changed_at: new_state.changed_at_time(),
            pools,
            drains: current.drains,
            settings: Arc::new(settings),
            state: Arc::new(new_state),
        };
        Ok((Action::Reload, table))
    }

    /// Makes `table` the route, `current` replaced: the metrics, then the table (with the
    /// state `/history` reads); for a reload, the upstreams it replaced are drained first
    /// and the connections its new trust no longer covers closed after.
    fn publish(
        &mut self,
        current: &RouteTable,
        table: RouteTable,
        action: Option<Action>,
        reloaded: bool,
    ) -> Arc<RouteTable> {
        self.metrics.route(table.active, table.generation);
        if let Some(action) = action {
            self.metrics.route_change(action.as_str());
        }
        for u in table.pools.iter().flat_map(|p| p.iter()) {
            self.metrics.publish_upstream(u);
        }
        if reloaded {
            self.move_upstreams(current, &table);
        }
        self.router.store(table);
        let table = self.router.load_full();
        if reloaded {
            self.close_untrusted(current, &table);
        }
        table
    }

    /// What a reload does to upstreams before its table is in place: those it dropped
    /// drain, those it put back stop draining. Before, so that the table's change
    /// notification wakes their streams to see it (after, a stream could look in between
    /// and then wait for the next change).
    fn move_upstreams(&mut self, old: &RouteTable, new: &RouteTable) {
        self.retire_removed(old, new);
        self.reinstate_put_back(old, new);
    }

    /// What a reload does once its table is in place: if it changed the upstream trust,
    /// kept TLS connections (verified with the old one) close. (One in use when the trust
    /// changed is not reused either: see `Idle::take`.)
    fn close_untrusted(&self, old: &RouteTable, new: &RouteTable) {
        if Arc::ptr_eq(&old.settings.upstream_tls, &new.settings.upstream_tls) {
            return;
        }
        for u in new.pools.iter().flat_map(|p| p.iter()) {
            if u.url.scheme == http::uri::Scheme::HTTPS {
                u.idle.clear();
            }
        }
    }

    /// Upstreams a reload dropped drain their streams and requests as in a flip.
    fn retire_removed(&mut self, old: &RouteTable, new: &RouteTable) {
        let drain = new.settings.config.drain;
        for color in Color::ALL {
            for u in old.pool(color).iter() {
                if !new.pool(color).iter().any(|n| Arc::ptr_eq(n, u)) {
                    self.tracker.retire(
                        u,
                        DrainOrder::starting_now(new.generation, drain.timeout, drain.grace),
                    );
                    // Its health goes now (it takes no new work); its error counts stay
                    // while its streams drain (an error then must add to its count, not
                    // start a new one at 1) and go with its last one. A reload listing
                    // its URL again while it lives puts it back (which cancels this and
                    // publishes it again); one listing it later makes a new upstream.
                    self.metrics.forget_upstream_health(u);
                    let metrics = self.metrics.clone();
                    u.when_gone(move |u| metrics.forget_upstream(u));
                    tracing::info!(upstream = %u.name, color = %color, "upstream removed; its streams drain");
                }
            }
        }
    }

    /// `pools` (a reload's) with each upstream it adds replaced by the removed one of the
    /// same colour and URL, if that still has traffic: the same node, whose streams and
    /// in-flight requests the balancer must go on counting. Its earlier verdict is
    /// forgotten, so the reload's first probe judges it as it would a new one.
    fn put_back_retired(&self, pools: [Pool; 2], current: &RouteTable) -> [Pool; 2] {
        pools.map(|pool| {
            pool.iter()
                .map(|u| {
                    let known = current.pools.iter().flat_map(|p| p.iter());
                    if known.clone().any(|k| Arc::ptr_eq(k, u)) {
                        return u.clone();
                    }
                    let back = self
                        .tracker
                        .retired()
                        .into_iter()
                        .map(|(r, _)| r)
                        .find(|r| r.color == u.color && r.url == u.url);
                    match back {
                        Some(back) => {
                            back.forget_verdict();
                            back
                        }
                        None => u.clone(),
                    }
                })
                .collect()
        })
    }

    /// Upstreams a reload put back in their pool (`put_back_retired`) stop draining, as
    /// after a rollback.
    fn reinstate_put_back(&mut self, old: &RouteTable, new: &RouteTable) {
        for u in new.pools.iter().flat_map(|p| p.iter()) {
            if u.retired().is_some()
                && !old
                    .pools
                    .iter()
                    .flat_map(|p| p.iter())
                    .any(|o| Arc::ptr_eq(o, u))
            {
                self.tracker.reinstate(u);
                tracing::info!(upstream = %u.name, color = %u.color, "upstream put back in its pool; its streams' drain is cancelled");
            }
        }
    }

    /// Follows a state the store holds: another replica's change, or a resync. A missing
    /// key is filled with this replica's state (only while it is still missing).
    async fn observe(&mut self, seen: Observed) -> Result<Outcome, ChangeError> {
        let unchanged = |table| Outcome {
            changed: false,
            table,
        };
        let mut seen = seen;
        // A missing key, or one older than this replica's state, gets this replica's state;
        // a write that loses a race looks at what won (a few rounds at most: the watch
        // brings whatever comes after).
        let mut rounds = 0;
        let state = loop {
            let ours = self.router.load().state.clone();
            // What is news: a revision after the one this replica follows (a watch event
            // older than that is one of its own changes, which a later one has passed), or
            // another state at that very revision: etcd's history went back and forward
            // again to the same number (restored, then written once).
            let news = self.store.is_news(seen.revision)
                || (self.store.follows(seen.revision) && seen.state.as_ref() != Some(&*ours));
            let saved = match seen.state {
                None => self.store.create_missing(&ours).await?,
                // Generations only grow, and the drain bookkeeping counts on it: etcd holds an
                // older state than one this replica applied (restored from a backup, or written
                // by hand), so the newest this replica has goes back instead.
                Some(ref theirs) if news && theirs.generation < ours.generation => {
                    tracing::warn!(
                        stored = theirs.generation,
                        ours = ours.generation,
                        revision = seen.revision,
                        "etcd holds an older route state than this replica applied (restored from a backup?); writing this replica's back"
                    );
                    self.store.replace(&ours, seen.revision).await?
                }
                Some(state) if news => break state,
                Some(_) => return Ok(unchanged(self.router.load_full())),
            };
            match saved {
                Saved::Done => {
                    tracing::info!(
                        generation = ours.generation,
                        "wrote this replica's route state to the store key"
                    );
                    return Ok(unchanged(self.router.load_full()));
                }
                Saved::Conflict(now) if rounds < 3 => {
                    rounds += 1;
                    seen = now;
                }
                Saved::Conflict(_) => return Ok(unchanged(self.router.load_full())),
            }
        };
        self.store.adopt(&state, seen.revision).await;
        let current = self.router.load_full();
        if *current.state == state {
            return Ok(unchanged(current));
        }
        let mut drains = current.drains;
        if state.active != current.active {
            // As in `switch`, from the moment this replica applies the change, with the
            // drain timeout the flip asked for, or this replica's `drain.timeout`. The
            // change that moved traffic is the last that changed the active colour: a
            // replica cut off from etcd may see a commit or reload after it first.
            let timeout = state
                .history
                .iter()
                .rev()
                .take_while(|entry| entry.generation > current.generation)
                .find(|entry| entry.from.is_some_and(|from| from != entry.to))
                .and_then(|entry| entry.drain_timeout)
                .unwrap_or(current.settings.config.drain.timeout);
            let grace = current.settings.config.drain.grace;
            drains[current.active.index()] =
                Some(DrainOrder::starting_now(state.generation, timeout, grace));
            drains[state.active.index()] = None;
        }
        // A reload of this replica's that etcd did not confirm, found in the history after
        // all. Those the state has passed are settled, landed or not.
        let (settled, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_reloads)
            .into_iter()
            .partition(|p| p.generation <= state.generation);
        self.pending_reloads = pending;
        let reloaded = settled.into_iter().find(|p| {
            state
                .history
                .iter()
                .any(|h| h.generation == p.generation && h.action == Action::Reload && h.at == p.at)
        });
        let (pools, settings) = match &reloaded {
            Some(p) => (p.table.pools.clone(), p.table.settings.clone()),
            None => (current.pools.clone(), current.settings.clone()),
        };
        let table = RouteTable {
            active: state.active,
            rollback_to: state.rollback_to,
            generation: state.generation,
            changed_at: state.changed_at_time(),
            pools,
            drains,
            settings,
            state: Arc::new(state),
        };
        let action = table.state.history.last().map(|h| h.action);
        if reloaded.is_some() {
            tracing::warn!(
                generation = table.generation,
                "a reload this replica reported as refused reached etcd after all; its config applies now"
            );
        }
        let table = self.publish(&current, table, action, reloaded.is_some());
        tracing::info!(
            action = action.map(|a| a.as_str()),
            active = %table.active,
            generation = table.generation,
            revision = seen.revision,
            "route changed through the store (another replica)"
        );
        Ok(Outcome {
            changed: true,
            table,
        })
    }
}
