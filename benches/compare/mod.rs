//! How the end-to-end benches compare variants that GET over real connections: 64 in
//! flight, interleaved rounds and their ratios to the first variant (raw redis-rs), and
//! the latency of one request at a time with its overhead over the first variant.

use std::future::Future;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use futures::future::join_all;
use tokio::runtime::{Builder, Runtime};

pub const IN_FLIGHT: usize = 64;
const PER_WORKER: usize = 20;
const BATCH: usize = IN_FLIGHT * PER_WORKER;

/// A way of making GETs, on connections of its own. The first variant of a list is the
/// one the others are measured against.
pub trait Contender: Clone {
    fn name(&self) -> &'static str;

    /// One GET, by the `worker`-th of the callers (a bench that spreads its keys gives
    /// each worker its own).
    fn get(&mut self, worker: usize) -> impl Future<Output = ()>;
}

/// `BATCH` GETs with `IN_FLIGHT` outstanding at any time: each of `IN_FLIGHT` workers
/// makes `PER_WORKER`, one after another.
async fn batch<V: Contender>(variant: &V) {
    join_all((0..IN_FLIGHT).map(|worker| {
        let mut variant = variant.clone();
        async move {
            for _ in 0..PER_WORKER {
                variant.get(worker).await;
            }
        }
    }))
    .await;
}

/// Whether only criterion's numbers are asked for (`BENCH_CRITERION_ONLY=1`, e.g. to
/// profile one variant with `--profile-time`), without the rounds.
pub fn criterion_only() -> bool {
    std::env::var_os("BENCH_CRITERION_ONLY").is_some()
}

/// Criterion's numbers for each of `variants` (group `group/flavour`), then, unless
/// [`criterion_only`], the interleaved rounds ([`print_ratios`]) and one request at a
/// time ([`print_latency`], on new variants from `make`).
pub fn run<V, F>(
    c: &mut Criterion,
    group: &str,
    flavour: &str,
    rt: &Runtime,
    variants: &[V],
    make: impl Fn(usize) -> F,
) where
    V: Contender,
    F: Future<Output = Vec<V>>,
{
    let mut measured = c.benchmark_group(format!("{group}/{flavour}"));
    measured.throughput(Throughput::Elements(BATCH as u64));
    measured
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    for variant in variants {
        measured.bench_function(variant.name(), |b| {
            b.to_async(rt).iter(|| batch(variant));
        });
    }
    measured.finish();
    if !criterion_only() {
        print_ratios(flavour, rt, variants);
        print_latency(flavour, rt, make);
    }
}

pub fn runtimes() -> Vec<(&'static str, Runtime)> {
    vec![
        (
            "current_thread",
            Builder::new_current_thread().enable_all().build().unwrap(),
        ),
        (
            "multi_thread(2)",
            Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        ),
    ]
}

