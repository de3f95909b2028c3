//! The single writer of route changes: flip, rollback, commit and reload.
//!
//! Changes arrive over a channel and are applied one at a time by one task, so no lock is
//! needed and none is held across the state file's fsync. Each change is checked
//! (`expect_generation` first), persisted, and only then published to the `Router` and
//! acknowledged.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, ConfigError};
use crate::drain::DrainOrder;
use crate::metrics::Metrics;
use crate::route_table::{ClientKeys, RouteTable, Router, Settings};
use crate::state::{Action, FileStore, RouteState, StateError};
use crate::upstream::Color;

/// A flip or rollback as the admin API takes it.
#[derive(Debug, Clone, Default)]
pub struct FlipRequest {
    /// Target colour; `None`: the standby colour. Ignored by rollback.
    pub to: Option<Color>,
    /// Skip the health gate.
    pub force: bool,
    /// Overrides `drain.timeout` for the streams this change drains.
    pub drain_timeout: Option<Duration>,
    /// Refuse unless the current generation is this one.
    pub expect_generation: Option<u64>,
    /// Free text for the history.
    pub reason: Option<String>,
}

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
    #[error("{0} has no healthy upstream; pass force to flip anyway")]
    TargetUnhealthy(Color),
    #[error("there is no rollback target (nothing to roll back, or the last change was committed)")]
    NoRollbackTarget,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(#[from] StateError),
    #[error("switchyard is shutting down")]
    Stopped,
}

/// Fails start-up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Config(#[from] ConfigError),
}

type Reply = oneshot::Sender<Result<Outcome, ChangeError>>;

/// The handle the admin API and the signal handler use.
#[derive(Clone)]
pub struct Control {
    tx: mpsc::Sender<(Change, Reply)>,
    state: Arc<ArcSwap<RouteState>>,
    router: Arc<Router>,
}

struct Writer {
    router: Arc<Router>,
    state: Arc<ArcSwap<RouteState>>,
    store: FileStore,
    metrics: Metrics,
    config_path: std::path::PathBuf,
}

/// Reads the client keys and the TLS certificate a config names.
pub fn load_settings(config: Config) -> Result<Settings, ConfigError> {
    let client_keys = match &config.client_auth {
        Some(auth) => {
            let text = std::fs::read_to_string(&auth.keys_file).map_err(|e| ConfigError {
                file: config.source.display().to_string(),
                field: "client_auth.keys_file".into(),
                reason: format!("cannot read {}: {e}", auth.keys_file.display()),
            })?;
            Some(ClientKeys::parse(&text))
        }
        None => None,
    };
    let tls = match &config.tls {
        Some(files) => Some(
            crate::tls::server_config(files).map_err(|reason| ConfigError {
                file: config.source.display().to_string(),
                field: reason.0,
                reason: reason.1,
            })?,
        ),
        None => None,
    };
    Ok(Settings {
        config: Arc::new(config),
        client_keys,
        tls,
    })
}

impl Control {
    /// Loads (or creates) the route state, builds the first table and starts the writer.
    pub fn start(config: Config, metrics: Metrics) -> Result<(Control, Arc<Router>), StartError> {
        let store = FileStore::new(config.routing.state_file.clone());
        let state = match store.load()? {
            Some(state) => state,
            None => {
                let state = RouteState::first_start(config.routing.initial, SystemTime::now());
                store.save(&state)?;
                metrics.route_change(Action::Startup.as_str());
                state
            }
        };
        let config_path = config.source.clone();
        let settings = Arc::new(load_settings(config)?);
        let table = RouteTable {
            active: state.active,
            rollback_to: state.rollback_to,
            generation: state.generation,
            changed_at: state.changed_at_time(),
            pools: RouteTable::pools_for(&settings.config, None),
            drains: [None, None],
            settings,
        };
        metrics.route(table.active, table.generation);
        for pool in &table.pools {
            for u in pool.iter() {
                metrics.publish_upstream(u);
            }
        }
        let router = Arc::new(Router::new(table));
        let state = Arc::new(ArcSwap::from_pointee(state));
        let (tx, rx) = mpsc::channel(64);
        let writer = Writer {
            router: router.clone(),
            state: state.clone(),
            store,
            metrics,
            config_path,
        };
        tokio::spawn(writer.run(rx));
        Ok((
            Control {
                tx,
                state,
                router: router.clone(),
            },
            router,
        ))
    }

