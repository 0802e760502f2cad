//! Waiting for a condition: one poller for tests, benchmarks and the processes that start
//! others (the local provisioner, `squall cluster up`).
//!
//! Every wait in Squall that is not driven by a message polls a probe until it holds, within
//! a bound: a node answering, a cluster settling, an asynchronous result appearing. [`Poll`]
//! is that loop, written once: the probe runs at once, then every [`Poll::every`] until it
//! returns `Some` or [`Poll::within`] has passed (the last try lands at the bound, never
//! after it). A [`Poll`] is two durations, free to copy; [`Poll::until`] blocks the thread
//! and [`Poll::until_async`] sleeps on tokio's timer.
//!
//! ```
//! use std::time::Duration;
//! use squall_proto::poll::Poll;
//!
//! let mut tries = 0;
//! let third = Poll::within(Duration::from_secs(1))
//!     .every(Duration::from_millis(1))
//!     .until(|| {
//!         tries += 1;
//!         (tries == 3).then_some(tries)
//!     });
//! assert_eq!(third.ok(), Some(3));
//! ```

use std::future::Future;
use std::time::{Duration, Instant};

/// How long to wait for a condition, and how often to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poll {
    within: Duration,
    every: Duration,
}

/// The condition did not hold within the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not so after {waited:?} ({tries} tries)")]
pub struct TimedOut {
    /// How long the poller waited.
    pub waited: Duration,
    /// How many times the probe ran.
    pub tries: u32,
}

impl Poll {
    /// Gives up once `within` has passed; looks every 20 ms.
    pub const fn within(within: Duration) -> Self {
        Self {
            within,
            every: Duration::from_millis(20),
        }
    }

    /// Looks every `every` instead.
    pub const fn every(self, every: Duration) -> Self {
        Self { every, ..self }
    }

    /// Runs `probe` until it returns `Some`, blocking the thread in between.
    pub fn until<T>(self, mut probe: impl FnMut() -> Option<T>) -> Result<T, TimedOut> {
        let started = Instant::now();
        let mut tries = 0;
        loop {
            tries += 1;
            if let Some(found) = probe() {
                return Ok(found);
            }
            match self.pause(started, tries) {
                Ok(pause) => std::thread::sleep(pause),
                Err(timed_out) => return Err(timed_out),
            }
        }
    }

    /// Runs `probe` until its future yields `Some`, sleeping on tokio's timer in between.
    pub async fn until_async<T, F>(self, mut probe: impl FnMut() -> F) -> Result<T, TimedOut>
    where
        F: Future<Output = Option<T>>,
    {
        let started = Instant::now();
        let mut tries = 0;
        loop {
            tries += 1;
            if let Some(found) = probe().await {
                return Ok(found);
            }
            match self.pause(started, tries) {
                Ok(pause) => tokio::time::sleep(pause).await,
                Err(timed_out) => return Err(timed_out),
            }
        }
    }

    /// How long to sleep before the next try, or the error if the bound has passed.
    fn pause(&self, started: Instant, tries: u32) -> Result<Duration, TimedOut> {
        let waited = started.elapsed();
        if waited >= self.within {
            return Err(TimedOut { waited, tries });
        }
        Ok(self.every.min(self.within - waited))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_holds_at_once_is_probed_once() {
        let mut tries = 0;
        let found = Poll::within(Duration::ZERO).until(|| {
            tries += 1;
            Some("now")
        });
        assert_eq!(found, Ok("now"));
        assert_eq!(tries, 1);
    }

    #[test]
    fn a_condition_that_never_holds_ends_at_the_bound_with_a_last_try_there() {
        let within = Duration::from_millis(30);
        let mut last = None;
        let outcome = Poll::within(within)
            .every(Duration::from_millis(7))
            .until(|| {
                last = Some(Instant::now());
                None::<()>
            });
        let Err(timed_out) = outcome else {
            panic!("the condition never holds");
        };
        assert!(timed_out.waited >= within, "{timed_out:?}");
        assert!(timed_out.tries >= 2, "{timed_out:?}");
        assert!(last.is_some());
    }

    #[test]
    fn the_async_poller_counts_its_tries() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        let mut tries = 0;
        let found = runtime.block_on(
            Poll::within(Duration::from_secs(5))
                .every(Duration::from_millis(1))
                .until_async(|| {
                    tries += 1;
                    let done = tries == 4;
                    async move { done.then_some(tries) }
                }),
        );
        assert_eq!(found, Ok(4));
    }
}
