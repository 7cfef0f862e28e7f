//! When syncs run: a bounded-frequency schedule, the same contract as kube-proxy's
//! BoundedFrequencyRunner, as a pure state machine over instants the caller passes in.
//!
//! - at most `burst` syncs start within any `min_interval` (a change waits for the window);
//! - a sync runs at least every `max_interval`, changed or not; one every `full_interval`
//!   (at least `max_interval`) is full: it re-reads what the kernel holds;
//! - after a failed sync the next one runs no sooner than `retry` later, and is full;
//! - nothing runs before the source's first complete view ([`Schedule::set_ready`]);
//! - nothing runs while the source sends a batch that belongs together
//!   ([`Schedule::hold`]), for at most [`HOLD_LIMIT`].
//!
//! The clock is tokio's ([`tokio::time::Instant`]): the loops that drive a schedule sleep
//! on it, and their tests pause it and let it advance, so no test waits on the wall clock.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// The longest a batch holds the syncs back: a source that never ends its batch delays
/// programming, it never stops it.
pub const HOLD_LIMIT: Duration = Duration::from_secs(10);

/// The bounds of a schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacing {
    /// Window in which at most `burst` syncs start (`--min-sync-period`).
    pub min_interval: Duration,
    /// Longest time between two syncs (`--sync-period`).
    pub max_interval: Duration,
    /// Longest time between two full syncs (`--full-sync-period`; never below
    /// `max_interval`).
    pub full_interval: Duration,
    /// Syncs allowed within one `min_interval` (at least 1).
    pub burst: usize,
    /// Wait after a failed sync before the next.
    pub retry: Duration,
}

impl Pacing {
    /// One sync per `min_interval`, one at least every `max_interval` and every one of
    /// those full, a failed one retried after `min_interval`.
    pub fn new(min_interval: Duration, max_interval: Duration) -> Pacing {
        Pacing {
            min_interval,
            max_interval,
            full_interval: max_interval,
            burst: 1,
            retry: min_interval,
        }
    }

    /// Makes only one sync every `full_interval` full (the others between program only
    /// what changed), as kube-proxy's nftables mode re-reads everything only hourly.
    pub fn with_full_interval(mut self, full_interval: Duration) -> Pacing {
        self.full_interval = full_interval;
        self
    }
}

/// What a sync that is starting must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Re-read the kernel's state and program everything (the periodic resync, or the
    /// first sync after a failure).
    pub full: bool,
}

/// The schedule's state.
#[derive(Clone, Debug)]
pub struct Schedule {
    pacing: Pacing,
    ready: bool,
    dirty: bool,
    /// Start times of the last `burst` syncs, oldest first.
    recent: VecDeque<Instant>,
    /// When the last sync started (the schedule's creation before the first).
    last_run: Instant,
    last_full: Instant,
    /// Set by a failure: the earliest next start, which is full.
    retry_at: Option<Instant>,
    /// A sync wanted at this time without a change (IPVS real servers still draining).
    recheck_at: Option<Instant>,
    /// Since when the source's batch holds the syncs back.
    held_since: Option<Instant>,
}

impl Schedule {
    /// A schedule whose first full-resync interval counts from `now`.
    pub fn new(pacing: Pacing, now: Instant) -> Schedule {
        Schedule {
            pacing: Pacing {
                burst: pacing.burst.max(1),
                full_interval: pacing.full_interval.max(pacing.max_interval),
                ..pacing
            },
            ready: false,
            dirty: false,
            recent: VecDeque::new(),
            last_run: now,
            last_full: now,
            retry_at: None,
            recheck_at: None,
            held_since: None,
        }
    }

    /// The source starts (`true`) or ends a batch of updates that belong together: no
    /// sync starts while it lasts, up to [`HOLD_LIMIT`] from its start.
    pub fn hold(&mut self, on: bool, now: Instant) {
        self.held_since = on.then(|| self.held_since.unwrap_or(now));
    }

    /// The source's first complete view arrived: syncs may run.
    pub fn set_ready(&mut self) {
        self.ready = true;
    }

    /// Whether [`Self::set_ready`] was called.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// A change waits to be programmed.
    pub fn queue(&mut self) {
        self.dirty = true;
    }

    /// Whether a change waits to be programmed.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Asks for a sync at `at` even without a change (`None` withdraws the ask).
    pub fn recheck_at(&mut self, at: Option<Instant>) {
        self.recheck_at = at;
    }

