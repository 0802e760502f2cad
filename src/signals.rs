//! SIGINT and SIGTERM, handled one way by every role.
//!
//! The first signal asks the process to stop gracefully: a storage node hands its keys off, an
//! executor drains, the HTTP server finishes the requests it has. That can take up to a minute,
//! and an operator who presses Ctrl-C again (or a supervisor that sends SIGTERM again) means
//! it: the same signal a second time ends the process at once, with exit code 130.
//!
//! Only a repeat of the same signal does: Ctrl-C on `squall cluster up` reaches its children
//! too (one process group) and then the parent asks each to stop with SIGTERM; that SIGTERM
//! after a SIGINT must still let them hand off and drain.
//!
//! The signals are received with `tokio::signal` on a thread of their own (a current-thread
//! runtime that does nothing else), so blocking roles and async roles share one [`Stop`]: it
//! is a `watch` channel, waited on with [`Stop::requested`] in async code and polled with
//! [`Stop::until`] in blocking code.

use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// How often blocking code looks at whether the process should stop.
const POLL: Duration = Duration::from_millis(100);

/// The exit code after a second signal (as a shell reports an interrupted command).
const FORCED_EXIT: i32 = 130;

/// Whether a stop was asked for. Cheap to clone; lives as long as the process.
#[derive(Debug, Clone)]
pub struct Stop {
    requested: watch::Receiver<bool>,
}

/// Installs the handlers. Call it once, early: before a role starts anything that must stop
/// gracefully.
pub fn install() -> anyhow::Result<Stop> {
    let (tx, rx) = watch::channel(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("squall-signals".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                let handlers = signal(SignalKind::interrupt())
                    .and_then(|int| Ok((int, signal(SignalKind::terminate())?)));
                let (mut interrupt, mut terminate) = match handlers {
                    Ok(handlers) => {
                        let _ = ready_tx.send(Ok(()));
                        handlers
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                let mut received = Received::default();
                loop {
                    let name = tokio::select! {
                        _ = interrupt.recv() => "SIGINT",
                        _ = terminate.recv() => "SIGTERM",
                    };
                    if received.note(name) {
                        eprintln!("{name} again: exiting at once");
                        std::process::exit(FORCED_EXIT);
                    }
                    tracing::info!(signal = name, "stopping (send it again to exit at once)");
                    let _ = tx.send(true);
                }
            });
        })
        .context("starting the signal thread")?;
    ready_rx
        .recv()
        .context("the signal thread stopped")?
        .context("installing the SIGINT/SIGTERM handlers")?;
    Ok(Stop { requested: rx })
}

/// The signals received so far.
#[derive(Debug, Default)]
struct Received {
    interrupts: u32,
    terminations: u32,
}

impl Received {
    /// Counts signal `name`; whether it ends the process at once (its second arrival).
    fn note(&mut self, name: &str) -> bool {
        let count = if name == "SIGINT" {
            &mut self.interrupts
        } else {
            &mut self.terminations
        };
        *count += 1;
        *count >= 2
    }
}

impl Stop {
    /// Whether a stop was asked for.
    pub fn is_requested(&self) -> bool {
        *self.requested.borrow()
    }

    /// Resolves once a stop is asked for.
    pub async fn requested(&self) {
        let mut requested = self.requested.clone();
        // An error means the signal thread is gone, which happens only as the process ends.
        let _ = requested.wait_for(|stop| *stop).await;
    }

    /// Blocks until a stop is asked for; fails with `died` if `running` stops holding first.
    pub fn until(&self, running: impl Fn() -> bool, died: &str) -> anyhow::Result<()> {
        loop {
            if self.is_requested() {
                return Ok(());
            }
            anyhow::ensure!(running(), "{died}");
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_repeat_of_the_same_signal_exits() {
        let mut received = Received::default();
        assert!(!received.note("SIGINT"), "the first asks to stop");
        assert!(
            !received.note("SIGTERM"),
            "a supervisor's SIGTERM after Ctrl-C still stops gracefully"
        );
        assert!(received.note("SIGTERM"));
        assert!(received.note("SIGINT"));
    }

    #[test]
    fn a_stop_is_seen_by_blocking_and_async_waiters() {
        let (tx, rx) = watch::channel(false);
        let stop = Stop { requested: rx };
        assert!(!stop.is_requested());
        let died = stop.until(|| false, "gone");
        assert!(died.is_err(), "a role that died is an error");
        tx.send(true).expect("receiver alive");
        assert!(stop.until(|| false, "gone").is_ok());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(stop.requested());
    }
}
