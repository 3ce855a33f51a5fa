//! Deadlines, fallback, metrics and tracing together, against real redis-server
//! processes that are paused and blocked on.

mod support;

use std::time::{Duration, Instant};

use redis::{AsyncCommands, Value};
use support::RedisServer;
use tower::{ServiceBuilder, util::BoxCloneSyncService};
use tower_redis_resilience::{
    Client, Connector, Error, Request,
    fallback::FallbackLayer,
    metrics::{MetricsLayer, Outcome},
    reconnect::{Reconnect, ReconnectConfig},
    timeout::TimeoutLayer,
    trace::TraceLayer,
};

type Stack = BoxCloneSyncService<Request, Value, Error>;

const DEADLINE: Duration = Duration::from_millis(100);

/// `Fallback → Metrics → Trace → Timeout → Reconnect`, with a 100 ms default deadline.
async fn client(server: &RedisServer) -> (Client<Stack>, MetricsLayer, FallbackLayer) {
    let connector = Connector::from_url(&server.url()).unwrap();
    let trace = TraceLayer::for_connector(&connector);
    let redis = Reconnect::connect(connector, ReconnectConfig::new())
        .await
        .unwrap();
    let metrics = MetricsLayer::new();
    let fallback = FallbackLayer::default().record_to(metrics.registry().clone());
    let stack = ServiceBuilder::new()
        .layer(fallback.clone())
        .layer(metrics.clone())
        .layer(trace)
        .layer(TimeoutLayer::new(DEADLINE))
        .service(redis);
    (
        Client::new(BoxCloneSyncService::new(stack)),
        metrics,
        fallback,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blpop_waits_past_the_default_deadline_for_its_value() {
    let server = RedisServer::start();
    let (mut client, metrics, _) = client(&server).await;
    let pusher = {
        let url = server.url();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut other = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let _: i64 = other.rpush("queue", "job").await.unwrap();
        })
    };
    let start = Instant::now();
    // Blocks up to 2 s under a 100 ms default: its deadline is 2 s + the grace.
    let popped: Option<(String, String)> = client.blpop("queue", 2.0).await.unwrap();
    let took = start.elapsed();
    assert_eq!(popped, Some(("queue".into(), "job".into())));
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    pusher.await.unwrap();
    let blpop = metrics.snapshot().command("BLPOP").cloned().unwrap();
    assert_eq!(blpop.count(Outcome::Ok), 1);
    assert!(blpop.latency.max >= Duration::from_millis(950));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_makes_reads_miss_within_the_deadline_and_writes_time_out() {
    let server = RedisServer::start();
    let (mut client, metrics, fallback) = client(&server).await;
    let () = client.set("k", "v").await.unwrap();
    let () = client.rpush("list", "x").await.map(|_: i64| ()).unwrap();

    server.pause();
    let start = Instant::now();
    let value: Option<String> = client.get("k").await.unwrap();
    let took = start.elapsed();
    assert_eq!(value, None, "a read answers a miss");
    assert!(
        took >= DEADLINE && took < DEADLINE + Duration::from_millis(150),
        "{took:?}"
    );

    let start = Instant::now();
    let err = Error::from(client.set::<_, _, ()>("k", "w").await.unwrap_err());
    assert!(err.is_timeout(), "{err}");
    assert_eq!(
        (err.command(), err.timeout()),
        (Some("SET"), Some(DEADLINE))
    );
    assert!(start.elapsed() < DEADLINE + Duration::from_millis(150));
    server.resume();

    // Back: the SET that timed out had reached Redis and ran on resume (a timeout may
    // have run, which is why it is not retried); a WRONGTYPE is the application's error,
    // never a miss.
    let value = wait_for(&client).await;
    assert_eq!(value.as_deref(), Some("w"));
    let err = client.get::<_, Option<String>>("list").await.unwrap_err();
    assert_eq!(err.code(), Some("WRONGTYPE"));

    let get = metrics.snapshot().command("GET").cloned().unwrap();
    assert_eq!(get.count(Outcome::Timeout), 1);
    assert_eq!(get.count(Outcome::Fallback), 1);
    assert_eq!(get.count(Outcome::ServerError), 1);
    assert_eq!(fallback.fallbacks(), 1);
}

/// Reads `k` until Redis answers it (the first calls after a resume may still find
/// the stuck connection being replaced).
async fn wait_for(client: &Client<Stack>) -> Option<String> {
    let mut client = client.clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Some(value)) = client.get::<_, Option<String>>("k").await {
            return Some(value);
        }
        assert!(Instant::now() < deadline, "Redis did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_call_exactly_including_those_an_outer_timeout_drops() {
    let server = RedisServer::start();
    let connector = Connector::from_url(&server.url()).unwrap();
    // Replaced as soon as it is suspect, without asking a PING first: the counts below
    // then follow from the calls alone.
    let config = ReconnectConfig::new().stuck_ping_timeout(Duration::ZERO);
    let redis = Reconnect::connect(connector, config).await.unwrap();
    let metrics = MetricsLayer::new();
    let stack = ServiceBuilder::new().layer(metrics.clone()).service(redis);
    let mut client = Client::new(BoxCloneSyncService::new(stack));

    for i in 0..20 {
        let () = client.set(format!("k{i}"), i).await.unwrap();
    }
    for i in 0..30 {
        let _: Option<i64> = client.get(format!("k{i}")).await.unwrap();
    }
    let _ = client.lpush::<_, _, i64>("k1", "x").await.unwrap_err();

    // Stalled: the app gives up on each call after 50 ms. After 3 such calls Reconnect
    // takes the connection for stuck and the rest fail fast as unavailable.
    server.pause();
    let (mut dropped, mut unavailable) = (0, 0);
    for _ in 0..7 {
        let call = client.get::<_, Option<i64>>("k1");
        match tokio::time::timeout(Duration::from_millis(50), call).await {
            Err(_) => dropped += 1,
            Ok(Err(err)) if Error::from(err.clone()).is_unavailable() => unavailable += 1,
            Ok(other) => panic!("{other:?}"),
        }
    }
    server.resume();
    assert_eq!((dropped, unavailable), (3, 4));

    let snapshot = metrics.snapshot();
    let set = snapshot.command("SET").unwrap();
    assert_eq!((set.count(Outcome::Ok), set.calls()), (20, 20));
    let get = snapshot.command("GET").unwrap();
    assert_eq!(get.count(Outcome::Ok), 30);
    assert_eq!(get.count(Outcome::Cancelled), 3);
    assert_eq!(get.count(Outcome::Unavailable), 4);
    assert_eq!(get.calls(), 37);
    assert!(get.latency.max >= Duration::from_millis(50));
    assert_eq!(
        snapshot
            .command("LPUSH")
            .unwrap()
            .count(Outcome::ServerError),
        1
    );
    assert_eq!(snapshot.overall.calls(), 58);
}
