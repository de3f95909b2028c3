//! The tokio runtime every command runs on, sized as tokio sizes it: `TOKIO_WORKER_THREADS`
//! worker threads if set, else one per core the process may use (a container's CPU quota
//! counts, as `std::thread::available_parallelism` reads it).
//!
//! One worker still gets the multi-thread scheduler. On the single-thread one a relayed
//! WebSocket frame cost 16 % fewer instructions, but 9,900 streams opened at once peaked
//! at 1.3-2.3 times the memory (benches/RESULTS.md, "What each change bought").

use std::num::NonZeroUsize;

use thiserror::Error;
use tokio::runtime::{Builder, Runtime};

/// The variable tokio reads for its worker count; Switchyard reads it first, to refuse a
/// bad value with a message instead of tokio's panic.
pub const WORKERS_VAR: &str = "TOKIO_WORKER_THREADS";

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("{WORKERS_VAR} must be a whole number of threads above 0, not {0:?}")]
    BadWorkers(String),
    #[error("cannot start the runtime: {0}")]
    Start(#[from] std::io::Error),
}

/// How many worker threads: `var` is the value of `TOKIO_WORKER_THREADS` if it is set,
/// `cores` the cores this process may use.
pub fn workers(var: Option<&str>, cores: NonZeroUsize) -> Result<NonZeroUsize, RuntimeError> {
    match var {
        None => Ok(cores),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| RuntimeError::BadWorkers(v.to_owned())),
    }
}

/// Builds the runtime.
pub fn build() -> Result<Runtime, RuntimeError> {
    let var = std::env::var_os(WORKERS_VAR);
    let var = match &var {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok_or_else(|| RuntimeError::BadWorkers(v.to_string_lossy().into_owned()))?,
        ),
    };
    let cores = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
    let mut builder = Builder::new_multi_thread();
    builder
        .worker_threads(workers(var, cores)?.get())
        .enable_all();
    // A task woken by the running one waits its turn instead of running next, so an HTTP/2
    // connection's task runs once after all its streams that became ready together, and
    // writes their responses in one system call, not one each (.cargo/config.toml).
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    Ok(builder.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).expect("not zero")
    }

    #[test]
    fn the_variable_wins_over_the_cores() {
        assert_eq!(workers(None, n(4)).ok(), Some(n(4)));
        assert_eq!(workers(Some("1"), n(4)).ok(), Some(n(1)));
        assert_eq!(workers(Some(" 3 "), n(1)).ok(), Some(n(3)));
    }

    #[test]
    fn a_bad_count_is_refused_with_its_value() {
        for bad in ["0", "", "two", "-1", "1.5"] {
            match workers(Some(bad), n(2)) {
                Err(e @ RuntimeError::BadWorkers(_)) => {
                    assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }
}
