//! Where the route state is kept: the `Store` the writer (`control`) owns, and the `View` of
//! it that `/status` and `wait_replicas` read.
//!
//! `File`: one proxy, one state file (`state::FileStore`), written before a change is
//! acknowledged. `Etcd` (cargo feature `etcd`, in `store/etcd.rs`): replicas share one key; a
//! change is a transaction conditioned on the revision this replica last followed, a watch
//! brings the other replicas' changes in as `Change::Observed`, and the state file stays as
//! the fail-static copy a replica starts from while etcd is down. This module does the
//! store's I/O; what a state means for the route table stays in `control`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Store as StoreConfig};
use crate::control::Control;
use crate::metrics::Metrics;
use crate::route_table::Router;
use crate::state::{FileStore, RouteState, StateError};

#[cfg(feature = "etcd")]
pub mod etcd;

/// The route key as etcd held it at one revision: what the watch saw, or what a change
/// that lost a race found there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// `None`: the key does not exist.
    pub state: Option<RouteState>,
    /// The key's mod revision; for a missing key, the revision at which it was missing.
    pub revision: i64,
}

/// Why the store could not be opened or could not take a change.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    File(#[from] StateError),
    /// etcd did not answer within `etcd.timeout`, refused the call, or has not been read
    /// since this replica started.
    #[error("etcd: {0}")]
    Unavailable(String),
    /// The key holds something that is not a route state.
    #[error("etcd key {key}: not a valid route state ({reason}); fix or delete it")]
    Corrupt { key: String, reason: String },
    /// The blocking file writer went away (the runtime is shutting down).
    #[error("the route store's writer stopped")]
    Stopped,
}

/// What saving a change did.
#[derive(Debug)]
pub enum Saved {
    /// Stored; the change stands.
    Done,
    /// Another replica changed the state since this one read it; this is the state now.
    Conflict(Observed),
}

/// The route state store; only the writer holds it.
pub enum Store {
    /// One proxy, one file.
    File(FileStore),
    /// Replicas sharing one etcd key (boxed: the client is large).
    #[cfg(feature = "etcd")]
    Etcd(Box<etcd::EtcdStore>),
}

/// The store as `/status` and `wait_replicas` see it; cheap to clone.
#[derive(Clone)]
pub enum View {
    File,
    #[cfg(feature = "etcd")]
    Etcd(Arc<etcd::Shared>),
}

impl Store {
    /// Opens the store `config` names. With etcd this connects lazily (an etcd that is down
    /// is no start-up error: the replica starts from its state file) and names this replica
    /// `etcd.replica_id`, else `host:admin_port`.
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    pub async fn open(
        config: &Config,
        metrics: &Metrics,
        admin_port: u16,
    ) -> Result<(Store, View), StoreError> {
        let file = FileStore::new(config.routing.state_file.clone());
        match &config.routing.store {
            StoreConfig::File => {
                metrics.store_in_sync.set(1);
                Ok((Store::File(file), View::File))
            }
            #[cfg(feature = "etcd")]
            StoreConfig::Etcd(settings) => {
                let store = etcd::EtcdStore::connect(settings, file, metrics, admin_port).await?;
                let view = View::Etcd(store.shared());
                Ok((Store::Etcd(Box::new(store)), view))
            }
            #[cfg(not(feature = "etcd"))]
            StoreConfig::Etcd(_) => {
                // `Config::parse` already refuses this; kept for a Config built by hand.
                Err(StoreError::Unavailable(
                    "this build has no etcd store; build with `--features etcd`".into(),
                ))
            }
        }
    }

    /// The state to start from, and whether this is the very first start (nothing stored
    /// anywhere): then `first()` is stored and returned.
    pub async fn load(
        &mut self,
        first: impl FnOnce() -> RouteState,
    ) -> Result<(RouteState, bool), StoreError> {
        match self {
            Store::File(file) => match file.load()? {
                Some(state) => Ok((state, false)),
                None => {
                    let state = first();
                    file.save(&state)?;
                    Ok((state, true))
                }
            },
            #[cfg(feature = "etcd")]
            Store::Etcd(etcd) => etcd.load(first).await,
        }
    }

    /// Why a change asked for at `asked` is refused before it is tried, if it is: with
    /// etcd, a write etcd did not answer (or refused) while the change waited its turn.
    /// The file store refuses none this way.
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    pub fn refused_since(&self, asked: Instant) -> Option<StoreError> {
        match self {
            Store::File(_) => None,
            #[cfg(feature = "etcd")]
            Store::Etcd(etcd) => etcd.refused_since(asked),
        }
    }

    /// Stores a change before it is published. With etcd the write is conditioned on the
    /// revision this replica follows, and a lost race answers what won.
    pub async fn save(&mut self, state: &RouteState) -> Result<Saved, StoreError> {
        match self {
            Store::File(file) => {
                let file = file.clone();
                let state = state.clone();
                tokio::task::spawn_blocking(move || file.save(&state))
                    .await
                    .map_err(|_| StoreError::Stopped)??;
                Ok(Saved::Done)
            }
            #[cfg(feature = "etcd")]
            Store::Etcd(etcd) => etcd.save(state).await,
        }
    }

