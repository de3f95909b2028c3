//! Sockets are this process's own resource: the open-file limit, raised at start, and
//! telling a connect that failed for want of a socket here from an upstream that failed.
//!
//! Every proxied connection holds two sockets, one each side. The soft limit a shell or a
//! container runtime hands a process is often 1024 (containerd 2 and Docker 25 set it so,
//! with a hard limit far above), which would stop Switchyard near 500 streams. `raise`
//! lifts it to the hard limit at start, as Go's runtime and HAProxy do.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// Sockets beyond two per connection: listeners, admin connections, health probes, the
/// state file, the runtime's own descriptors.
const RESERVE: u64 = 128;

/// The open-file limit before and after `raise`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub was: u64,
    pub now: u64,
}

/// Raises the soft open-file limit to the hard one, and keeps the reserve below it. The
/// reserve is kept below the limit as it was even when raising it fails (a sandbox that
/// refuses `setrlimit`).
pub fn raise() -> io::Result<Limit> {
    let (was, _) = rlimit::Resource::NOFILE.get()?;
    set_limit(was);
    let now = rlimit::increase_nofile_limit(u64::MAX)?;
    set_limit(now);
    Ok(Limit { was, now })
}

/// Client and upstream sockets this process holds (`Counted`).
static SOCKETS: AtomicU64 = AtomicU64::new(0);

/// How many of them an upstream connect may find open: the open-file limit less the
/// reserve. Unknown (no limit) until `raise`.
static CEILING: AtomicU64 = AtomicU64::new(u64::MAX);

/// Wakes the client listeners waiting at the ceiling (`freed`) when a socket closes.
static FREED: Notify = Notify::const_new();

/// Keeps the reserve (`RESERVE`, or half of a small limit) free of client and
/// upstream sockets: the admin API, health probes and the state file need descriptors
/// most when traffic has taken the rest. An HTTP/2 client holds an upstream socket per
/// stream, so a few connections could otherwise take every descriptor, and the admin
/// listener could accept nothing until their streams end; client connections beyond the
/// ceiling would do the same, so the client listeners wait at it (`at_ceiling`).
pub fn set_limit(limit: u64) {
    let reserve = RESERVE.min(limit / 2);
    CEILING.store(limit.saturating_sub(reserve), Ordering::Relaxed);
}

/// Whether the client and upstream sockets open have reached the ceiling, so a client
/// listener must wait (`freed`) rather than accept into the reserve.
pub fn at_ceiling() -> bool {
    SOCKETS.load(Ordering::Relaxed) >= CEILING.load(Ordering::Relaxed)
}

/// Resolves when a socket closes while the count is at or above the ceiling. `enable` it
/// before looking at `at_ceiling`, so a close in between is not missed.
pub fn freed() -> tokio::sync::futures::Notified<'static> {
    FREED.notified()
}

/// A client or upstream socket, counted until dropped.
#[derive(Debug)]
pub struct Counted(());

impl Counted {
    /// Counts a client's socket, accepted already.
    pub fn accepted() -> Counted {
        SOCKETS.fetch_add(1, Ordering::Relaxed);
        Counted(())
    }

    /// Counts an upstream socket about to be opened, or refuses it as `socket(2)` would
    /// at the open-file limit (`EMFILE`, which callers answer 503 `proxy_overloaded`)
    /// when it would take from the reserve.
    pub fn to_open() -> io::Result<Counted> {
        let ceiling = CEILING.load(Ordering::Relaxed);
        // Counted only below the ceiling: a count raised past it and taken back would
        // hide from `Drop` the close that brings it under, and a listener waiting at the
        // ceiling would miss its wake-up.
        SOCKETS
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < ceiling).then_some(n + 1)
            })
            .map_err(|_| io::Error::from_raw_os_error(libc::EMFILE))?;
        Ok(Counted(()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if SOCKETS.fetch_sub(1, Ordering::Relaxed) >= CEILING.load(Ordering::Relaxed) {
            FREED.notify_waiters();
        }
    }
}

/// The open files `listeners` client listeners of `max_connections` each may need.
pub fn needed(max_connections: usize, listeners: usize) -> u64 {
    let connections = (max_connections as u64).saturating_mul(listeners as u64);
    connections.saturating_mul(2).saturating_add(RESERVE)
}

/// Warns when the open-file limit is below what `config`'s `limits.max_connections` may
/// need: past it, accepts wait and upstream connects answer 503 `proxy_overloaded`. At
/// start, and on a reload that changes `max_connections`.
pub fn warn_if_short(config: &crate::config::Config) {
    let listeners = 1 + usize::from(config.listen.preview.is_some());
    let needed = needed(config.limits.max_connections, listeners);
    if let Ok((limit, _)) = rlimit::Resource::NOFILE.get()
        && limit < needed
    {
        tracing::warn!(
            limit,
            needed,
            max_connections = config.limits.max_connections,
            "the open-file limit is below what limits.max_connections may need (two sockets per proxied connection); raise LimitNOFILE or ulimit -n, or lower limits.max_connections"
        );
    }
}

/// Whether `e` says this process or host could not make a socket at all (open files,
/// socket memory), which says nothing of the upstream it was for. `EADDRNOTAVAIL` is not
/// among them: connect also gives it for an address this host cannot reach (`[::1]` with
/// IPv6 off), which is the upstream's address at fault, not a limit here.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// `is_local_exhaustion` of the first I/O error in `e`'s chain of sources (a hyper
/// client's error wraps the connector's).
pub fn caused_by_local_exhaustion(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return is_local_exhaustion(io);
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_sockets_here_is_told_from_an_upstream_failing() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_local_exhaustion(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [
            libc::EADDRNOTAVAIL,
            libc::ECONNREFUSED,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ECONNRESET,
        ] {
            assert!(!is_local_exhaustion(&io::Error::from_raw_os_error(errno)));
        }
        assert!(!is_local_exhaustion(&io::Error::other("tls")));
    }

    #[test]
    fn the_cause_is_found_under_wrapping_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect failed")]
        struct Wrapper(#[source] io::Error);
        let wrapped = Wrapper(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(caused_by_local_exhaustion(&wrapped));
        let refused = Wrapper(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(!caused_by_local_exhaustion(&refused));
    }

    #[test]
    fn two_sockets_per_connection_and_a_reserve() {
        assert_eq!(needed(20_000, 1), 40_128);
        assert_eq!(needed(20_000, 2), 80_128);
        assert_eq!(needed(usize::MAX, 2), u64::MAX);
    }
}
