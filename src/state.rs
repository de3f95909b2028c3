//! The persisted route state and the file that keeps it across restarts.
//!
//! Written atomically (temp file, fsync, rename, fsync of the directory) before a change is
//! acknowledged. A missing file means first start; an unreadable one is an error that names
//! the file, never a silent reset to `routing.initial`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::upstream::Color;

/// How many history entries are kept; older ones are dropped so the file stays small.
pub const HISTORY_LIMIT: usize = 1000;

/// Most bytes the history may take as JSON, older entries dropped first: a state must stay
/// well under etcd's default request limit (1.5 MiB), or no change could be written again,
/// and 1,000 reasons of 1,024 characters can take 6 MB once escaped.
pub const HISTORY_BYTES: usize = 512 * 1024;

/// What a route change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Startup,
    Flip,
    Rollback,
    Commit,
    Reload,
}

impl Action {
    /// The label used in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Startup => "startup",
            Action::Flip => "flip",
            Action::Rollback => "rollback",
            Action::Commit => "commit",
            Action::Reload => "reload",
        }
    }
}

/// One route change, as `GET /history` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryEntry {
    pub generation: u64,
    pub action: Action,
    /// Active colour before; `None` for `startup`.
    pub from: Option<Color>,
    /// Active colour after.
    pub to: Color,
    /// RFC 3339 UTC.
    pub at: String,
    /// The caller's reason, if given.
    pub reason: Option<String>,
    /// The drain timeout the flip or rollback asked for, if it named one; replicas that
    /// follow the change through the store drain with it too.
    #[serde(
        default,
        with = "crate::duration::stored",
        skip_serializing_if = "Option::is_none"
    )]
    pub drain_timeout: Option<std::time::Duration>,
}

/// The durable part of the route table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteState {
    pub active: Color,
    pub rollback_to: Option<Color>,
    #[serde(deserialize_with = "generation")]
    pub generation: u64,
    /// RFC 3339 UTC.
    pub changed_at: String,
    pub history: Vec<HistoryEntry>,
}

/// Drops the oldest entries until the history is within `HISTORY_BYTES` as JSON; the
/// newest one always stays.
fn trim_to_bytes(history: &mut Vec<HistoryEntry>) {
    // Most of what an entry can take: its fields and, escaped, its reason (six bytes a
    // character at most, `\u0001`). Histories well within the bound skip the counting.
    let most: usize = history
        .iter()
        .map(|entry| 256 + 6 * entry.reason.as_ref().map_or(0, |r| r.chars().count()))
        .sum();
    if most <= HISTORY_BYTES {
        return;
    }
    let sizes: Vec<usize> = history
        .iter()
        .map(|entry| serde_json::to_vec(entry).map_or(0, |json| json.len() + 1))
        .collect();
    let mut total: usize = sizes.iter().sum();
    let mut oldest = 0;
    while total > HISTORY_BYTES && oldest + 1 < sizes.len() {
        total -= sizes[oldest];
        oldest += 1;
    }
    history.drain(..oldest);
}

/// The largest generation a stored state may have: the largest integer a JSON number
/// holds exactly, so that every client reads it as written. A state file or etcd value
/// written by hand with `u64::MAX` would otherwise overflow the next change; one written
/// at the bound stays there.
pub const MAX_GENERATION: u64 = (1 << 53) - 1;

/// Reads a stored generation, refusing one beyond `MAX_GENERATION`.
fn generation<'de, D: serde::Deserializer<'de>>(from: D) -> Result<u64, D::Error> {
    let generation = u64::deserialize(from)?;
    if generation > MAX_GENERATION {
        return Err(serde::de::Error::custom(format!(
            "generation {generation} is beyond {MAX_GENERATION}, the largest a JSON number holds exactly"
        )));
    }
    Ok(generation)
}

