//! The etcd route store (cargo feature `etcd`): several replicas share one route state.
//!
//! - `etcd.key` holds the `RouteState` JSON. The writer changes it with one transaction
//!   conditioned on the mod revision this replica follows (`create_revision == 0` while the
//!   key is missing), so of two concurrent changes one loses and is answered 409.
//! - `watch` reads the key, hands it to the writer as `Change::Observed`, and follows it
//!   from the next revision; after a lost watch it re-reads and resumes. A re-read below
//!   the revision followed means etcd's history went back (a restore, a rebuild):
//!   `Change::Rewound`.
//! - Generations only grow: a replica that finds an older route state in etcd (lower
//!   generation) writes its own back over it, at start-up too (`Writer::observe`, `load`).
//! - `register` records the generation this replica applied under
//!   `{key}/replicas/{replica_id}`, bound to a lease it keeps alive, so a replica that dies
//!   or freezes drops out of the others' lists within `lease_ttl`.
//! - Fail static: while etcd does not answer, the replica serves the last state it saw
//!   (also kept in `routing.state_file`, which it starts from when etcd is down) and
//!   refuses changes within `etcd.timeout` (a flip, rollback or commit reads the key, then
//!   writes it, both within that one timeout: `begin_change`).
//!
//! Every call is bounded here by `etcd.timeout`, not by the client's per-request timeout,
//! which would also end the long-lived watch and keep-alive streams.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use prometheus::IntGauge;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Observed, Saved, StoreError};
use crate::config::EtcdStore as EtcdSettings;
use crate::control::{Change, Control};
use crate::metrics::Metrics;
use crate::route_table::Router;
use crate::state::{FileStore, RouteState};

/// How often a quiet watch is asked for a progress answer, to notice a silent etcd.
const PROBE: Duration = Duration::from_secs(1);
/// The pause before reconnecting after a lost watch or lease.
const RETRY: Duration = Duration::from_millis(500);

/// The route state in etcd, owned by the writer.
pub struct EtcdStore {
    client: Client,
    key: String,
    timeout: Duration,
    lease_ttl: Duration,
    /// The fail-static copy, and what a replica starts from while etcd is down.
    file: FileStore,
    /// Which revision of the key the table follows; every change is conditioned on it.
    known: Known,
    /// When and why the last write failed slowly (none since one did not).
    failed: Option<(Instant, String)>,
    /// When the flip, rollback or commit being made must have its answer: its read and
    /// its writes share one `etcd.timeout` (`begin_change`).
    deadline: Option<Instant>,
    shared: Arc<Shared>,
}

/// What this replica knows of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Not read since start (etcd was down), or since etcd's history went back: a reload
    /// waits until the watch has read it; a flip, rollback or commit reads it itself.
    Unread,
    /// Read, and missing at this revision.
    Missing(i64),
    /// Followed at this mod revision.
    At(i64),
}

/// What the writer, the watch, the registration and `/status` share.
pub struct Shared {
    replica_id: String,
    /// The key's mod revision the table follows (0 before the first read).
    applied: AtomicI64,
    /// The newest revision of the key the watch reported.
    seen: AtomicI64,
    /// Whether the watch is established and etcd answers it.
    watching: AtomicBool,
    /// Live replicas (their lease holds) and the generation each applied.
    replicas: watch::Sender<BTreeMap<String, u64>>,
    in_sync: IntGauge,
    /// Started with etcd unreachable and no state file: the table is `routing.initial`,
    /// a guess, until this replica is first in sync with etcd.
    guessing: AtomicBool,
    /// Why this replica is not in sync, for `/status`: the watch's last error, or an
    /// invalid state under the key.
    problem: Mutex<Option<String>>,
    /// The lease this replica's record is bound to (0 before it has one).
    lease: AtomicI64,
    /// The last other lease found recording this replica's id (warned about once).
    twin: AtomicI64,
}

/// The key and the replica list read at one revision.
struct Snapshot {
    route: Observed,
    replicas: BTreeMap<String, u64>,
    revision: i64,
}

