//! systemd integration: readiness/status notifications and a watchdog that only pets systemd while inference is
//! actually making progress.
//!
//! # Watchdog design
//! `WatchdogSec=` in the unit makes systemd kill and restart the daemon when no `WATCHDOG=1` arrives in time. A
//! timer that pings unconditionally would only prove that the async runtime is alive, not that the engine is. So the
//! pings are gated on a [`Heartbeat`]:
//!
//! - the inference path calls [`Heartbeat::beat`] after every completed batch;
//! - when idle, the daemon runs a small self-inference whenever [`Heartbeat::needs_self_test`] says so (every third
//!   of the watchdog interval), which beats too;
//! - [`run_watchdog`] wakes every quarter interval and sends `WATCHDOG=1` only if the last beat is at most one
//!   interval old.
//!
//! A hung ONNX Runtime session (a stuck CUDA kernel, a deadlocked driver) stops the beats; at most one interval later
//! the pings stop, and one interval after that systemd restarts the service. Without a `NOTIFY_SOCKET` (not run by
//! systemd, or `Type=` is not `notify`) everything here is a no-op.

use sd_notify::NotifyState;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Sends state changes to systemd (`sd_notify(3)`). A no-op when `NOTIFY_SOCKET` was unset at construction.
///
/// Send failures are logged and otherwise ignored: not being able to tell systemd something is never a reason to
/// stop processing images (if the watchdog pings are lost, systemd restarts us, which is the right outcome).
#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// Enabled when the service manager passed a `NOTIFY_SOCKET`.
    pub fn from_env() -> Self {
        Notifier { enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()) }
    }

    /// A notifier that never sends anything.
    pub fn disabled() -> Self {
        Notifier { enabled: false }
    }

    /// Whether notifications are sent.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Start-up is complete (`READY=1`); also sent after a reload.
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready], "READY=1");
    }

    /// A one-line status for `systemctl status` (`STATUS=`). Newlines would end the field, so they are replaced.
    pub fn status(&self, status: &str) {
        let clean: String = status.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        self.send(&[NotifyState::Status(&clean)], "STATUS");
    }

    /// A reload started (`RELOADING=1` with the `MONOTONIC_USEC` systemd ≥ 253 requires); send [`ready`](Self::ready)
    /// when it is done.
    pub fn reloading(&self) {
        if !self.enabled {
            return;
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now], "RELOADING=1"),
            Err(e) => tracing::warn!(error = %e, "cannot read CLOCK_MONOTONIC for RELOADING=1"),
        }
    }

    /// Shutdown started (`STOPPING=1`).
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping], "STOPPING=1");
    }

    /// Pets the watchdog (`WATCHDOG=1`). Prefer [`run_watchdog`], which only pets while inference makes progress.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog], "WATCHDOG=1");
    }

    /// Asks for more start-up (or shutdown) time, e.g. while TensorRT builds an engine (`EXTEND_TIMEOUT_USEC=`).
    pub fn extend_timeout(&self, by: Duration) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)], "EXTEND_TIMEOUT_USEC");
    }

    /// The watchdog interval from `WATCHDOG_USEC` (when `WATCHDOG_PID` is unset or names this process); `None` when
    /// the unit has no `WatchdogSec=` or notifications are disabled.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
    }

    fn send(&self, state: &[NotifyState<'_>], what: &str) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(state) {
            tracing::warn!(message = what, error = %e, "cannot notify systemd");
        }
    }
}

/// Proof of progress from the inference path. Cheap to clone; all clones share one clock.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    inner: Arc<HeartbeatInner>,
}

#[derive(Debug)]
struct HeartbeatInner {
    origin: Instant,
    /// Microseconds after `origin` of the last beat, plus one; 0 means "never".
    last: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    pub fn new() -> Self {
        Heartbeat { inner: Arc::new(HeartbeatInner { origin: Instant::now(), last: AtomicU64::new(0) }) }
    }

