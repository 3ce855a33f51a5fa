//! End-to-end GET against a spawned Redis Cluster (3 masters), in the same run: raw
//! redis-rs `ClusterConnection` (built as `Connector::cluster` builds it: no resends, no
//! response timeout), our leaf over it, and the assembled `ResilientClient` with its
//! default stack, as a tower `Service` and through `AsyncCommands`.
//!
//! `cargo bench --bench cluster --features cluster` prints criterion's numbers with 64
//! requests in flight (each caller reads a key of its own, so the keys spread over the
//! masters) on a current-thread and a 2-worker runtime, then interleaved rounds with
//! the throughput ratios to raw redis-rs, then the latency of one request at a time and
//! its overhead over raw redis-rs (see `compare`). Raw redis-rs runs a second time on a
//! client of its own, as a noise control. `BENCH_CRITERION_ONLY=1` skips the rounds.

mod compare;
#[path = "../tests/support/mod.rs"]
mod support;

use compare::Contender;
use criterion::{Criterion, criterion_group, criterion_main};
use redis::{AsyncCommands, cluster::ClusterClient, cluster_async::ClusterConnection};
use support::RedisCluster;
use tower::{Service, ServiceExt};
use tower_redis_resilience::{Connector, RedisService, Request, ResilientClient};

/// The keys the callers read, one each.
fn keys() -> Vec<String> {
    (0..compare::IN_FLIGHT)
        .map(|worker| format!("bench:{worker}"))
        .collect()
}

#[derive(Clone)]
enum Variant {
    Raw(ClusterConnection),
    Leaf(RedisService),
    Resilient(ResilientClient),
    ResilientService(ResilientClient),
    /// Raw redis-rs again, last: how far apart two runs of the same code land.
    RawAgain(ClusterConnection),
}

/// How many variants there are.
const VARIANTS: usize = 5;

impl Contender for Variant {
    fn name(&self) -> &'static str {
        match self {
            Variant::Raw(_) => "raw redis-rs ClusterConnection",
            Variant::Leaf(_) => "RedisService (cluster)",
            Variant::Resilient(_) => "ResilientClient (AsyncCommands)",
            Variant::ResilientService(_) => "ResilientClient (tower Service)",
            Variant::RawAgain(_) => "raw redis-rs again (noise control)",
        }
    }

    async fn get(&mut self, worker: usize) {
        let key = format!("bench:{worker}");
        let value: Option<Vec<u8>> = match self {
            Variant::Raw(conn) | Variant::RawAgain(conn) => conn.get(&key).await.unwrap(),
            Variant::Resilient(client) => client.get(&key).await.unwrap(),
            Variant::Leaf(service) => get_through(service, &key).await,
            Variant::ResilientService(service) => get_through(service, &key).await,
        };
        assert!(value.is_some());
    }
}

/// `GET key` through a tower stack of this crate.
async fn get_through<S>(service: &mut S, key: &str) -> Option<Vec<u8>>
where
    S: Service<Request, Response = redis::Value, Error = tower_redis_resilience::Error>,
{
    let mut cmd = redis::cmd("GET");
    cmd.arg(key);
    let reply = service
        .ready()
        .await
        .unwrap()
        .call(Request::from(cmd))
        .await
        .unwrap();
    redis::from_redis_value(reply).unwrap()
}

/// Every variant, each on connections of its own, opened starting from the
/// `rotate`-th variant.
async fn variants(urls: &[String], rotate: usize) -> Vec<Variant> {
    let mut made: Vec<Option<Variant>> = vec![None; VARIANTS];
    for turn in 0..VARIANTS {
        let k = (rotate + turn) % VARIANTS;
        made[k] = Some(variant(k, urls).await);
    }
    made.into_iter().map(Option::unwrap).collect()
}

/// The `k`-th variant, on new connections.
async fn variant(k: usize, urls: &[String]) -> Variant {
    let raw = || async {
        // As `Connector::cluster` builds it: no resends (redis-rs's default response
        // timeout is none), and the sockets with `TCP_NODELAY`, as the connector sets.
        ClusterClient::builder(urls.to_vec())
            .retries(0)
            .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
            .build()
            .unwrap()
            .get_async_connection()
            .await
            .unwrap()
    };
    let resilient = || async {
        ResilientClient::builder_with_connector(
            Connector::cluster(urls.iter().map(String::as_str)).unwrap(),
        )
        .connect()
        .await
        .unwrap()
    };
    match k {
        0 => Variant::Raw(raw().await),
        1 => Variant::Leaf(
            Connector::cluster(urls.iter().map(String::as_str))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        ),
        2 => Variant::Resilient(resilient().await),
        3 => Variant::ResilientService(resilient().await),
        _ => Variant::RawAgain(raw().await),
    }
}

fn bench(c: &mut Criterion) {
    let cluster = RedisCluster::start(3, 0);
    let urls = cluster.urls();
    for (flavour, rt) in compare::runtimes() {
        let made = rt.block_on(async {
            let mut seed = ClusterClient::new(urls.clone())
                .unwrap()
                .get_async_connection()
                .await
                .unwrap();
            for key in keys() {
                let () = seed.set(key, vec![b'v'; 64]).await.unwrap();
            }
            variants(&urls, 0).await
        });
        compare::run(
            c,
            "cluster_get_64_in_flight",
            flavour,
            &rt,
            &made,
            |session| variants(&urls, session),
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