impl EtcdStore {
    /// A client for `settings.endpoints`; it connects on first use, so an etcd that is down
    /// is not an error here.
    pub async fn connect(
        settings: &EtcdSettings,
        file: FileStore,
        metrics: &Metrics,
        admin_port: u16,
    ) -> Result<EtcdStore, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(settings.timeout)
            // HTTP/2 pings end a connection to an etcd that stopped answering, so a watch
            // on it fails instead of hanging.
            .with_keep_alive(PROBE, settings.timeout)
            .with_keep_alive_while_idle(true);
        let client = within(
            settings.timeout,
            Client::connect(&settings.endpoints, Some(options)),
        )
        .await?;
        let replica_id = settings
            .replica_id
            .clone()
            .unwrap_or_else(|| format!("{}:{admin_port}", hostname()));
        metrics.store_in_sync.set(0);
        Ok(EtcdStore {
            client,
            key: settings.key.clone(),
            timeout: settings.timeout,
            lease_ttl: settings.lease_ttl,
            file,
            known: Known::Unread,
            failed: None,
            deadline: None,
            shared: Arc::new(Shared {
                replica_id,
                applied: AtomicI64::new(0),
                seen: AtomicI64::new(0),
                watching: AtomicBool::new(false),
                replicas: watch::Sender::new(BTreeMap::new()),
                in_sync: metrics.store_in_sync.clone(),
                guessing: AtomicBool::new(false),
                problem: Mutex::new(None),
                lease: AtomicI64::new(0),
                twin: AtomicI64::new(0),
            }),
        })
    }

    /// The handle `/status` and `wait_replicas` read.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The state to start from: etcd's when it answers (written to the state file), else
    /// the state file's, else `first()`. A missing key is created from what this replica
    /// starts with. A key that holds no valid route state is treated as an etcd that does
    /// not answer (the replicas already running keep serving through it too); a corrupt
    /// state file stops start-up.
    pub async fn load(
        &mut self,
        first: impl FnOnce() -> RouteState,
    ) -> Result<(RouteState, bool), StoreError> {
        let local = self.file.load()?;
        let snapshot = match snapshot(&self.client, &self.key, self.timeout).await {
            Ok(s) => s,
            Err(e) => {
                let why = match e {
                    StoreError::Corrupt { .. } => {
                        tracing::error!(error = %e, "the route state in etcd is not valid; changes are refused until it is fixed");
                        "the route state in etcd is not valid"
                    }
                    _ => "etcd is unreachable",
                };
                self.shared.set_problem(Some(e.to_string()));
                let (state, first_start) = match local {
                    Some(state) => {
                        tracing::warn!(error = %e, key = %self.key, "{why} at start; starting from the state file and following etcd once it holds a valid state");
                        (state, false)
                    }
                    None => {
                        tracing::warn!(error = %e, key = %self.key, "{why} at start and there is no state file; serving routing.initial, not ready (/readyz 503), until etcd holds a valid state");
                        self.shared.guessing.store(true, Ordering::Release);
                        (first(), true)
                    }
                };
                // A guess is not written to the state file: a restart before etcd answers
                // would take it for the last state seen. It is written once etcd holds it.
                return Ok((state, first_start));
            }
        };
        self.shared.replicas.send_replace(snapshot.replicas);
        if let Some(state) = snapshot.route.state {
            if let Some(local) = local.as_ref().filter(|l| l.generation > state.generation) {
                // etcd was restored from a backup while this replica was down: its state
                // file is newer, and generations only grow. The watch's first read hands
                // the key to the writer, which writes this state back over it (`known`
                // stays unread until then, so no change is conditioned on the old one).
                tracing::warn!(
                    stored = state.generation,
                    ours = local.generation,
                    key = %self.key,
                    "etcd holds an older route state than this replica's state file (restored from a backup?); starting from the state file and writing it back"
                );
                return Ok((local.clone(), false));
            }
            self.follow(snapshot.route.revision);
            if local.as_ref() != Some(&state) {
                self.file.save(&state)?;
            }
            return Ok((state, false));
        }
        self.known = Known::Missing(snapshot.route.revision);
        let (state, first_start) = match local {
            Some(state) => (state, false),
            None => (first(), true),
        };
        self.file.save(&state)?;
        match self.create_missing(&state).await {
            Ok(Saved::Done) => Ok((state, first_start)),
            Ok(Saved::Conflict(Observed {
                state: Some(theirs),
                revision,
            })) if theirs.generation >= state.generation => {
                // Another replica created it first: theirs is the fleet's state.
                self.follow(revision);
                self.file.save(&theirs)?;
                Ok((theirs, false))
            }
            Ok(Saved::Conflict(Observed { state: Some(_), .. })) => {
                // Another replica created it first with an older state (a new node, or an
                // older state file): generations only grow, so this one stays, and the
                // watch's first read writes it back over theirs.
                self.known = Known::Unread;
                Ok((state, first_start))
            }
            Ok(Saved::Conflict(_)) | Err(_) => {
                // The watch writes it once etcd answers.
                Ok((state, first_start))
            }
        }
    }

    /// Refuses a change asked for at `asked` if a write failed slowly (at least half of
    /// `etcd.timeout`: no answer) while it waited its turn: trying it would take another
    /// `etcd.timeout`, and changes asked for together would be answered one timeout after
    /// another.
    pub fn refused_since(&self, asked: Instant) -> Option<StoreError> {
        let (at, why) = self.failed.as_ref()?;
        (*at >= asked).then(|| {
            StoreError::Unavailable(format!(
                "a change ahead of this one failed ({why}); this one is not applied"
            ))
        })
    }

    /// Writes `state` if the key is still at the revision this replica follows.
    pub async fn save(&mut self, state: &RouteState) -> Result<Saved, StoreError> {
        let when = match self.known {
            Known::Unread => {
                return Err(StoreError::Unavailable(format!(
                    "{} has not been read since this replica started (etcd unreachable, or \
                     no valid route state there) or since etcd's history went back; changes \
                     resume once a valid state is read (see store.problem in /status)",
                    self.key
                )));
            }
            Known::Missing(_) => Compare::create_revision(self.key.as_str(), CompareOp::Equal, 0),
            Known::At(revision) => {
                Compare::mod_revision(self.key.as_str(), CompareOp::Equal, revision)
            }
        };
        self.put_if(when, state).await
    }

    /// Writes `state` only if the key does not exist.
    pub async fn create_missing(&mut self, state: &RouteState) -> Result<Saved, StoreError> {
        let when = Compare::create_revision(self.key.as_str(), CompareOp::Equal, 0);
        self.put_if(when, state).await
    }

    /// Starts a change: the calls it makes until `end_change` are answered within one
    /// `etcd.timeout` from now, together.
    pub fn begin_change(&mut self) {
        self.deadline = Some(Instant::now() + self.timeout);
    }

    /// Ends the change `begin_change` started.
    pub fn end_change(&mut self) {
        self.deadline = None;
    }

    /// When the next call must be answered by.
    fn call_deadline(&self) -> Instant {
        let own = Instant::now() + self.timeout;
        self.deadline.map_or(own, |change| change.min(own))
    }

    /// The key as etcd holds it now: a linearizable read, within `etcd.timeout`.
    pub async fn latest(&mut self) -> Result<Observed, StoreError> {
        let started = Instant::now();
        let key = self.key.as_str();
        let answer = until_sent(self.call_deadline(), self.timeout, || {
            let mut client = self.client.clone();
            async move { client.get(key, None).await }
        })
        .await;
        self.note_failure(started, &answer);
        let answer = answer?;
        match answer.kvs().first() {
            Some(kv) => route_of(&self.key, kv),
            None => Ok(Observed {
                state: None,
                revision: answer.header().map(|h| h.revision()).unwrap_or_default(),
            }),
        }
    }

    /// Remembers a call's failure for `refused_since`, if it took long (no answer, or
    /// connections given up for want of one), counted from the start of its change when
    /// it is part of one: an error etcd answered at once (a leader change, too large)
    /// costs the changes behind it no wait.
    fn note_failure<T>(&mut self, started: Instant, answer: &Result<T, StoreError>) {
        let since = match self.deadline {
            Some(deadline) => deadline.checked_sub(self.timeout).unwrap_or(started),
            None => started,
        };
        self.failed = match answer {
            Err(StoreError::Unavailable(why)) if since.elapsed() >= self.timeout / 2 => {
                Some((Instant::now(), why.clone()))
            }
            _ => None,
        };
    }

    /// Whether this replica follows the key at `revision`.
    pub fn follows(&self, revision: i64) -> bool {
        self.known == Known::At(revision)
    }

    /// Whether a state at `revision` is newer than what this replica follows.
    pub fn is_news(&self, revision: i64) -> bool {
        match self.known {
            Known::Unread => true,
            Known::Missing(r) | Known::At(r) => revision > r,
        }
    }

    /// Writes `state` over the one the key holds at `revision`, if it is still there.
    pub async fn replace(
        &mut self,
        state: &RouteState,
        revision: i64,
    ) -> Result<Saved, StoreError> {
        let when = Compare::mod_revision(self.key.as_str(), CompareOp::Equal, revision);
        self.put_if(when, state).await
    }

    /// Forgets the revision this replica follows, after etcd's history went back: the next
    /// state the watch hands over is news whatever its revision (the writer writes its own
    /// over an older one), and changes wait for it.
    pub fn rewind(&mut self) {
        self.known = Known::Unread;
        // Not in sync until a state is followed again.
        self.shared.applied.store(0, Ordering::Release);
        self.shared.refresh();
    }

    /// The table follows `state` at `revision` now; keeps the fail-static copy.
    pub async fn adopt(&mut self, state: &RouteState, revision: i64) {
        self.follow(revision);
        self.keep_copy(state).await;
    }

    /// Starts the watch and this replica's registration.
    pub fn spawn(
        &self,
        control: Control,
        router: Arc<Router>,
        stop: CancellationToken,
    ) -> Vec<JoinHandle<()>> {
        let watcher = Watcher {
            client: self.client.clone(),
            key: self.key.clone(),
            timeout: self.timeout,
            control,
            shared: self.shared.clone(),
        };
        let registration = Registration {
            shared: self.shared.clone(),
            client: self.client.clone(),
            key: replicas_prefix(&self.key) + &self.shared.replica_id,
            lease_ttl: self.lease_ttl,
            timeout: self.timeout,
            generations: router.subscribe(),
        };
        vec![
            tokio::spawn(watcher.run(stop.clone())),
            tokio::spawn(registration.run(stop)),
        ]
    }

    fn follow(&mut self, revision: i64) {
        self.known = Known::At(revision);
        self.shared.applied.store(revision, Ordering::Release);
        self.shared.refresh();
    }

    async fn keep_copy(&self, state: &RouteState) {
        let file = self.file.clone();
        let state = state.clone();
        match tokio::task::spawn_blocking(move || file.save(&state)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the fail-static copy of the route state was not written")
            }
            Err(_) => {}
        }
    }

    /// One transaction: `when` holds → put `state`; else → read what is there. A slow
    /// failure is remembered for `refused_since`.
    async fn put_if(&mut self, when: Compare, state: &RouteState) -> Result<Saved, StoreError> {
        let value = serde_json::to_vec(state).expect("the route state always serializes");
        let txn = Txn::new()
            .when([when])
            .and_then([TxnOp::put(self.key.as_str(), value, None)])
            .or_else([TxnOp::get(self.key.as_str(), None)]);
        let started = Instant::now();
        let answer = until_sent(self.call_deadline(), self.timeout, || {
            let (mut client, txn) = (self.client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await;
        self.note_failure(started, &answer);
        let answer = answer.map_err(|e| match e {
            // A write that timed out may still reach etcd; it is conditioned on this
            // revision, so it either lands whole, for every replica, or not at all.
            StoreError::Unavailable(reason) => StoreError::Unavailable(format!(
                "{reason}; the change is not applied (should etcd still commit it, \
                     every replica follows it once etcd answers)"
            )),
            other => other,
        })?;
        let revision = answer.header().map(|h| h.revision()).unwrap_or_default();
        if answer.succeeded() {
            self.follow(revision);
            self.keep_copy(state).await;
            return Ok(Saved::Done);
        }
        let current = answer.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        });
        let observed = match current {
            Some(kv) => route_of(&self.key, &kv)?,
            None => Observed {
                state: None,
                revision,
            },
        };
        Ok(Saved::Conflict(observed))
    }
}