impl RouteState {
    /// Reads a stored state (the state file, or the etcd value), refusing one that
    /// contradicts itself: a hand-edited or badly restored state is an error to fix, not
    /// a route to serve (a rollback "to" the active colour would answer `changed: false`,
    /// and an unreadable `changed_at` would read as the time of each restart).
    pub fn parse(bytes: &[u8]) -> Result<RouteState, serde_json::Error> {
        use serde::de::Error;
        let state: RouteState = serde_json::from_slice(bytes)?;
        if state.rollback_to == Some(state.active) {
            return Err(serde_json::Error::custom(format!(
                "rollback_to is the active colour, {}",
                state.active.as_str()
            )));
        }
        if humantime::parse_rfc3339(&state.changed_at).is_err() {
            return Err(serde_json::Error::custom(format!(
                "changed_at {:?} is not an RFC 3339 UTC time",
                state.changed_at
            )));
        }
        Ok(state)
    }

    /// The state of a first start.
    pub fn first_start(initial: Color, at: SystemTime) -> RouteState {
        let at = rfc3339(at);
        RouteState {
            active: initial,
            rollback_to: None,
            generation: 1,
            changed_at: at.clone(),
            history: vec![HistoryEntry {
                generation: 1,
                action: Action::Startup,
                from: None,
                to: initial,
                at,
                reason: None,
                drain_timeout: None,
            }],
        }
    }

    /// The state after a change: generation + 1 and a history entry.
    pub fn next(
        &self,
        action: Action,
        active: Color,
        rollback_to: Option<Color>,
        at: SystemTime,
        reason: Option<String>,
    ) -> RouteState {
        // Only a state written by hand comes near the bound; there the count stops
        // rather than writing a state no restart could read.
        let generation = (self.generation + 1).min(MAX_GENERATION);
        // `changed_at` moves with every generation, even for two changes in one
        // millisecond or after the clock stepped back.
        let at = rfc3339(at.max(self.changed_at_time() + Duration::from_millis(1)));
        let mut history = self.history.clone();
        history.push(HistoryEntry {
            generation,
            action,
            from: Some(self.active),
            to: active,
            at: at.clone(),
            reason,
            drain_timeout: None,
        });
        if history.len() > HISTORY_LIMIT {
            history.drain(..history.len() - HISTORY_LIMIT);
        }
        trim_to_bytes(&mut history);
        RouteState {
            active,
            rollback_to,
            generation,
            changed_at: at,
            history,
        }
    }

    /// `changed_at` as a time (falls back to now for a hand-edited, unparsable value).
    pub fn changed_at_time(&self) -> SystemTime {
        humantime::parse_rfc3339(&self.changed_at).unwrap_or_else(|_| SystemTime::now())
    }
}

/// Formats a time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if write!(out, "{}", humantime::format_rfc3339_millis(t)).is_err() {
        // Years past 9999 cannot be written; only a hand-edited state file or etcd value
        // leads here, and the writer must not panic on it.
        return "9999-12-31T23:59:59.999Z".to_owned();
    }
    out
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path}: not a valid route state ({source}); fix or remove it")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state file {path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The route state in one JSON file.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// A store at `path` (created on first save).
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore { path: path.into() }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state; `Ok(None)` when the file does not exist.
    pub fn load(&self) -> Result<Option<RouteState>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let state = RouteState::parse(&bytes).map_err(|source| StateError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        Ok(Some(state))
    }

    /// Writes the state durably: a crash leaves either the old file or the new one.
    /// Blocking; call it from `spawn_blocking`.
    pub fn save(&self, state: &RouteState) -> Result<(), StateError> {
        let write_err = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(write_err)?;
        let json = serde_json::to_vec_pretty(state).expect("the route state always serializes");
        let file_name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "route.json".into());
        let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
        let written = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&json)?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(source) = written {
            // A failed save must not leave a temp file behind for every refused change.
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(source));
        }
        // The rename is durable only once the directory entry is.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