    /// The earliest start the window allows.
    fn allowed(&self) -> Option<Instant> {
        (self.recent.len() >= self.pacing.burst)
            .then(|| self.recent[self.recent.len() - self.pacing.burst] + self.pacing.min_interval)
    }

    /// When the next sync should start (an instant already past means now); `None`
    /// before the source is ready, when only a change can make one due.
    pub fn next_run(&self) -> Option<Instant> {
        if !self.ready {
            return None;
        }
        let at_least = |t: Instant| match self.allowed() {
            Some(a) => t.max(a),
            None => t,
        };
        let periodic = at_least(
            (self.last_run + self.pacing.max_interval)
                .min(self.last_full + self.pacing.full_interval),
        );
        let wanted = if let Some(r) = self.retry_at {
            Some(at_least(r))
        } else if self.dirty {
            // As soon as the window allows; an instant already past means now.
            Some(self.allowed().unwrap_or(self.last_run))
        } else {
            self.recheck_at.map(at_least)
        };
        let next = wanted.map_or(periodic, |w| w.min(periodic));
        Some(match self.held_since {
            Some(since) => next.max(since + HOLD_LIMIT),
            None => next,
        })
    }

    /// Whether a sync should start at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.next_run().is_some_and(|t| t <= now)
    }

    /// A sync starts at `now`: what it must do. Call when [`Self::is_due`].
    pub fn start(&mut self, now: Instant) -> Run {
        let full = self.retry_at.is_some() || now >= self.last_full + self.pacing.full_interval;
        if full {
            self.last_full = now;
        }
        self.last_run = now;
        self.recent.push_back(now);
        while self.recent.len() > self.pacing.burst {
            self.recent.pop_front();
        }
        self.dirty = false;
        self.recheck_at = None;
        self.retry_at = None;
        Run { full }
    }

    /// The sync started last ended at `now`, successfully or not.
    pub fn finish(&mut self, now: Instant, ok: bool) {
        if !ok {
            self.dirty = true;
            self.retry_at = Some(now + self.pacing.retry);
        }
    }
}