impl Shared {
    /// The `store` object of `/status`.
    pub fn status(&self) -> Value {
        let replicas: Vec<Value> = self
            .replicas
            .borrow()
            .iter()
            .map(|(id, generation)| json!({ "id": id, "generation": generation }))
            .collect();
        let problem = self.problem.lock().map(|p| p.clone()).unwrap_or_default();
        json!({
            "kind": "etcd",
            "replica_id": self.replica_id,
            "revision": self.applied.load(Ordering::Acquire),
            "in_sync": self.in_sync(),
            "problem": problem,
            "replicas": replicas,
        })
    }

    /// Waits until every replica in the list has applied `generation`, or `timeout`. This
    /// replica is not waited for: it applied the change before answering, though its
    /// record in etcd may not say so yet.
    pub async fn wait_replicas(
        &self,
        generation: u64,
        timeout: Duration,
    ) -> Result<(), Vec<String>> {
        let lagging = |replicas: &BTreeMap<String, u64>| -> Vec<String> {
            replicas
                .iter()
                .filter(|&(id, &applied)| applied < generation && *id != self.replica_id)
                .map(|(id, _)| id.clone())
                .collect()
        };
        let mut list = self.replicas.subscribe();
        let caught_up = tokio::time::timeout(
            timeout,
            list.wait_for(|replicas| lagging(replicas).is_empty()),
        )
        .await;
        match caught_up {
            Ok(_) => Ok(()),
            Err(_) => Err(lagging(&self.replicas.borrow())),
        }
    }

