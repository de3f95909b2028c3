//! Polling a future only when its own waker fired.
//!
//! A relay task is woken for every frame, but the drain watch it also waits on changes a
//! few times in a stream's life. Polling that watch on every wake costs two watch
//! receivers' locks and re-registrations per frame (callgrind: an eighth of a relayed
//! frame's instructions). [`Woken`] gives the watched future a waker of its own that
//! records the wake before passing it on to the task, and skips the poll when no wake
//! was recorded: the poll would have returned `Pending` without news.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// A wake flag for one future, polled through [`Woken::poll`].
pub struct Woken {
    flag: Arc<Flag>,
    /// `flag` as a waker, made once.
    waker: Waker,
}

struct Flag {
    /// Set by a wake, cleared by the poll that follows; starts set, for the first poll.
    woken: AtomicBool,
    /// The task to wake after recording the wake.
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Default for Woken {
    fn default() -> Woken {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(flag.clone());
        Woken { flag, waker }
    }
}

impl Woken {
    /// Polls `future` if it has not been polled yet or its waker fired since it was last
    /// polled; `Pending` otherwise. The task in `cx` is woken by `future`'s wakes either way.
    pub fn poll<F: Future>(&self, future: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the flag is read: a wake after the read finds this task.
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        future.poll(&mut Context::from_waker(&self.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A future that counts its polls and is ready once `ready` is set, waking through
    /// the waker it was last polled with.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    impl Probe {
        fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.ready.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            *self.waker.lock().expect("probe lock") = Some(cx.waker().clone());
            Poll::Pending
        }

        fn fire(&self) {
            self.ready.store(true, Ordering::Release);
            if let Some(w) = self.waker.lock().expect("probe lock").take() {
                w.wake();
            }
        }
    }

    #[tokio::test]
    async fn polls_first_then_only_after_its_own_wake() {
        let probe = Arc::new(Probe::default());
        let woken = Woken::default();
        let other_wakes = Arc::new(AtomicUsize::new(0));
        let done = {
            let probe = probe.clone();
            let other_wakes = other_wakes.clone();
            let mut fut = Box::pin(poll_fn(move |cx| probe.poll(cx)));
            poll_fn(move |cx| {
                if woken.poll(fut.as_mut(), cx).is_ready() {
                    return Poll::Ready(other_wakes.load(Ordering::Relaxed));
                }
                // Wake the task ourselves (as another source would) a few times.
                if other_wakes.load(Ordering::Relaxed) < 5 {
                    other_wakes.fetch_add(1, Ordering::Relaxed);
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            })
        };
        let firing = {
            let probe = probe.clone();
            let other_wakes = other_wakes.clone();
            async move {
                // Once the task has been woken five times by others, fire.
                while other_wakes.load(Ordering::Relaxed) < 5 {
                    tokio::task::yield_now().await;
                }
                probe.fire();
            }
        };
        let (other, ()) = tokio::join!(done, firing);
        assert_eq!(other, 5);
        // The first poll, then the one after `fire`: none for the five other wakes.
        assert_eq!(probe.polls.load(Ordering::Relaxed), 2);
    }
}