    /// Starts a change: with etcd, its read and writes are answered within one
    /// `etcd.timeout` together, until `end_change`.
    pub fn begin_change(&mut self) {
        #[cfg(feature = "etcd")]
        if let Store::Etcd(etcd) = self {
            etcd.begin_change();
        }
    }

    /// Ends the change `begin_change` started.
    pub fn end_change(&mut self) {
        #[cfg(feature = "etcd")]
        if let Store::Etcd(etcd) = self {
            etcd.end_change();
        }
    }

    /// The key as etcd holds it now, to decide a change on; `None` with the file store,
    /// whose state is the table's.
    pub async fn latest(&mut self) -> Result<Option<Observed>, StoreError> {
        match self {
            Store::File(_) => Ok(None),
            #[cfg(feature = "etcd")]
            Store::Etcd(etcd) => etcd.latest().await.map(Some),
        }
    }

    /// Writes `state` only if the key does not exist (a first start while etcd was down,
    /// or a deleted key); a key that exists answers what it holds.
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    pub async fn create_missing(&mut self, state: &RouteState) -> Result<Saved, StoreError> {
        match self {
            Store::File(_) => Ok(Saved::Done),
            #[cfg(feature = "etcd")]
            Store::Etcd(etcd) => etcd.create_missing(state).await,
        }
    }

    /// Whether this replica follows the key at `revision` (never, for the file store).
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    pub fn follows(&self, revision: i64) -> bool {
        match self {
            Store::File(_) => false,
            #[cfg(feature = "etcd")]
            Store::Etcd(etcd) => etcd.follows(revision),
        }
    }

    /// Whether a state at `revision` is newer than what this replica follows (never, for
    /// the file store).
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    pub fn is_news(&self, revision: i64) -> bool {
        match self {
            Store::File(_) => false,
            #[cfg(feature = "etcd")]
            Store::Etcd(etcd) => etcd.is_news(revision),
        }
    }

    /// Writes `state` over the one the key holds at `revision` (an older one), if it is
    /// still there; a lost race answers what won. The file store has nothing to replace.
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    pub async fn replace(
        &mut self,
        state: &RouteState,
        revision: i64,
    ) -> Result<Saved, StoreError> {
        match self {
            Store::File(_) => Ok(Saved::Done),
            #[cfg(feature = "etcd")]
            Store::Etcd(etcd) => etcd.replace(state, revision).await,
        }
    }

    /// Forgets the revision this replica follows, after etcd's history went back (nothing
    /// for the file store): the next observed state is followed whatever its revision.
    pub fn rewind(&mut self) {
        match self {
            Store::File(_) => {}
            #[cfg(feature = "etcd")]
            Store::Etcd(etcd) => etcd.rewind(),
        }
    }

    /// Records that the table now follows `state` at `revision`, and keeps the local
    /// fail-static copy (a failure to write it is logged, not fatal: etcd holds the state).
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    pub async fn adopt(&mut self, state: &RouteState, revision: i64) {
        match self {
            Store::File(_) => {}
            #[cfg(feature = "etcd")]
            Store::Etcd(etcd) => etcd.adopt(state, revision).await,
        }
    }

    /// Starts the store's background tasks until `stop`: with etcd, the watch that feeds
    /// `control` and this replica's registration. The file store has none.
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    pub fn spawn(
        &self,
        control: Control,
        router: Arc<Router>,
        stop: CancellationToken,
    ) -> Vec<JoinHandle<()>> {
        match self {
            Store::File(_) => Vec::new(),
            #[cfg(feature = "etcd")]
            Store::Etcd(etcd) => etcd.spawn(control, router, stop),
        }
    }
}

impl View {
    /// The `store` object of `/status`.
    pub fn status(&self) -> Value {
        match self {
            View::File => json!({ "kind": "file" }),
            #[cfg(feature = "etcd")]
            View::Etcd(shared) => shared.status(),
        }
    }

    /// Why this replica should not be ready although it runs, if so: with etcd, a route
    /// state this replica has not read but guessed (`routing.initial`).
    pub fn not_ready(&self) -> Option<&'static str> {
        match self {
            View::File => None,
            #[cfg(feature = "etcd")]
            View::Etcd(shared) => shared.not_ready(),
        }
    }

    /// Waits until every live replica has applied `generation`, or `timeout` passes; then
    /// `Err` names those that had not. With the file store there is one replica, which
    /// applied the change before it was answered.
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    pub async fn wait_replicas(
        &self,
        generation: u64,
        timeout: Duration,
    ) -> Result<(), Vec<String>> {
        match self {
            View::File => Ok(()),
            #[cfg(feature = "etcd")]
            View::Etcd(shared) => shared.wait_replicas(generation, timeout).await,
        }
    }
}