    /// The watch answers and the table follows the newest revision it reported.
    fn in_sync(&self) -> bool {
        self.watching.load(Ordering::Acquire)
            && self.applied.load(Ordering::Acquire) >= self.seen.load(Ordering::Acquire)
    }

    /// Why this replica should take no traffic yet: its route state is a guess.
    pub fn not_ready(&self) -> Option<&'static str> {
        self.guessing.load(Ordering::Acquire).then_some(
            "etcd was unreachable or held no valid route state at start, and there is no \
             state file: this replica serves routing.initial until it has read a valid route \
             state from etcd",
        )
    }

    fn refresh(&self) {
        let in_sync = self.in_sync();
        if in_sync {
            self.guessing.store(false, Ordering::Release);
        }
        self.in_sync.set(i64::from(in_sync));
    }

    /// This replica's record was written under `lease`: if that is not this replica's own
    /// lease, another live replica has the same id, and each overwrites the other's record
    /// (`wait_replicas` cannot tell them apart). Warned once per other lease.
    fn own_record(&self, lease: i64) {
        let own = self.lease.load(Ordering::Acquire);
        if own == 0 || lease == own || self.twin.swap(lease, Ordering::AcqRel) == lease {
            return;
        }
        tracing::warn!(
            replica = %self.replica_id,
            lease,
            own,
            "another replica records itself under this replica's id; give each replica its own etcd.replica_id (or leave it out: host:admin-port)"
        );
    }

    fn set_problem(&self, problem: Option<String>) {
        if let Ok(mut p) = self.problem.lock() {
            *p = problem;
        }
    }

    fn set_watching(&self, watching: bool) {
        self.watching.store(watching, Ordering::Release);
        self.refresh();
    }

    fn saw(&self, revision: i64) {
        self.seen.fetch_max(revision, Ordering::AcqRel);
        self.refresh();
    }
}

