//! The built-in store: per command name and outcome, a count and a latency histogram in
//! atomics, and snapshots of it.

use std::{
    fmt,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use crate::{
    Error,
    sync::{Lease, Leased, SHARDS, shard},
};

/// How a call through the [metrics layer](super::MetricsLayer) ended. Each is a label
/// value in the snapshot and, with the `metrics` feature, in the `error.type` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Outcome {
    /// Redis answered (a pipeline whose commands failed one by one is still `Ok`).
    Ok,
    /// Redis answered with an error (`WRONGTYPE`...): [`Error::is_server`].
    ServerError,
    /// The deadline passed: [`Error::is_timeout`].
    Timeout,
    /// Redis could not serve: [`Error::is_unavailable`].
    Unavailable,
    /// A breaker rejected the call: [`Error::is_circuit_open`].
    CircuitOpen,
    /// Wrong configuration or credentials: [`Error::is_config`].
    ConfigError,
    /// The caller dropped the call before it finished (an outer timeout gave up).
    Cancelled,
    /// A [fallback layer](crate::fallback::FallbackLayer) answered for a call that failed
    /// (already counted under its failure): not a call of its own.
    Fallback,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::ServerError,
        Outcome::Timeout,
        Outcome::Unavailable,
        Outcome::CircuitOpen,
        Outcome::ConfigError,
        Outcome::Cancelled,
        Outcome::Fallback,
    ];

    /// The label value: `"ok"`, `"server_error"`, `"timeout"`, `"unavailable"`,
    /// `"circuit_open"`, `"config_error"`, `"cancelled"`, `"fallback"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ServerError => "server_error",
            Outcome::Timeout => "timeout",
            Outcome::Unavailable => "unavailable",
            Outcome::CircuitOpen => "circuit_open",
            Outcome::ConfigError => "config_error",
            Outcome::Cancelled => "cancelled",
            Outcome::Fallback => "fallback",
        }
    }

    /// The outcome of a finished call.
    pub fn of<T>(result: &Result<T, Error>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            Err(err) if err.is_server() => Outcome::ServerError,
            Err(err) if err.is_timeout() => Outcome::Timeout,
            Err(err) if err.is_circuit_open() => Outcome::CircuitOpen,
            Err(err) if err.is_config() => Outcome::ConfigError,
            Err(_) => Outcome::Unavailable,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcomes that are calls, each with a histogram; `Fallback` is only counted.
pub(super) const TIMED: usize = 7;

/// Sub-buckets per power of two: the width of a bucket is 1/8 of its lower bound, so a
/// quantile is within 12.5 % above the true value.
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Below 2^10 ns (~1 µs) everything shares bucket 0; above 2^37 ns (~137 s) the last.
const MIN_EXP: u32 = 10;
const MAX_EXP: u32 = 37;
const BUCKETS: usize = 1 + (MAX_EXP - MIN_EXP + 1) as usize * SUB;

fn bucket_of(nanos: u64) -> usize {
    if nanos < 1 << MIN_EXP {
        return 0;
    }
    let exp = 63 - nanos.leading_zeros();
    if exp > MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = (nanos >> (exp - SUB_BITS)) as usize & (SUB - 1);
    1 + (exp - MIN_EXP) as usize * SUB + sub
}

/// The largest latency bucket `index` holds.
fn upper_bound(index: usize) -> u64 {
    if index == 0 {
        return (1 << MIN_EXP) - 1;
    }
    let exp = MIN_EXP + ((index - 1) / SUB) as u32;
    let sub = ((index - 1) % SUB) as u64;
    ((SUB as u64 + sub + 1) << (exp - SUB_BITS)) - 1
}

/// A lock-free latency histogram in nanoseconds.
struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum: AtomicU64,
    max: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    #[inline]
    fn record(&self, nanos: u64) {
        self.buckets[bucket_of(nanos)].fetch_add(1, Relaxed);
        self.sum.fetch_add(nanos, Relaxed);
        // Most samples are not a new maximum: read before writing.
        if nanos > self.max.load(Relaxed) {
            self.max.fetch_max(nanos, Relaxed);
        }
    }

    /// Adds this histogram to `into`; answers how many samples it held.
    fn add_to(&self, into: &mut Counts) -> u64 {
        let mut samples = 0;
        for (total, bucket) in into.buckets.iter_mut().zip(&self.buckets) {
            let n = bucket.load(Relaxed);
            *total += n;
            samples += n;
        }
        into.sum = into.sum.saturating_add(self.sum.load(Relaxed));
        into.max = into.max.max(self.max.load(Relaxed));
        samples
    }
}

