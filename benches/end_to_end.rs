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
//! (see `compare::print_latency` for why). Raw redis-rs runs a second time on a connection of its
//! own, as a noise control. `BENCH_CRITERION_ONLY=1` skips the rounds, e.g. to profile
//! one variant with `--profile-time`.

mod compare;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use compare::Contender;
use criterion::{Criterion, criterion_group, criterion_main};
use futures::future::join_all;
use redis::{
    AsyncCommands, AsyncConnectionConfig, IntoConnectionInfo,
    aio::{ConnectionManager, MultiplexedConnection},
    io::tcp::TcpSettings,
};
use support::{FaultProxy, RedisServer};
use tokio::runtime::Builder;
use tower::Layer;
use tower::{Service, ServiceExt};
use tower_redis_resilience::{
    Client, Connector, RedisService, Request, ResilientClient,
    circuit_breaker::{CircuitBreaker, CircuitBreakerLayer},
    reconnect::{Reconnect, ReconnectConfig},
    retry::{Retry, RetryLayer},
};

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

impl Contender for Variant {
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

    async fn get(&mut self, _worker: usize) {
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

fn bench(c: &mut Criterion) {
    let server = RedisServer::start();
    let url = server.url();
    for (flavour, rt) in compare::runtimes() {
        let made = rt.block_on(variants(&url, 0));
        compare::run(c, "get_64_in_flight", flavour, &rt, &made, |session| {
            variants(&url, session)
        });
    }
    if !compare::criterion_only() {
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
                variant.get(0).await;
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

criterion_group!(benches, bench);
criterion_main!(benches);