/// Follows the route key and the replica list.
struct Watcher {
    client: Client,
    key: String,
    timeout: Duration,
    /// Where observed states go: the single writer.
    control: Control,
    shared: Arc<Shared>,
}

impl Watcher {
    async fn run(self, stop: CancellationToken) {
        let mut lost = false;
        // The invalid state last reported, so it is logged once, not on every retry.
        let mut reported = None;
        loop {
            let error = tokio::select! {
                Err(e) = self.follow(&mut lost) => e,
                _ = stop.cancelled() => break,
            };
            self.shared.set_watching(false);
            let text = error.to_string();
            if matches!(error, StoreError::Corrupt { .. }) {
                if reported.as_ref() != Some(&text) {
                    tracing::error!(error = %error, "the route state in etcd is not valid; serving the last state, changes are refused until it is fixed");
                    reported = Some(text.clone());
                }
            } else if !lost {
                tracing::warn!(error = %error, key = %self.key, "lost the etcd watch; serving the last state, changes are refused until it is back");
            } else {
                tracing::debug!(error = %error, "etcd is still unreachable");
            }
            lost = true;
            self.shared.set_problem(Some(text));
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.cancelled() => break,
            }
        }
        self.shared.set_watching(false);
    }

    /// Reads, hands the state to the writer, and watches until something fails.
    async fn follow(&self, lost: &mut bool) -> Result<Infallible, StoreError> {
        let mut client = self.client.clone();
        // Read before the snapshot: a change this replica stored is then in etcd's history
        // before the read starts, so in one continuous history the key's revision (or the
        // revision at which it is missing) cannot be below it.
        let followed = self.shared.applied.load(Ordering::Acquire);
        let snapshot = snapshot(&client, &self.key, self.timeout).await?;
        self.shared.replicas.send_replace(snapshot.replicas);
        if snapshot.route.revision < followed {
            // etcd's history went back: restored from a backup, or rebuilt. What it holds
            // now is the state to follow, whatever its revision.
            tracing::warn!(
                key = %self.key,
                followed,
                revision = snapshot.route.revision,
                "etcd's history is behind the revision this replica followed (restored from a backup, or rebuilt?); following what it holds now"
            );
            self.shared.seen.store(0, Ordering::Release);
            self.observed(Change::Rewound(snapshot.route)).await?;
        } else {
            self.observed(Change::Observed(snapshot.route)).await?;
        }

        let from = snapshot.revision + 1;
        let prefix = replicas_prefix(&self.key);
        let mut stream = within(
            self.timeout,
            client.watch(
                self.key.as_str(),
                Some(WatchOptions::new().with_start_revision(from)),
            ),
        )
        .await?;
        within(
            self.timeout,
            stream.watch(
                prefix.as_str(),
                Some(WatchOptions::new().with_prefix().with_start_revision(from)),
            ),
        )
        .await?;
        let mut created = 0;
        while created < 2 {
            let answer = within(self.timeout, stream.message())
                .await?
                .ok_or_else(|| unavailable("the watch ended"))?;
            if answer.canceled() {
                return Err(unavailable(format!(
                    "etcd refused the watch: {}",
                    answer.cancel_reason()
                )));
            }
            created += usize::from(answer.created());
            self.events(answer.events(), &prefix).await?;
        }
        self.shared.set_problem(None);
        self.shared.set_watching(true);
        if std::mem::take(lost) {
            tracing::info!(key = %self.key, revision = snapshot.revision, "etcd is back; following the route state again");
        }

        let mut probe = tokio::time::interval(PROBE);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                answer = stream.message() => {
                    let answer = answer
                        .map_err(|e| unavailable(e.to_string()))?
                        .ok_or_else(|| unavailable("the watch ended"))?;
                    heard = Instant::now();
                    if answer.canceled() {
                        return Err(unavailable(format!(
                            "etcd cancelled the watch: {}",
                            answer.cancel_reason()
                        )));
                    }
                    self.events(answer.events(), &prefix).await?;
                }
                _ = probe.tick() => {
                    if heard.elapsed() > self.timeout + PROBE {
                        return Err(unavailable("etcd stopped answering the watch"));
                    }
                    within(self.timeout, stream.request_progress()).await?;
                }
            }
        }
    }

    async fn events(&self, events: &[etcd_client::Event], prefix: &str) -> Result<(), StoreError> {
        for event in events {
            let Some(kv) = event.kv() else { continue };
            if kv.key() == self.key.as_bytes() {
                let observed = match event.event_type() {
                    EventType::Put => match route_of(&self.key, kv) {
                        Ok(observed) => observed,
                        Err(e) => {
                            // Not followed: this replica keeps its state and says it is
                            // out of sync until a valid state arrives.
                            self.shared.saw(kv.mod_revision());
                            tracing::error!(error = %e, "ignoring an invalid route state in etcd");
                            self.shared.set_problem(Some(e.to_string()));
                            continue;
                        }
                    },
                    EventType::Delete => Observed {
                        state: None,
                        revision: kv.mod_revision(),
                    },
                };
                self.shared.set_problem(None);
                self.observed(Change::Observed(observed)).await?;
            } else if let Some(id) = kv.key().strip_prefix(prefix.as_bytes()) {
                let id = String::from_utf8_lossy(id).into_owned();
                if event.event_type() == EventType::Put && id == self.shared.replica_id {
                    self.shared.own_record(kv.lease());
                }
                match event.event_type() {
                    EventType::Put => match generation_of(kv.value()) {
                        Some(generation) => {
                            self.shared.replicas.send_modify(|list| {
                                list.insert(id, generation);
                            });
                        }
                        None => {
                            tracing::debug!(replica = %id, "ignoring an unreadable replica record")
                        }
                    },
                    EventType::Delete => {
                        self.shared
                            .replicas
                            .send_if_modified(|list| list.remove(&id).is_some());
                    }
                }
            }
        }
        Ok(())
    }

    /// Hands a state (`Change::Observed` or `Change::Rewound`) to the writer and waits
    /// until it is applied.
    async fn observed(&self, change: Change) -> Result<(), StoreError> {
        if let Change::Observed(seen) | Change::Rewound(seen) = &change {
            self.shared.saw(seen.revision);
        }
        self.control
            .apply(change)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(format!("following the route state: {e}")))
    }
}