    /// Records progress: call after each completed engine run (including idle self-tests).
    pub fn beat(&self) {
        let us = u64::try_from(self.inner.origin.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        self.inner.last.store(us + 1, Ordering::Relaxed);
    }

    /// Time since the last beat; `None` before the first one.
    pub fn since_last_beat(&self) -> Option<Duration> {
        self.last_beat().map(|t| t.elapsed())
    }

    fn last_beat(&self) -> Option<Instant> {
        match self.inner.last.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.inner.origin + Duration::from_micros(n - 1)),
        }
    }

    /// Whether an idle daemon should run a self-inference now to keep the watchdog fed: no beat for a third of the
    /// watchdog `interval` (so two chances remain before [`run_watchdog`] stops petting).
    pub fn needs_self_test(&self, interval: Duration) -> bool {
        self.since_last_beat().is_none_or(|age| age >= interval / 3)
    }
}

/// Pets systemd's watchdog every quarter `interval` as long as `heartbeat` beat within the last `interval`, until
/// `shutdown` completes. Before the first beat the start of this task counts as one, so call it once the engine is
/// up (right after `READY=1`).
pub async fn run_watchdog(
    notifier: Notifier,
    heartbeat: Heartbeat,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
) {
    if !notifier.is_enabled() {
        shutdown.await;
        return;
    }
    tracing::info!(interval_ms = interval.as_millis() as u64, "systemd watchdog enabled");
    gate_pings(&heartbeat, interval, shutdown, || notifier.watchdog()).await;
}

/// The gate of [`run_watchdog`] with the ping as a parameter (tests count pings without a socket).
async fn gate_pings(
    heartbeat: &Heartbeat,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
    mut ping: impl FnMut(),
) {
    let started = Instant::now();
    let period = (interval / 4).max(Duration::from_millis(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stale_logged = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        let last = heartbeat.last_beat().map_or(started, |b| b.max(started));
        let age = last.elapsed();
        if age <= interval {
            ping();
            stale_logged = false;
        } else if !stale_logged {
            tracing::error!(
                since_last_beat_ms = age.as_millis() as u64,
                interval_ms = interval.as_millis() as u64,
                "no inference progress: no longer petting the systemd watchdog, expect a restart"
            );
            stale_logged = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn heartbeat_tracks_the_last_beat() {
        let hb = Heartbeat::new();
        assert!(hb.since_last_beat().is_none());
        assert!(hb.needs_self_test(Duration::from_secs(30)));
        hb.beat();
        let age = hb.since_last_beat().unwrap();
        assert!(age < Duration::from_secs(1), "{age:?}");
        assert!(!hb.needs_self_test(Duration::from_secs(30)));
        assert!(hb.clone().needs_self_test(Duration::ZERO));
    }

    #[test]
    fn disabled_notifier_sends_nothing_and_has_no_watchdog() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready();
        n.status("x");
        n.watchdog();
        assert_eq!(n.watchdog_interval(), None);
    }

    #[tokio::test]
    async fn pings_stop_when_beats_stop() {
        let hb = Heartbeat::new();
        let pings = Arc::new(AtomicUsize::new(0));
        let interval = Duration::from_millis(200);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let (hb, pings) = (hb.clone(), pings.clone());
            tokio::spawn(async move {
                gate_pings(&hb, interval, async move { drop(stop_rx.await) }, || {
                    pings.fetch_add(1, Ordering::SeqCst);
                })
                .await
            })
        };
        // Beating: pings flow.
        for _ in 0..10 {
            hb.beat();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let while_beating = pings.load(Ordering::SeqCst);
        assert!(while_beating >= 3, "only {while_beating} pings in 500 ms of beats at a 50 ms period");
        // Silent for longer than interval + one period: pings must have stopped.
        tokio::time::sleep(interval + Duration::from_millis(150)).await;
        let after_silence = pings.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(pings.load(Ordering::SeqCst), after_silence, "pinged although nothing beat for > interval");
        // Progress resumes: pings resume.
        hb.beat();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(pings.load(Ordering::SeqCst) > after_silence, "pings did not resume after a beat");
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
    }
}
