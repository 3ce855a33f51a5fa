//! End-to-end GET against a spawned redis-server, in the same run: raw redis-rs
//! `MultiplexedConnection` and `ConnectionManager`, our leaf `RedisService`, `Client`
//! over it (redis-rs's `AsyncCommands` through the tower stack), layers stacked by hand,
//! and the assembled `ResilientClient` with its default stack.
//!
//! `cargo bench --bench end_to_end` prints criterion's numbers for each variant with 64
//! requests in flight on a current-thread and a 2-worker runtime, then interleaved rounds
//! with the throughput ratios to raw redis-rs, then the latency of one request at a time
//! (p50, p99 and the overhead over raw redis-rs). The variants take turns in an order that
//! rotates every round; a ratio or an overhead is the median of a variant's same-round
//! ratios to (or differences from) raw redis-rs, with a distribution-free 95% interval.
//! Raw redis-rs runs a second time on a connection of its own: how far it lands from the
//! first is the offset two identical clients on two connections show, which the interval
//! does not include. `BENCH_CRITERION_ONLY=1` skips the rounds, e.g. to profile one
//! variant with `--profile-time`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;
use redis::{
    AsyncCommands, AsyncConnectionConfig,
    aio::{ConnectionManager, MultiplexedConnection},
};
use support::RedisServer;
use tokio::runtime::{Builder, Runtime};
use tower::Layer;
use tower::{Service, ServiceExt};
use tower_redis_resilience::{
    Client, Connector, RedisService, Request, ResilientClient,
    circuit_breaker::{CircuitBreaker, CircuitBreakerLayer},
    reconnect::{Reconnect, ReconnectConfig},
    retry::{Retry, RetryLayer},
};

const IN_FLIGHT: usize = 64;
const PER_WORKER: usize = 20;
const BATCH: usize = IN_FLIGHT * PER_WORKER;

#[derive(Clone)]
enum Variant {
    Raw(MultiplexedConnection),
    Manager(ConnectionManager),
    Leaf(RedisService),
    Client(Client<RedisService>),
    RetryReconnect(Retry<Reconnect>),
    BreakerRetryReconnect(CircuitBreaker<Retry<Reconnect>>),
    Resilient(ResilientClient),
    ResilientService(ResilientClient),
    /// Raw redis-rs again, last in each round: how far apart two runs of the same code
    /// land, the noise the other ratios carry.
    RawAgain(MultiplexedConnection),
}

impl Variant {
    fn name(&self) -> &'static str {
        match self {
            Variant::Raw(_) => "raw redis-rs MultiplexedConnection",
            Variant::Manager(_) => "redis-rs ConnectionManager",
            Variant::Leaf(_) => "RedisService",
            Variant::Client(_) => "Client<RedisService>",
            Variant::RetryReconnect(_) => "Retry<Reconnect>",
            Variant::BreakerRetryReconnect(_) => "CircuitBreaker<Retry<Reconnect>>",
            Variant::Resilient(_) => "ResilientClient (AsyncCommands)",
            Variant::ResilientService(_) => "ResilientClient (tower Service)",
            Variant::RawAgain(_) => "raw redis-rs again (noise control)",
        }
    }

    /// One worker: `PER_WORKER` GETs, one after another.
    async fn worker(mut self) {
        for _ in 0..PER_WORKER {
            self.get().await;
        }
    }

    async fn get(&mut self) {
        let value: Option<Vec<u8>> = match self {
            Variant::Raw(conn) | Variant::RawAgain(conn) => conn.get("bench:key").await.unwrap(),
            Variant::Manager(conn) => conn.get("bench:key").await.unwrap(),
            Variant::Leaf(service) => get_through(service).await,
            Variant::Client(client) => client.get("bench:key").await.unwrap(),
            Variant::RetryReconnect(service) => get_through(service).await,
            Variant::BreakerRetryReconnect(service) => get_through(service).await,
            Variant::Resilient(client) => client.get("bench:key").await.unwrap(),
            Variant::ResilientService(service) => get_through(service).await,
        };
        assert!(value.is_some());
    }

    /// `BATCH` GETs with `IN_FLIGHT` outstanding at any time.
    async fn batch(&self) {
        join_all((0..IN_FLIGHT).map(|_| self.clone().worker())).await;
    }
}

/// `GET bench:key` through a tower stack of this crate.
async fn get_through<S>(service: &mut S) -> Option<Vec<u8>>
where
    S: Service<Request, Response = redis::Value, Error = tower_redis_resilience::Error>,
{
    let reply = service
        .ready()
        .await
        .unwrap()
        .call(get_request())
        .await
        .unwrap();
    redis::from_redis_value(reply).unwrap()
}

/// `GET bench:key`, built the way redis-rs builds it for `query_async`: no clone.
fn get_request() -> Request {
    let mut cmd = redis::cmd("GET");
    cmd.arg("bench:key");
    Request::from(cmd)
}