/// This replica's record under `{key}/replicas/`, bound to a lease.
struct Registration {
    shared: Arc<Shared>,
    client: Client,
    key: String,
    lease_ttl: Duration,
    timeout: Duration,
    /// The generation of every table this replica publishes.
    generations: watch::Receiver<u64>,
}

impl Registration {
    async fn run(mut self, stop: CancellationToken) {
        let mut lease = None;
        let mut lost = false;
        loop {
            let error = tokio::select! {
                Err(e) = self.keep(&mut lease, &mut lost) => e,
                _ = stop.cancelled() => break,
            };
            if !lost {
                tracing::warn!(error = %error, key = %self.key, "lost this replica's etcd lease; registering again");
                lost = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.cancelled() => break,
            }
        }
        // Leaving now rather than after lease_ttl: nobody waits for a replica that stopped.
        if let Some(id) = lease {
            let mut client = self.client.clone();
            let _ = within(self.timeout, client.lease_revoke(id)).await;
        }
    }

    /// Takes a lease, records the applied generation under it, and keeps both current
    /// until something fails.
    async fn keep(
        &mut self,
        lease: &mut Option<i64>,
        lost: &mut bool,
    ) -> Result<Infallible, StoreError> {
        let mut client = self.client.clone();
        let seconds =
            i64::try_from(self.lease_ttl.as_millis().div_ceil(1000).max(1)).unwrap_or(i64::MAX);
        let id = within(self.timeout, client.lease_grant(seconds, None))
            .await?
            .id();
        *lease = Some(id);
        self.shared.lease.store(id, Ordering::Release);
        let (mut keeper, mut answers) = within(self.timeout, client.lease_keep_alive(id)).await?;
        if std::mem::take(lost) {
            tracing::info!(key = %self.key, "registered again in etcd");
        }
        let mut recorded = None;
        let mut tick = tokio::time::interval((self.lease_ttl / 5).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut acked = Instant::now();
        loop {
            let generation = *self.generations.borrow_and_update();
            if recorded != Some(generation) {
                let record = json!({ "generation": generation }).to_string();
                within(
                    self.timeout,
                    client.put(
                        self.key.as_str(),
                        record,
                        Some(PutOptions::new().with_lease(id)),
                    ),
                )
                .await?;
                recorded = Some(generation);
            }
            tokio::select! {
                changed = self.generations.changed() => {
                    if changed.is_err() {
                        return Err(StoreError::Stopped);
                    }
                }
                _ = tick.tick() => {
                    if acked.elapsed() > self.lease_ttl {
                        return Err(unavailable("lease keep-alives went unanswered for lease_ttl"));
                    }
                    keeper
                        .keep_alive()
                        .await
                        .map_err(|e| unavailable(e.to_string()))?;
                }
                answer = answers.message() => match answer {
                    Ok(Some(a)) if a.ttl() > 0 => acked = Instant::now(),
                    Ok(Some(_)) => return Err(unavailable("the lease expired")),
                    Ok(None) => return Err(unavailable("the lease keep-alive stream ended")),
                    Err(e) => return Err(unavailable(e.to_string())),
                },
            }
        }
    }
}

/// Reads the route key and the replica list at one revision.
async fn snapshot(client: &Client, key: &str, timeout: Duration) -> Result<Snapshot, StoreError> {
    let mut client = client.clone();
    let txn = Txn::new().and_then([
        TxnOp::get(key, None),
        TxnOp::get(replicas_prefix(key), Some(GetOptions::new().with_prefix())),
    ]);
    let answer = within(timeout, client.txn(txn)).await?;
    let revision = answer.header().map(|h| h.revision()).unwrap_or_default();
    let mut gets = answer.op_responses().into_iter().filter_map(|r| match r {
        TxnOpResponse::Get(get) => Some(get),
        _ => None,
    });
    let (Some(route), Some(list)) = (gets.next(), gets.next()) else {
        return Err(unavailable("etcd answered a read without its results"));
    };
    let route = match route.kvs().first() {
        Some(kv) => route_of(key, kv)?,
        None => Observed {
            state: None,
            revision,
        },
    };
    let prefix = replicas_prefix(key);
    let replicas = list
        .kvs()
        .iter()
        .filter_map(|kv| {
            let id = kv.key().strip_prefix(prefix.as_bytes())?;
            Some((
                String::from_utf8_lossy(id).into_owned(),
                generation_of(kv.value())?,
            ))
        })
        .collect();
    Ok(Snapshot {
        route,
        replicas,
        revision,
    })
}

fn route_of(key: &str, kv: &KeyValue) -> Result<Observed, StoreError> {
    let state = RouteState::parse(kv.value()).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Observed {
        state: Some(state),
        revision: kv.mod_revision(),
    })
}

