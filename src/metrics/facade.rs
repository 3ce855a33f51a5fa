//! Recording through the `metrics` facade, under OpenTelemetry's database client names.

use std::{sync::OnceLock, time::Duration};

use super::{Outcome, registry::TIMED};

/// OpenTelemetry's database client operation duration, in seconds.
pub(super) const DURATION: &str = "db.client.operation.duration";
/// Failed calls a fallback answered (ours: OpenTelemetry defines none).
pub(super) const FALLBACKS: &str = "redis.client.fallbacks";

/// The facade's handles for one command, registered on first use so a call does not
/// look its series up again.
#[derive(Default)]
pub(super) struct Handles {
    timed: [OnceLock<metrics::Histogram>; TIMED],
    fallbacks: OnceLock<metrics::Counter>,
}

impl Handles {
    #[inline]
    pub(super) fn record(&self, command: &'static str, outcome: Outcome, latency: Duration) {
        match outcome {
            Outcome::Fallback => self
                .fallbacks
                .get_or_init(|| {
                    describe();
                    metrics::counter!(
                        FALLBACKS,
                        "db.system.name" => "redis",
                        "db.operation.name" => command,
                    )
                })
                .increment(1),
            timed => self.timed[timed as usize]
                .get_or_init(|| {
                    describe();
                    histogram(command, timed)
                })
                .record(latency.as_secs_f64()),
        }
    }
}

fn histogram(command: &'static str, outcome: Outcome) -> metrics::Histogram {
    // Successful operations carry no `error.type`, as OpenTelemetry asks.
    if outcome == Outcome::Ok {
        metrics::histogram!(
            DURATION,
            "db.system.name" => "redis",
            "db.operation.name" => command,
        )
    } else {
        metrics::histogram!(
            DURATION,
            "db.system.name" => "redis",
            "db.operation.name" => command,
            "error.type" => outcome.as_str(),
        )
    }
}

fn describe() {
    static DESCRIBED: OnceLock<()> = OnceLock::new();
    DESCRIBED.get_or_init(|| {
        metrics::describe_histogram!(
            DURATION,
            metrics::Unit::Seconds,
            "Duration of Redis operations, from entering the stack to the answer"
        );
        metrics::describe_counter!(
            FALLBACKS,
            "Failed Redis operations answered by a fallback value"
        );
    });
}