/// One GET at a time: p50 and p99 of each variant, and its overhead over the first.
///
/// The variants take turns in blocks of `BLOCK` calls (so drift hits them alike), and
/// work a call leaves behind for the runtime (a timer to cancel, a task to wake) lands
/// in its own variant's block, not in the next variant's first call. The calls are made
/// in sessions, each on new connections (`make(session)`, which should open them in an
/// order that rotates with `session`), since two identical clients on two connections
/// can land a microsecond apart for as long as the connections live. A variant's
/// overhead is the median over sessions of its p50 minus the first variant's p50 in the
/// same session, with the smallest and largest session's.
fn print_latency<V, F>(flavour: &str, rt: &Runtime, make: impl Fn(usize) -> F)
where
    V: Contender,
    F: Future<Output = Vec<V>>,
{
    const SESSIONS: usize = 7;
    const BLOCK: usize = 20;
    const ROUNDS: usize = 100;
    let mut all: Vec<Vec<Duration>> = Vec::new();
    let mut session_overheads: Vec<Vec<f64>> = Vec::new();
    let mut names = Vec::new();
    for session in 0..SESSIONS {
        let mut variants = rt.block_on(make(session));
        let n = variants.len();
        names = variants.iter().map(V::name).collect();
        all.resize(n, Vec::new());
        session_overheads.resize(n, Vec::new());
        let mut samples: Vec<Vec<Duration>> =
            (0..n).map(|_| Vec::with_capacity(BLOCK * ROUNDS)).collect();
        rt.block_on(async {
            for round in 0..ROUNDS {
                for turn in 0..n {
                    let i = (round + turn) % n;
                    for _ in 0..BLOCK {
                        let started = Instant::now();
                        variants[i].get(0).await;
                        samples[i].push(started.elapsed());
                    }
                }
            }
        });
        let p50s: Vec<f64> = samples
            .iter_mut()
            .map(|own| {
                own.sort_unstable();
                own[own.len() / 2].as_secs_f64() * 1e6
            })
            .collect();
        for (i, own) in samples.iter().enumerate() {
            session_overheads[i].push(p50s[i] - p50s[0]);
            all[i].extend_from_slice(own);
        }
    }
    let quantile = |v: &[Duration], q: f64| v[((v.len() - 1) as f64 * q) as usize];
    println!(
        "\nGET, 1 in flight, {flavour}: {SESSIONS} sessions on new connections, {} calls \
         each per session, in blocks of {BLOCK} taking turns (overhead: median over \
         sessions of p50 - {}'s p50 [smallest, largest session])",
        BLOCK * ROUNDS,
        names[0],
    );
    for ((name, own), overheads) in names.iter().zip(&mut all).zip(&mut session_overheads) {
        own.sort_unstable();
        overheads.sort_by(f64::total_cmp);
        println!(
            "  {:<36} p50 {:>7.1?}  p99 {:>7.1?}  overhead {:>+6.2} µs [{:+.2}, {:+.2}]",
            name,
            quantile(own, 0.5),
            quantile(own, 0.99),
            overheads[overheads.len() / 2],
            overheads[0],
            overheads[overheads.len() - 1],
        );
    }
}

/// Interleaves the variants round by round (so drift hits them alike; the order rotates
/// every round) and prints the median throughput of each, and its ratio to the first:
/// the median of its ratios to the first in the same round, with a 95% interval.
fn print_ratios<V: Contender>(flavour: &str, rt: &Runtime, variants: &[V]) {
    const ROUNDS: usize = 31;
    let steal_before = cpu_steal();
    const BATCHES_PER_ROUND: usize = 10;
    let n = variants.len();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); n];
    for round in 0..ROUNDS {
        for turn in 0..n {
            let i = (round + turn) % n;
            let started = Instant::now();
            rt.block_on(async {
                for _ in 0..BATCHES_PER_ROUND {
                    batch(&variants[i]).await;
                }
            });
            rates[i].push((BATCH * BATCHES_PER_ROUND) as f64 / started.elapsed().as_secs_f64());
        }
    }
    println!(
        "\nGET, {IN_FLIGHT} in flight, {flavour}: {ROUNDS} interleaved rounds \
         (ratio: median of same-round ratios to {}, 95% interval)",
        variants[0].name(),
    );
    if let (Some((s0, t0)), Some((s1, t1))) = (steal_before, cpu_steal()) {
        // Time the hypervisor gave to others: above a few percent the ratios are noise.
        println!(
            "  cpu steal during the rounds: {:.1}%",
            100.0 * (s1 - s0) as f64 / (t1 - t0).max(1) as f64
        );
    }
    for (variant, own) in variants.iter().zip(&rates) {
        let mut ratios: Vec<f64> = own.iter().zip(&rates[0]).map(|(o, r)| o / r).collect();
        let (ratio, low, high) = median_with_interval(&mut ratios);
        let (rate, _, _) = median_with_interval(&mut own.clone());
        println!(
            "  {:<36} {:>9.0} GET/s   ratio {ratio:.3} [{low:.3}, {high:.3}]",
            variant.name(),
            rate,
        );
    }
}

/// The median of `values` and a 95% confidence interval for it, from the order
/// statistics (distribution-free: no assumption about the shape of the noise).
fn median_with_interval(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let half_width = 0.98 * (n as f64).sqrt();
    let low = ((n as f64 / 2.0 - half_width).floor().max(0.0)) as usize;
    let high = ((n as f64 / 2.0 + half_width).ceil() as usize).min(n - 1);
    (values[n / 2], values[low], values[high])
}

/// (steal, total) jiffies from /proc/stat, where there is one.
fn cpu_steal() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    Some((*fields.get(7)?, fields.iter().take(8).sum()))
}
