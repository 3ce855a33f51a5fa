//! End-to-end GET against a spawned redis-server, in the same run: raw redis-rs
//! `MultiplexedConnection` (without a response timeout, as our leaf, and with its default
//! 500 ms one) and `ConnectionManager`, our leaf `RedisService`, `Client`
//! over it (redis-rs's `AsyncCommands` through the tower stack), layers stacked by hand,
//! and the assembled `ResilientClient` with its default stack.
//!
//! `cargo bench --bench end_to_end` prints criterion's numbers for each variant with 64
//! requests in flight on a current-thread and a 2-worker runtime, then interleaved rounds
//! with the throughput ratios to raw redis-rs (the order rotates every round; a ratio is
//! the median of a variant's same-round ratios, with a distribution-free 95% interval),
//! then the latency of one request at a time: p50, p99 and the overhead over raw
//! redis-rs, from sessions on new connections with the variants taking turns in blocks
//! (see `print_latency` for why). Raw redis-rs runs a second time on a connection of its
//! own, as a noise control. `BENCH_CRITERION_ONLY=1` skips the rounds, e.g. to profile
//! one variant with `--profile-time`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;
use redis::{
    AsyncCommands, AsyncConnectionConfig, IntoConnectionInfo,
    aio::{ConnectionManager, MultiplexedConnection},
    io::tcp::TcpSettings,
};
use support::{FaultProxy, RedisServer};
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
    /// Raw redis-rs as `get_multiplexed_async_connection` gives it: with its default
    /// 500 ms response timeout, a timer per request, as our stack has a deadline per
    /// request.
    RawDefault(MultiplexedConnection),
    Manager(ConnectionManager),
    Leaf(RedisService),
    Client(Client<RedisService>),
    RetryReconnect(Retry<Reconnect>),
    BreakerRetryReconnect(CircuitBreaker<Retry<Reconnect>>),
    Resilient(ResilientClient),
    ResilientService(ResilientClient),
    /// The builder's stack with two layers removed (switched off in place), as a tower
    /// `Service`: removing layers should cost nothing.
    Trimmed(ResilientClient),
    /// Raw redis-rs again, last in each round: how far apart two runs of the same code
    /// land, the noise the other ratios carry.
    RawAgain(MultiplexedConnection),
}

impl Variant {
    fn name(&self) -> &'static str {
        match self {
            Variant::Raw(_) => "raw redis-rs MultiplexedConnection",
            Variant::RawDefault(_) => "raw redis-rs, default 500 ms timeout",
            Variant::Manager(_) => "redis-rs ConnectionManager",
            Variant::Leaf(_) => "RedisService",
            Variant::Client(_) => "Client<RedisService>",
            Variant::RetryReconnect(_) => "Retry<Reconnect>",
            Variant::BreakerRetryReconnect(_) => "CircuitBreaker<Retry<Reconnect>>",
            Variant::Resilient(_) => "ResilientClient (AsyncCommands)",
            Variant::ResilientService(_) => "ResilientClient (tower Service)",
            Variant::Trimmed(_) => "ResilientClient w/o fallback, trace",
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
            Variant::Raw(conn) | Variant::RawDefault(conn) | Variant::RawAgain(conn) => {
                conn.get("bench:key").await.unwrap()
            }
            Variant::Manager(conn) => conn.get("bench:key").await.unwrap(),
            Variant::Leaf(service) => get_through(service).await,
            Variant::Client(client) => client.get("bench:key").await.unwrap(),
            Variant::RetryReconnect(service) => get_through(service).await,
            Variant::BreakerRetryReconnect(service) => get_through(service).await,
            Variant::Resilient(client) => client.get("bench:key").await.unwrap(),
            Variant::ResilientService(service) | Variant::Trimmed(service) => {
                get_through(service).await
            }
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

/// How many variants there are.
const VARIANTS: usize = 11;

/// Every variant, each on a connection of its own, in their order; the connections are
/// opened starting from the `rotate`-th variant, so which variant has the first socket
/// (which shows in latency) changes with `rotate`.
async fn variants(url: &str, rotate: usize) -> Vec<Variant> {
    let settings = TcpSettings::default().set_nodelay(!nagle());
    let info = url
        .into_connection_info()
        .unwrap()
        .set_tcp_settings(settings);
    let client = redis::Client::open(info).unwrap();
    let mut seed = client.get_multiplexed_async_connection().await.unwrap();
    let () = seed.set("bench:key", vec![b'v'; 64]).await.unwrap();
    let mut made: Vec<Option<Variant>> = vec![None; VARIANTS];
    for turn in 0..VARIANTS {
        let k = (rotate + turn) % VARIANTS;
        made[k] = Some(variant(k, url, &client).await);
    }
    made.into_iter().map(Option::unwrap).collect()
}

/// The `k`-th variant, on a new connection.
async fn variant(k: usize, url: &str, client: &redis::Client) -> Variant {
    // Same work as our leaf: no per-request response timer.
    let config = AsyncConnectionConfig::new().set_response_timeout(None);
    let raw = || async {
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap()
    };
    let resilient = || async {
        ResilientClient::builder_with_connector(connector(url))
            .connect()
            .await
            .unwrap()
    };
    match k {
        0 => Variant::Raw(raw().await),
        1 => Variant::RawDefault(client.get_multiplexed_async_connection().await.unwrap()),
        // As users get it: its default 500 ms response timeout included.
        2 => Variant::Manager(ConnectionManager::new(client.clone()).await.unwrap()),
        3 => Variant::Leaf(connector(url).connect().await.unwrap()),
        4 => Variant::Client(Client::new(connector(url).connect().await.unwrap())),
        5 => Variant::RetryReconnect(RetryLayer::default().layer(reconnect(url).await)),
        6 => Variant::BreakerRetryReconnect(
            CircuitBreakerLayer::default().layer(RetryLayer::default().layer(reconnect(url).await)),
        ),
        7 => Variant::Resilient(resilient().await),
        8 => Variant::ResilientService(resilient().await),
        9 => Variant::Trimmed(
            ResilientClient::builder_with_connector(connector(url))
                .without_fallback()
                .without_trace()
                .connect()
                .await
                .unwrap(),
        ),
        _ => Variant::RawAgain(raw().await),
    }
}

async fn reconnect(url: &str) -> Reconnect {
    Reconnect::connect(connector(url), ReconnectConfig::new())
        .await
        .unwrap()
}

/// Whether every variant runs with Nagle's algorithm on (`BENCH_NAGLE=1`), as redis-rs
/// 1.x sets its sockets, instead of with `TCP_NODELAY`, as this crate's connectors do
/// by default (and redis-rs 2.0). Either way every variant has the same socket option,
/// raw redis-rs included.
fn nagle() -> bool {
    std::env::var_os("BENCH_NAGLE").is_some()
}

/// This crate's connector to `url`, with every variant's socket option.
fn connector(url: &str) -> Connector {
    Connector::from_url(url).unwrap().tcp_nodelay(!nagle())
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
        let variants = rt.block_on(variants(&server.url(), 0));
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
            print_latency(flavour, &rt, &server.url());
        }
    }
    if std::env::var_os("BENCH_CRITERION_ONLY").is_none() {
        print_over_a_slow_link(&server);
    }
}