/// Plain (non-atomic) histogram counts, for merging and reading quantiles.
struct Counts {
    buckets: [u64; BUCKETS],
    sum: u64,
    max: u64,
}

impl Counts {
    fn new() -> Self {
        Counts {
            buckets: [0; BUCKETS],
            sum: 0,
            max: 0,
        }
    }

    fn merge(&mut self, other: &Counts) {
        for (total, n) in self.buckets.iter_mut().zip(other.buckets) {
            *total += n;
        }
        self.sum = self.sum.saturating_add(other.sum);
        self.max = self.max.max(other.max);
    }

    fn summary(&self) -> Latency {
        let count: u64 = self.buckets.iter().sum();
        let quantile = |q: f64| -> Duration {
            if count == 0 {
                return Duration::ZERO;
            }
            let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
            let mut seen = 0;
            for (index, n) in self.buckets.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return Duration::from_nanos(upper_bound(index).min(self.max));
                }
            }
            Duration::from_nanos(self.max)
        };
        Latency {
            count,
            mean: Duration::from_nanos(self.sum.checked_div(count).unwrap_or(0)),
            p50: quantile(0.50),
            p90: quantile(0.90),
            p99: quantile(0.99),
            max: Duration::from_nanos(self.max),
        }
    }
}

/// Everything recorded for one command name.
pub(super) struct CommandStats {
    name: &'static str,
    timed: [Histogram; TIMED],
    /// Further histograms of `ok`, one per thread shard but the first (which records in
    /// `timed`), made when a thread of that shard first records: threads that answer at
    /// once would otherwise all write the same counters' cache lines on every call.
    ok_stripes: [OnceLock<Box<Histogram>>; SHARDS - 1],
    fallbacks: AtomicU64,
    #[cfg(feature = "metrics")]
    facade: super::facade::Handles,
}

impl CommandStats {
    fn new(name: &'static str) -> Self {
        CommandStats {
            name,
            timed: std::array::from_fn(|_| Histogram::new()),
            ok_stripes: std::array::from_fn(|_| OnceLock::new()),
            fallbacks: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            facade: super::facade::Handles::default(),
        }
    }

    #[inline]
    pub(super) fn record(&self, outcome: Outcome, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        match outcome {
            Outcome::Fallback => {
                self.fallbacks.fetch_add(1, Relaxed);
            }
            Outcome::Ok => match shard().checked_sub(1) {
                Some(stripe) => self.ok_stripes[stripe]
                    .get_or_init(|| Box::new(Histogram::new()))
                    .record(nanos),
                None => self.timed[Outcome::Ok as usize].record(nanos),
            },
            timed => self.timed[timed as usize].record(nanos),
        }
        #[cfg(feature = "metrics")]
        self.facade.record(self.name, outcome, latency);
    }
}

/// More than the names a request can have (~470: commands and subcommands of the table,
/// `PIPELINE`, `MULTI`, `UNKNOWN`), so the table never fills. Only the commands a client
/// sends take a slot, a few dozen at most in practice, so probes stay short.
const SLOTS: usize = 1024;

/// The built-in metrics store that [`MetricsLayer`](super::MetricsLayer) records into and
/// that [`snapshot`](Registry::snapshot) reads, e.g. in a health endpoint.
///
/// Lock-free: a command's stats are found by hashing its name into a fixed table (names
/// are a bounded set) and allocated the first time that command is seen (~13 KiB each,
/// and ~2 KiB more for each further thread that records successes of it);
/// recording is four atomic operations. Cloning shares the store.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_resilience::metrics::{Outcome, Registry};
///
/// let registry = Registry::new();
/// registry.record("GET", Outcome::Ok, Duration::from_micros(80));
/// registry.record("GET", Outcome::Timeout, Duration::from_millis(250));
///
/// let snapshot = registry.snapshot();
/// let get = snapshot.command("GET").unwrap();
/// assert_eq!(get.count(Outcome::Ok), 1);
/// assert_eq!(get.calls(), 2);
/// assert!(get.latency.max >= Duration::from_millis(250));
/// ```
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Leased<Inner>>,
}

/// The stats, which each call's recorder leases.
pub(super) struct Inner {
    slots: Box<[OnceLock<Box<CommandStats>>]>,
}