fn generation_of(record: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(record)
        .ok()?
        .get("generation")?
        .as_u64()
}

fn replicas_prefix(key: &str) -> String {
    format!("{key}/replicas/")
}

/// This host's name: `/etc/hostname`, else `HOSTNAME`, else `localhost`.
fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".into())
}

fn unavailable(reason: impl Into<String>) -> StoreError {
    StoreError::Unavailable(reason.into())
}

/// Runs an etcd call of a change by `deadline`, again while it fails before it is sent:
/// with several endpoints, the client may send one call to a member that is down (its
/// connection refused) and the next to one that is up. A call that was sent is not made
/// twice; `timeout` is what the error names.
async fn until_sent<T, F, Fut>(
    deadline: Instant,
    timeout: Duration,
    mut call: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let no_answer = || {
        unavailable(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ))
    };
    let mut tries = 0;
    loop {
        tries += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        // Not begun with no time left: it could reach etcd and never be answered.
        if left < UNSENT_PAUSE {
            return Err(no_answer());
        }
        let e = match tokio::time::timeout(left, call()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => return Err(no_answer()),
        };
        let unsent = e.contains("tcp connect error") || e.contains("error trying to connect");
        if !unsent || tries == UNSENT_TRIES || Instant::now() + UNSENT_PAUSE >= deadline {
            return Err(unavailable(e));
        }
        tokio::time::sleep(UNSENT_PAUSE).await;
    }
}

/// The pause before a call that could not be sent goes again (`until_sent`).
const UNSENT_PAUSE: Duration = Duration::from_millis(20);
/// Tries of a call that cannot be sent: enough to find a live member among several when
/// one is down, few enough that an etcd refusing every call answers 503 in half a second,
/// not at the timeout.
const UNSENT_TRIES: u32 = 25;

/// Runs one etcd call bounded by `timeout`.
async fn within<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(unavailable(e.to_string())),
        Err(_) => Err(unavailable(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ))),
    }
}