/// GETs from `CALLERS` callers at once through a proxy that holds every reply 1 ms, as
/// a network between the app and Redis does, with `TCP_NODELAY` and with Nagle's
/// algorithm: raw redis-rs and the default stack, each way. On loopback with no delay,
/// Nagle's fewer, larger packets win; over a network, every request written while
/// another is unacknowledged waits for the server's acknowledgement.
fn print_over_a_slow_link(server: &RedisServer) {
    const CALLERS: usize = 32;
    let rt = Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let proxy = FaultProxy::start(server.port()).await;
        proxy.delay_replies(Duration::from_millis(1));
        println!(
            "\nGET, {CALLERS} callers, multi_thread(2), through a proxy that holds each reply 1 ms"
        );
        for nodelay in [true, false] {
            let settings = TcpSettings::default().set_nodelay(nodelay);
            let info = proxy.url().into_connection_info().unwrap();
            let raw = redis::Client::open(info.set_tcp_settings(settings))
                .unwrap()
                .get_multiplexed_async_connection_with_config(
                    &AsyncConnectionConfig::new().set_response_timeout(None),
                )
                .await
                .unwrap();
            let connector = Connector::from_url(&proxy.url()).unwrap();
            let stack = ResilientClient::builder_with_connector(connector.tcp_nodelay(nodelay))
                .connect()
                .await
                .unwrap();
            let socket = if nodelay { "TCP_NODELAY" } else { "Nagle" };
            for variant in [Variant::Raw(raw), Variant::ResilientService(stack)] {
                let (rate, p50) = callers(&variant, CALLERS, Duration::from_secs(2)).await;
                let name = format!("{}, {socket}", variant.name());
                println!("  {name:<46} {rate:>7.0} GET/s   p50 {p50:>6.2} ms");
            }
        }
    });
}

/// `callers` callers making GETs one after another for `period`: GETs per second, and
/// the median GET's milliseconds.
async fn callers(variant: &Variant, callers: usize, period: Duration) -> (f64, f64) {
    let end = Instant::now() + period;
    let each = join_all((0..callers).map(|_| {
        let mut variant = variant.clone();
        async move {
            let mut took = Vec::new();
            while Instant::now() < end {
                let started = Instant::now();
                variant.get().await;
                took.push(started.elapsed());
            }
            took
        }
    }))
    .await;
    let mut all: Vec<Duration> = each.into_iter().flatten().collect();
    all.sort_unstable();
    let p50 = all[all.len() / 2].as_secs_f64() * 1e3;
    (all.len() as f64 / period.as_secs_f64(), p50)
}

/// One GET at a time: p50 and p99 of each variant, and its overhead over raw redis-rs.
///
/// The variants take turns in blocks of `BLOCK` calls (so drift hits them alike), and
/// work a call leaves behind for the runtime (a timer to cancel, a task to wake) lands
/// in its own variant's block, not in the next variant's first call. The calls are made
/// in sessions, each on new connections opened in a rotated order, since two identical
/// clients on two connections can land a microsecond apart for as long as the
/// connections live. A variant's overhead is the median over sessions of its p50 minus
/// raw redis-rs's p50 in the same session, with the smallest and largest session's.
fn print_latency(flavour: &str, rt: &Runtime, url: &str) {
    const SESSIONS: usize = 7;
    const BLOCK: usize = 20;
    const ROUNDS: usize = 100;
    let mut all: Vec<Vec<Duration>> = vec![Vec::new(); VARIANTS];
    let mut session_overheads: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS];
    let mut names = Vec::new();
    for session in 0..SESSIONS {
        let mut variants = rt.block_on(variants(url, session));
        names = variants.iter().map(Variant::name).collect();
        let mut samples: Vec<Vec<Duration>> = (0..VARIANTS)
            .map(|_| Vec::with_capacity(BLOCK * ROUNDS))
            .collect();
        rt.block_on(async {
            for round in 0..ROUNDS {
                for turn in 0..VARIANTS {
                    let i = (round + turn) % VARIANTS;
                    for _ in 0..BLOCK {
                        let started = Instant::now();
                        variants[i].get().await;
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
         sessions of p50 - raw redis-rs's p50 [smallest, largest session])",
        BLOCK * ROUNDS
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