async fn variants(url: &str) -> Vec<Variant> {
    let client = redis::Client::open(url).unwrap();
    // Same work as our leaf: no per-request response timer.
    let config = AsyncConnectionConfig::new().set_response_timeout(None);
    let raw = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let mut seed = raw.clone();
    let () = seed.set("bench:key", vec![b'v'; 64]).await.unwrap();
    // As users get it: its default 500 ms response timeout included.
    let manager = ConnectionManager::new(client.clone()).await.unwrap();
    let resilient = || async { ResilientClient::builder(url).connect().await.unwrap() };
    vec![
        Variant::Raw(raw),
        Variant::Manager(manager),
        Variant::Leaf(RedisService::connect(url).await.unwrap()),
        Variant::Client(Client::new(RedisService::connect(url).await.unwrap())),
        Variant::RetryReconnect(RetryLayer::default().layer(reconnect(url).await)),
        Variant::BreakerRetryReconnect(
            CircuitBreakerLayer::default().layer(RetryLayer::default().layer(reconnect(url).await)),
        ),
        Variant::Resilient(resilient().await),
        Variant::ResilientService(resilient().await),
        // Its own connection, as every other variant has: one sharing raw redis-rs's
        // would run right after it on a warm connection in every round, and be told
        // apart from it by that alone.
        Variant::RawAgain(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .unwrap(),
        ),
    ]
}

async fn reconnect(url: &str) -> Reconnect {
    Reconnect::connect(Connector::from_url(url).unwrap(), ReconnectConfig::new())
        .await
        .unwrap()
}

fn runtimes() -> Vec<(&'static str, Runtime)> {
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

fn bench(c: &mut Criterion) {
    let server = RedisServer::start();
    for (flavour, rt) in runtimes() {
        let variants = rt.block_on(variants(&server.url()));
        let mut group = c.benchmark_group(format!("get_64_in_flight/{flavour}"));
        group.throughput(Throughput::Elements(BATCH as u64));
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(4));
        for variant in &variants {
            group.bench_function(variant.name(), |b| {
                b.to_async(&rt).iter(|| variant.batch());
            });
        }
        group.finish();
        if std::env::var_os("BENCH_CRITERION_ONLY").is_none() {
            print_ratios(flavour, &rt, &variants);
            print_latency(flavour, &rt, &variants);
        }
    }
}

/// One GET at a time, the variants taking turns call by call (so drift hits them alike;
/// the order rotates every round, so none always follows the same neighbour); then p50
/// and p99 of each, and its overhead over raw redis-rs: the median of the differences
/// between its call and raw redis-rs's call of the same round, with a 95% interval.
fn print_latency(flavour: &str, rt: &Runtime, variants: &[Variant]) {
    const CALLS: usize = 10_000;
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(CALLS); variants.len()];
    let mut variants = variants.to_vec();
    let n = variants.len();
    rt.block_on(async {
        for round in 0..CALLS {
            for turn in 0..n {
                let i = (round + turn) % n;
                let started = Instant::now();
                variants[i].get().await;
                samples[i].push(started.elapsed());
            }
        }
    });
    let quantile = |v: &[Duration], q: f64| v[((v.len() - 1) as f64 * q) as usize];
    println!(
        "\nGET, 1 in flight, {flavour}: {CALLS} calls each, taking turns \
         (overhead: median of same-round differences to raw redis-rs, 95% interval)"
    );
    for (variant, own) in variants.iter().zip(&samples) {
        let mut differences: Vec<f64> = own
            .iter()
            .zip(&samples[0])
            .map(|(ours, raw)| (ours.as_secs_f64() - raw.as_secs_f64()) * 1e6)
            .collect();
        let (overhead, low, high) = median_with_interval(&mut differences);
        let mut sorted = own.clone();
        sorted.sort_unstable();
        println!(
            "  {:<36} p50 {:>7.1?}  p99 {:>7.1?}  overhead {:>+6.2} µs [{:+.2}, {:+.2}]",
            variant.name(),
            quantile(&sorted, 0.5),
            quantile(&sorted, 0.99),
            overhead,
            low,
            high,
        );
    }
}

/// Interleaves the variants round by round (so drift hits them alike; the order rotates
/// every round) and prints the median throughput of each, and its ratio to raw redis-rs:
/// the median of its ratios to raw redis-rs in the same round, with a 95% interval.
fn print_ratios(flavour: &str, rt: &Runtime, variants: &[Variant]) {
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
                    variants[i].batch().await;
                }
            });
            rates[i].push((BATCH * BATCHES_PER_ROUND) as f64 / started.elapsed().as_secs_f64());
        }
    }
    println!(
        "\nGET, {IN_FLIGHT} in flight, {flavour}: {ROUNDS} interleaved rounds \
         (ratio: median of same-round ratios to raw redis-rs, 95% interval)"
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
            "  {:<36} {:>9.0} GET/s   ratio to raw {ratio:.3} [{low:.3}, {high:.3}]",
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

criterion_group!(benches, bench);
criterion_main!(benches);
