//! The axum example over real HTTP on loopback, in front of a real redis-server that is
//! killed and restarted: pages keep coming, from the database while Redis is away.

#[allow(dead_code)] // its `main` is the example's, not ours
#[path = "../examples/axum_cache.rs"]
mod axum_cache;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum_cache::support::{RedisServer, eventually};
use axum_cache::{AppState, Database};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tower_redis_resilience::ResilientClient;

/// `GET path` over a fresh connection: the status code and the body.
async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

async fn json(address: SocketAddr, path: &str) -> Value {
    let (status, body) = http_get(address, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_keep_coming_while_redis_is_down_and_the_cache_returns_after() {
    let prometheus = PrometheusBuilder::new().install_recorder().unwrap();
    let mut server = RedisServer::start();
    let state = AppState {
        redis: ResilientClient::builder(&server.url())
            .connect()
            .await
            .unwrap(),
        db: Arc::new(Database::with_items()),
        prometheus,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, axum_cache::app(state)).await });

    let first = json(address, "/items/7").await;
    assert_eq!(
        (first["source"].as_str(), first["name"].as_str()),
        (Some("database"), Some("item number 7"))
    );
    assert_eq!(json(address, "/items/7").await["source"], "cache");
    assert_eq!(http_get(address, "/items/1000").await.0, 404);
    let health = json(address, "/health").await;
    assert_eq!(health["status"], "up");
    assert_eq!(health["calls"]["outcomes"]["ok"], 4); // GET (miss), SET, GET (hit), GET (miss of the 404)

    // A stalled Redis (paused): a page waits for the cache no longer than its budget.
    server.pause();
    for id in [11, 12] {
        let started = Instant::now();
        let page = json(address, &format!("/items/{id}")).await;
        assert_eq!(page["source"], "database", "{page}");
        // 20 ms of database, and 10 ms each for the cache read and write that time out
        // (the client's 250 ms default deadline would take over half a second).
        let took = started.elapsed();
        assert!(took < Duration::from_millis(200), "{took:?}");
    }
    server.resume();

    server.kill();
    for id in [7, 8, 9, 7] {
        let started = Instant::now();
        let page = json(address, &format!("/items/{id}")).await;
        assert_eq!(page["source"], "database", "{page}");
        // 20 ms of database; the Redis calls fail fast.
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
    let health = json(address, "/health").await;
    assert_eq!(health["status"], "down", "{health}");
    assert!(
        health["calls"]["fallbacks"].as_u64().unwrap() >= 4,
        "{health}"
    );

    server.restart();
    eventually(Duration::from_secs(5), async || {
        json(address, "/items/10").await;
        json(address, "/items/10").await["source"] == "cache"
    })
    .await;
    assert_eq!(json(address, "/health").await["status"], "up");

    let (status, metrics) = http_get(address, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            "db_client_operation_duration_count{db_system_name=\"redis\",db_operation_name=\"GET\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("redis_client_fallbacks"), "{metrics}");
    assert!(!metrics.contains("item:"), "keys never become labels");
}