/// Sleeps on tokio's clock until `at` (at once when it is past), or forever when `None`:
/// the arm of a loop's `select!` that starts the schedule's next sync.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn pacing(min: u32, max: u32) -> Pacing {
        Pacing::new(min * MS, max * MS)
    }

    fn ready(p: Pacing, t0: Instant) -> Schedule {
        let mut s = Schedule::new(p, t0);
        s.set_ready();
        s
    }

    #[test]
    fn nothing_runs_before_the_source_is_ready_even_with_changes() {
        let t0 = Instant::now();
        let mut s = Schedule::new(pacing(100, 1000), t0);
        s.queue();
        assert_eq!(s.next_run(), None);
        assert!(!s.is_due(t0 + 5000 * MS));
        s.set_ready();
        assert!(s.is_due(t0), "the first change runs at once");
    }

    #[test]
    fn a_batch_holds_syncs_back_until_it_ends_or_for_at_most_the_hold_limit() {
        let t0 = Instant::now();
        let mut s = ready(pacing(100, 60_000), t0);
        s.hold(true, t0);
        s.queue();
        assert_eq!(s.next_run(), Some(t0 + HOLD_LIMIT), "held");
        // A second start does not extend the hold.
        s.hold(true, t0 + 5000 * MS);
        assert_eq!(s.next_run(), Some(t0 + HOLD_LIMIT));
        s.hold(false, t0 + 7000 * MS);
        assert!(
            s.is_due(t0 + 7000 * MS),
            "the change runs as the batch ends"
        );
        let run = s.start(t0 + 7000 * MS);
        assert!(!run.full);
        s.finish(t0 + 7000 * MS, true);
        assert!(!s.is_dirty());
    }

    #[test]
    fn changes_inside_the_min_interval_wait_for_it_and_run_once() {
        let t0 = Instant::now();
        let mut s = ready(pacing(100, 10_000), t0);
        s.queue();
        assert_eq!(s.start(t0), Run { full: false });
        s.finish(t0 + MS, true);
        for i in 1..5 {
            s.queue();
            assert_eq!(s.next_run(), Some(t0 + 100 * MS), "change {i}");
        }
        assert!(!s.is_due(t0 + 99 * MS));
        assert!(s.is_due(t0 + 100 * MS));
        s.start(t0 + 100 * MS);
        s.finish(t0 + 101 * MS, true);
        assert_eq!(
            s.next_run(),
            Some(t0 + 10_000 * MS),
            "nothing left but the periodic resync"
        );
    }

    #[test]
    fn a_burst_allows_that_many_syncs_per_window() {
        let t0 = Instant::now();
        let mut s = ready(
            Pacing {
                burst: 3,
                ..pacing(100, 10_000)
            },
            t0,
        );
        for i in 0..3u32 {
            s.queue();
            let t = t0 + i * MS;
            assert!(s.is_due(t), "sync {i} of the burst");
            s.start(t);
            s.finish(t, true);
        }
        s.queue();
        assert_eq!(
            s.next_run(),
            Some(t0 + 100 * MS),
            "the fourth waits for the first to leave the window"
        );
        s.start(t0 + 100 * MS);
        assert_eq!(s.next_run().map(|t| t - t0), Some(10_000 * MS));
        s.queue();
        assert_eq!(s.next_run(), Some(t0 + MS + 100 * MS));
    }

    #[test]
    fn an_idle_schedule_runs_a_full_sync_every_max_interval() {
        let t0 = Instant::now();
        let mut s = ready(pacing(100, 1000), t0);
        assert_eq!(s.next_run(), Some(t0 + 1000 * MS));
        assert_eq!(s.start(t0 + 1000 * MS), Run { full: true });
        s.finish(t0 + 1001 * MS, true);
        assert_eq!(s.next_run(), Some(t0 + 2000 * MS));
        s.queue();
        assert_eq!(s.start(t0 + 1500 * MS), Run { full: false });
    }

    #[test]
    fn between_full_syncs_the_periodic_ones_only_program_changes() {
        let t0 = Instant::now();
        let p = pacing(100, 1000).with_full_interval(3000 * MS);
        let mut s = ready(p, t0);
        assert_eq!(s.next_run(), Some(t0 + 1000 * MS));
        assert!(
            !s.start(t0 + 1000 * MS).full,
            "a periodic sync, not a full one"
        );
        assert_eq!(s.next_run(), Some(t0 + 2000 * MS));
        assert!(!s.start(t0 + 2000 * MS).full);
        // A change at 2.5 s; the one at 3 s, from the periodic timer's full deadline, is full.
        s.queue();
        assert!(!s.start(t0 + 2500 * MS).full);
        assert_eq!(s.next_run(), Some(t0 + 3000 * MS));
        assert!(s.start(t0 + 3000 * MS).full, "the full resync is due");
        assert_eq!(s.next_run(), Some(t0 + 4000 * MS));
    }

    #[test]
    fn a_full_interval_below_the_max_interval_is_the_max_interval() {
        let t0 = Instant::now();
        let mut s = ready(pacing(100, 1000).with_full_interval(10 * MS), t0);
        assert!(!s.start(t0 + 500 * MS).full);
        assert!(s.start(t0 + 1000 * MS).full);
    }

    #[test]
    fn a_failure_is_retried_after_the_retry_interval_as_a_full_sync() {
        let t0 = Instant::now();
        let mut s = ready(
            Pacing {
                retry: 300 * MS,
                ..pacing(100, 10_000)
            },
            t0,
        );
        s.queue();
        s.start(t0);
        s.finish(t0 + 10 * MS, false);
        assert!(s.is_dirty());
        assert_eq!(s.next_run(), Some(t0 + 310 * MS));
        assert_eq!(s.start(t0 + 310 * MS), Run { full: true });
        s.finish(t0 + 311 * MS, true);
        s.queue();
        assert_eq!(
            s.start(t0 + 500 * MS),
            Run { full: false },
            "a success ends the full syncs"
        );
    }

    #[test]
    fn a_recheck_runs_at_its_time_within_the_window_and_is_withdrawn_by_a_sync() {
        let t0 = Instant::now();
        let mut s = ready(pacing(100, 10_000), t0);
        s.queue();
        s.start(t0);
        s.finish(t0, true);
        s.recheck_at(Some(t0 + 20 * MS));
        assert_eq!(s.next_run(), Some(t0 + 100 * MS), "not before the window");
        s.recheck_at(Some(t0 + 2000 * MS));
        assert_eq!(s.next_run(), Some(t0 + 2000 * MS));
        s.start(t0 + 2000 * MS);
        assert_eq!(s.next_run(), Some(t0 + 10_000 * MS));
    }

    #[test]
    fn the_periodic_resync_also_waits_for_the_window() {
        let t0 = Instant::now();
        let mut s = ready(pacing(500, 1000), t0);
        s.queue();
        s.start(t0 + 900 * MS);
        s.finish(t0 + 900 * MS, true);
        assert_eq!(s.next_run(), Some(t0 + 1400 * MS));
        assert_eq!(s.start(t0 + 1400 * MS), Run { full: true });
    }
}
