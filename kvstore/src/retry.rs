//! The mesh's one retry policy: jittered exponential backoff between a
//! minimum and a maximum delay, forever, that starts over once the retried
//! work made progress (kube-runtime's `ResetTimerBackoff` does the same
//! after a quiet period). Every reconnect and retry loop of the mesh uses
//! it, so they all behave alike: a flapping peer is retried quickly after
//! each success and ever more slowly while it stays down.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// See the module docs.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    current: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Delays from `min` (jittered) doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Self {
            current: builder.build(),
            builder,
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.current.next().unwrap_or(self.max).min(self.max)
    }

    /// The work made progress: the next failure waits the minimum again.
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }

    /// Sleeps [`Backoff::next_delay`] and returns how long.
    pub async fn wait(&mut self) -> Duration {
        let delay = self.next_delay();
        tokio::time::sleep(delay).await;
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_maximum_and_start_over_after_a_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(min, max);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= min && *d <= max), "{delays:?}");
        assert_eq!(
            *delays.last().unwrap(),
            max,
            "capped, and never ends: {delays:?}"
        );
        b.reset();
        assert!(
            b.next_delay() < Duration::from_millis(250),
            "starts over near the minimum"
        );
    }
}