impl Inner {
    #[inline]
    pub(super) fn stats(&self, slot: u16) -> Option<&CommandStats> {
        self.slots.get(usize::from(slot))?.get().map(|b| &**b)
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// An empty store.
    pub fn new() -> Self {
        Registry {
            inner: Arc::new(Leased::new(Inner {
                slots: (0..SLOTS).map(|_| OnceLock::new()).collect(),
            })),
        }
    }

    /// The slot of `name`'s stats, created on first use.
    #[inline]
    pub(super) fn slot(&self, name: &'static str) -> Option<u16> {
        let mask = SLOTS - 1;
        let start = fnv1a(name.as_bytes()) as usize & mask;
        for probe in 0..SLOTS {
            let index = (start + probe) & mask;
            let stats = self.inner.slots[index].get_or_init(|| Box::new(CommandStats::new(name)));
            // Names from the command table are the same static: their address says it.
            if std::ptr::eq(stats.name, name) || stats.name == name {
                return u16::try_from(index).ok();
            }
        }
        None
    }

    #[inline]
    pub(super) fn stats(&self, slot: u16) -> Option<&CommandStats> {
        self.inner.stats(slot)
    }

    /// The stats, for one call to record into when it ends.
    #[inline]
    pub(super) fn lease(&self) -> Lease<Inner> {
        self.inner.lease()
    }

    /// Records one call of `command` (a canonical name such as
    /// [`CommandInfo::name`](crate::CommandInfo::name) gives) by hand, for layers of
    /// your own. The [metrics layer](super::MetricsLayer) and the
    /// [fallback layer](crate::fallback::FallbackLayer) call it for you.
    pub fn record(&self, command: &'static str, outcome: Outcome, latency: Duration) {
        if let Some(stats) = self.slot(command).and_then(|slot| self.stats(slot)) {
            stats.record(outcome, latency);
        }
    }

    /// Reads every count and histogram: per command, sorted by name, and overall.
    /// Counts are read one by one while calls go on, so they are exact only when no
    /// call is in flight.
    pub fn snapshot(&self) -> Snapshot {
        let mut commands = Vec::new();
        let mut overall = Counts::new();
        let mut overall_counts = [0u64; Outcome::ALL.len()];
        for stats in self.inner.slots.iter().filter_map(OnceLock::get) {
            let mut merged = Counts::new();
            let mut counts = [0u64; Outcome::ALL.len()];
            for (count, histogram) in counts.iter_mut().zip(&stats.timed) {
                *count = histogram.add_to(&mut merged);
            }
            for stripe in stats.ok_stripes.iter().filter_map(OnceLock::get) {
                counts[Outcome::Ok as usize] += stripe.add_to(&mut merged);
            }
            counts[Outcome::Fallback as usize] = stats.fallbacks.load(Relaxed);
            for (total, n) in overall_counts.iter_mut().zip(counts) {
                *total += n;
            }
            overall.merge(&merged);
            commands.push(CommandMetrics {
                name: stats.name,
                counts,
                latency: merged.summary(),
            });
        }
        commands.sort_by_key(|command| command.name);
        Snapshot {
            overall: CommandMetrics {
                name: "ALL",
                counts: overall_counts,
                latency: overall.summary(),
            },
            commands,
        }
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let commands: Vec<_> = self
            .inner
            .slots
            .iter()
            .filter_map(|slot| slot.get().map(|stats| stats.name))
            .collect();
        f.debug_struct("Registry")
            .field("commands", &commands)
            .finish()
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in bytes {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// What a [`Registry`] held when [`snapshot`](Registry::snapshot) read it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Every command seen, sorted by name.
    pub commands: Vec<CommandMetrics>,
    /// All commands together (named `"ALL"`).
    pub overall: CommandMetrics,
}

impl Snapshot {
    /// The metrics of one command, by canonical name (`"GET"`, `"PIPELINE"`).
    pub fn command(&self, name: &str) -> Option<&CommandMetrics> {
        self.commands.iter().find(|command| command.name == name)
    }
}

/// Counts per outcome and latency quantiles of one command (or of all).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CommandMetrics {
    /// The canonical command name.
    pub name: &'static str,
    counts: [u64; Outcome::ALL.len()],
    /// Latency of every call (every outcome but `Fallback`), from entering the metrics
    /// layer to its answer or its cancellation.
    pub latency: Latency,
}

impl CommandMetrics {
    /// How many calls ended with `outcome` (for `Fallback`: how many failed calls a
    /// fallback answered).
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.counts[outcome as usize]
    }

    /// Calls made: the sum over every outcome but `Fallback`.
    pub fn calls(&self) -> u64 {
        self.counts[..TIMED].iter().sum()
    }

    /// `(outcome, count)` for every outcome, zeros included.
    pub fn counts(&self) -> impl Iterator<Item = (Outcome, u64)> + '_ {
        Outcome::ALL.into_iter().zip(self.counts)
    }
}

