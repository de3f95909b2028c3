//! The tokio runtime every command runs on, sized as tokio sizes it: `TOKIO_WORKER_THREADS`
//! worker threads if set, else one per core the process may use (a container's CPU quota
//! counts, as `std::thread::available_parallelism` reads it).
//!
//! With one worker, the single-thread scheduler runs every task on the main thread. The
//! work is the same, without the multi-thread scheduler's hand-offs between the main thread
//! and the worker (the shared run queue, the worker's park and unpark): a relayed
//! WebSocket frame costs about 16 % fewer instructions, and an HTTP request about 1 %
//! (benches/RESULTS.md, "One worker, one thread").

use std::num::NonZeroUsize;

use thiserror::Error;
use tokio::runtime::{Builder, Runtime};

/// The variable tokio reads for its worker count; Switchyard reads it first, to choose
/// the scheduler and to refuse a bad value with a message instead of tokio's panic.
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

/// Builds the runtime: the single-thread scheduler for one worker, the multi-thread one
/// for more.
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
    let workers = workers(var, cores)?;
    let mut builder = if workers.get() == 1 {
        Builder::new_current_thread()
    } else {
        let mut builder = Builder::new_multi_thread();
        builder.worker_threads(workers.get());
        // A task woken by the running one waits its turn instead of running next, so an
        // HTTP/2 connection's task runs once after all its streams that became ready
        // together, and writes their responses in one system call, not one each
        // (.cargo/config.toml). The single-thread scheduler has no such slot.
        #[cfg(tokio_unstable)]
        builder.disable_lifo_slot();
        builder
    };
    Ok(builder.enable_all().build()?)
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