    /// Applies a change and waits for it to be persisted and published.
    pub async fn apply(&self, change: Change) -> Result<Outcome, ChangeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((change, reply))
            .await
            .map_err(|_| ChangeError::Stopped)?;
        answer.await.map_err(|_| ChangeError::Stopped)?
    }

    /// The persisted state (history included) as of the last change.
    pub fn state(&self) -> Arc<RouteState> {
        self.state.load_full()
    }

    /// The router this control writes to.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<(Change, Reply)>) {
        while let Some((change, reply)) = rx.recv().await {
            let result = self.apply(change).await;
            // The caller may have gone (client disconnected); the change stands regardless.
            let _ = reply.send(result);
        }
    }

    async fn apply(&mut self, change: Change) -> Result<Outcome, ChangeError> {
        let current = self.router.load_full();
        let expect = match &change {
            Change::Flip(r) | Change::Rollback(r) => r.expect_generation,
            Change::Commit {
                expect_generation, ..
            } => *expect_generation,
            Change::Reload => None,
        };
        if let Some(expected) = expect
            && expected != current.generation
        {
            return Err(ChangeError::GenerationMismatch {
                expected,
                actual: current.generation,
            });
        }
        let now = SystemTime::now();
        let state = self.state.load_full();
        let (action, table, new_state) = match change {
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
                    changed_at: now,
                    pools: current.pools.clone(),
                    drains: current.drains,
                    settings: current.settings.clone(),
                    active: current.active,
                };
                (Action::Commit, table, new_state)
            }
            Change::Reload => self.reload(&current, &state, now).await?,
        };
        self.persist(&new_state).await?;
        if action == Action::Reload {
            self.retire_removed(&current, &table);
        }
        self.metrics.route(table.active, table.generation);
        self.metrics.route_change(action.as_str());
        for pool in &table.pools {
            for u in pool.iter() {
                self.metrics.publish_upstream(u);
            }
        }
        self.state.store(Arc::new(new_state));
        self.router.store(table);
        tracing::info!(
            action = action.as_str(),
            active = %self.router.load().active,
            generation = self.router.load().generation,
            "route changed"
        );
        Ok(Outcome {
            changed: true,
            table: self.router.load_full(),
        })
    }

    fn switch(
        &self,
        current: &RouteTable,
        state: &RouteState,
        action: Action,
        to: Color,
        req: FlipRequest,
        now: SystemTime,
    ) -> Result<(Action, RouteTable, RouteState), ChangeError> {
        if !req.force && !current.has_healthy(to) {
            return Err(ChangeError::TargetUnhealthy(to));
        }
        let from = current.active;
        let timeout = req
            .drain_timeout
            .unwrap_or(current.settings.config.drain.timeout);
        let new_state = state.next(action, to, Some(from), now, req.reason);
        let mut drains = current.drains;
        drains[from.index()] = Some(DrainOrder::starting_now(new_state.generation, timeout));
        // Traffic returning to a colour cancels the drain of its streams.
        drains[to.index()] = None;
        let table = RouteTable {
            active: to,
            rollback_to: Some(from),
            generation: new_state.generation,
            changed_at: now,
            pools: current.pools.clone(),
            drains,
            settings: current.settings.clone(),
        };
        Ok((action, table, new_state))
    }

    async fn reload(
        &self,
        current: &RouteTable,
        state: &RouteState,
        now: SystemTime,
    ) -> Result<(Action, RouteTable, RouteState), ChangeError> {
        let path = self.config_path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let config = Config::load(&path)?;
            let previous = config.clone();
            load_settings(config).map(|s| (previous, s))
        })
        .await
        .map_err(|_| ChangeError::Stopped)?;
        let (config, settings) = loaded?;
        if let Some(conflict) = current.settings.config.reload_conflict(&config) {
            return Err(conflict.into());
        }
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
            changed_at: now,
            pools: RouteTable::pools_for(&config, Some(current)),
            drains: current.drains,
            settings: Arc::new(settings),
        };
        Ok((Action::Reload, table, new_state))
    }

    /// Upstreams a reload dropped drain their streams as in a flip.
    fn retire_removed(&self, old: &RouteTable, new: &RouteTable) {
        let timeout = new.settings.config.drain.timeout;
        for color in Color::ALL {
            for u in old.pool(color).iter() {
                if !new.pool(color).iter().any(|n| Arc::ptr_eq(n, u)) {
                    u.retire(DrainOrder::starting_now(new.generation, timeout));
                    self.metrics.forget_upstream(u);
                    tracing::info!(upstream = %u.name, color = %color, "upstream removed; its streams drain");
                }
            }
        }
    }

    async fn persist(&self, state: &RouteState) -> Result<(), ChangeError> {
        let store = self.store.clone();
        let state = state.clone();
        tokio::task::spawn_blocking(move || store.save(&state))
            .await
            .map_err(|_| ChangeError::Stopped)??;
        Ok(())
    }
}