/// Latency quantiles. Quantiles are bucket upper bounds (at most 12.5 % above the true
/// value, never above `max`); `max` and `mean` are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Mean.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "mean_ms", with = "crate::client::millis")
    )]
    pub mean: Duration,
    /// Median.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "p50_ms", with = "crate::client::millis")
    )]
    pub p50: Duration,
    /// 90th percentile.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "p90_ms", with = "crate::client::millis")
    )]
    pub p90: Duration,
    /// 99th percentile.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "p99_ms", with = "crate::client::millis")
    )]
    pub p99: Duration,
    /// Slowest.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "max_ms", with = "crate::client::millis")
    )]
    pub max: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order_and_bound_it_within_an_eighth() {
        let mut previous = 0;
        for nanos in (0..1u64 << 20)
            .step_by(7)
            .chain((20..64).flat_map(|e| [1u64 << e, (1u64 << e) + 12345, (1 << e) - 1]))
        {
            let index = bucket_of(nanos);
            assert!(index < BUCKETS);
            if nanos < 1 << 20 {
                assert!(index >= previous, "monotonic at {nanos}");
                previous = index;
            }
            if index < BUCKETS - 1 {
                let upper = upper_bound(index);
                assert!(upper >= nanos, "{nanos} above its bucket's bound {upper}");
                if nanos >= 1 << MIN_EXP {
                    assert!(
                        upper - nanos <= nanos / 8,
                        "{nanos}: bound {upper} too loose"
                    );
                }
                assert_eq!(bucket_of(upper), index);
                assert_eq!(bucket_of(upper + 1), index + 1);
            }
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let registry = Registry::new();
        // 1..=100 ms: p50 = 50 ms, p90 = 90 ms, p99 = 99 ms, within a bucket.
        for ms in 1..=100u64 {
            registry.record("GET", Outcome::Ok, Duration::from_millis(ms));
        }
        let latency = registry.snapshot().command("GET").unwrap().latency;
        assert_eq!(latency.count, 100);
        assert_eq!(latency.max, Duration::from_millis(100));
        assert_eq!(latency.mean, Duration::from_micros(50_500));
        for (quantile, ms) in [(latency.p50, 50), (latency.p90, 90), (latency.p99, 99)] {
            let exact = Duration::from_millis(ms);
            assert!(
                quantile >= exact && quantile <= exact + exact / 8,
                "{quantile:?} vs {exact:?}"
            );
        }
    }

    #[test]
    fn snapshot_counts_each_outcome_per_command_and_overall() {
        let registry = Registry::new();
        let ms = Duration::from_millis(1);
        for outcome in Outcome::ALL {
            for _ in 0..(outcome as u64 + 1) {
                registry.record("GET", outcome, ms);
            }
        }
        registry.record("SET", Outcome::Ok, ms);
        registry.record("PIPELINE", Outcome::Timeout, ms);
        let snapshot = registry.snapshot();
        let names: Vec<_> = snapshot.commands.iter().map(|c| c.name).collect();
        assert_eq!(names, ["GET", "PIPELINE", "SET"]);
        let get = snapshot.command("GET").unwrap();
        for outcome in Outcome::ALL {
            assert_eq!(get.count(outcome), outcome as u64 + 1, "{outcome}");
        }
        assert_eq!(get.calls(), (1..=7).sum::<u64>());
        assert_eq!(get.latency.count, get.calls(), "fallbacks are not calls");
        assert_eq!(snapshot.overall.calls(), get.calls() + 2);
        assert_eq!(snapshot.overall.count(Outcome::Fallback), 8);
    }

    #[test]
    fn many_threads_recording_lose_nothing() {
        let registry = Registry::new();
        let names = ["GET", "SET", "MGET", "HGET"];
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let registry = registry.clone();
                scope.spawn(move || {
                    for i in 0..10_000u64 {
                        let name = names[(i as usize + thread) % names.len()];
                        registry.record(name, Outcome::Ok, Duration::from_nanos(i * 1000));
                    }
                });
            }
        });
        let snapshot = registry.snapshot();
        assert_eq!(snapshot.overall.count(Outcome::Ok), 40_000);
        for name in names {
            assert_eq!(snapshot.command(name).unwrap().calls(), 10_000);
        }
    }
}
