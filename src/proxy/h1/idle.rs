//! `Idle`: the connections to one upstream kept between exchanges, most recently used
//! first. Which connection may be kept is decided where an exchange ends (`body`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::conn::Conn;

/// How long a kept connection may sit unused before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most connections kept per upstream; more are closed when their exchange ends.
const MAX_IDLE: usize = 1024;

/// Connections to one upstream that finished an exchange and may carry another.
pub struct Idle {
    parked: Mutex<Parked>,
}

/// What `Idle` guards.
#[derive(Default)]
struct Parked {
    /// Oldest first: parked at the end, taken from the end.
    conns: Vec<(Conn, Instant)>,
    /// The upstream was removed from its pool: it gets no new requests, so a connection
    /// its last ones finish with is closed, not kept (its health loop, which sweeps idle
    /// connections, has stopped too).
    closed: bool,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.lock().conns.len();
        f.debug_struct("Idle").field("conns", &n).finish()
    }
}

impl Default for Idle {
    fn default() -> Idle {
        Idle {
            parked: Mutex::new(Parked::default()),
        }
    }
}

impl Idle {
    /// The most recently parked connection that is still open, if any, and, for TLS, was
    /// verified with `trust` (a reload may have replaced the trust since).
    pub(super) fn take(&self, trust: &Arc<rustls::ClientConfig>) -> Option<Conn> {
        loop {
            let (mut conn, since) = self.lock().conns.pop()?;
            if conn.trust.as_ref().is_some_and(|t| !Arc::ptr_eq(t, trust)) {
                continue;
            }
            if since.elapsed() >= IDLE_TIMEOUT {
                // Everything below it is older still (newer ones may have come on top).
                drop(conn);
                self.sweep();
                return None;
            }
            if conn.is_open() {
                conn.reused = true;
                return Some(conn);
            }
        }
    }

    /// Keeps `conn` for the next exchange, unless the set is full or closed.
    pub(super) fn park(&self, conn: Conn) {
        let mut parked = self.lock();
        if parked.conns.len() < MAX_IDLE && !parked.closed {
            parked.conns.push((conn, Instant::now()));
        }
    }

    /// Closes connections unused for `IDLE_TIMEOUT` and those the upstream closed (the
    /// health loop calls this, so an upstream without traffic does not hold sockets).
    pub fn sweep(&self) {
        let gone: Vec<_> = self
            .lock()
            .conns
            .extract_if(.., |(conn, since)| {
                since.elapsed() >= IDLE_TIMEOUT || !conn.is_open()
            })
            .collect();
        drop(gone);
    }

    /// Closes the connection parked longest, if there is one, and answers its place under
    /// the open-file ceiling (`Stream::close_keeping_room`).
    pub fn close_oldest(&self) -> Option<crate::nofile::Counted> {
        let mut parked = self.lock();
        if parked.conns.is_empty() {
            return None;
        }
        let (oldest, _) = parked.conns.remove(0);
        drop(parked);
        Some(oldest.io.close_keeping_room())
    }

    /// Closes every parked connection.
    pub fn clear(&self) {
        let gone = std::mem::take(&mut self.lock().conns);
        drop(gone);
    }

    /// Closes every parked connection, and every one parked from now on until `open`: the
    /// upstream was removed from its pool.
    pub fn close(&self) {
        let gone = {
            let mut parked = self.lock();
            parked.closed = true;
            std::mem::take(&mut parked.conns)
        };
        drop(gone);
    }

    /// Keeps connections again: the upstream is back in its pool.
    pub fn open(&self) {
        self.lock().closed = false;
    }

    /// How many connections are parked.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether none are parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
