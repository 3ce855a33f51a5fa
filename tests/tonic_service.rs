//! The tonic example over real gRPC on loopback, in front of a real redis-server that is
//! killed and restarted.

#[allow(dead_code)] // its `main` is the example's, not ours
#[path = "../examples/tonic_service.rs"]
mod tonic_service;

use std::time::{Duration, Instant};

use tonic::{Code, transport::Channel};
use tonic_service::support::{RedisServer, eventually};
use tonic_service::{Catalog, get_item};
use tower_redis_resilience::ResilientClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_handler_serves_from_the_cache_and_degrades_to_the_database() {
    let mut server = RedisServer::start();
    let redis = ResilientClient::builder(&server.url())
        .connect()
        .await
        .unwrap();
    let address = tonic_service::serve(Catalog::new(redis.clone()))
        .await
        .unwrap();
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let first = get_item(channel.clone(), 7).await.unwrap();
    assert_eq!(
        (first.id, first.name.as_str(), first.from_cache),
        (7, "item number 7", false)
    );
    assert!(get_item(channel.clone(), 7).await.unwrap().from_cache);
    let missing = get_item(channel.clone(), 1000).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    server.kill();
    for id in [7, 8, 7] {
        let started = Instant::now();
        let item = get_item(channel.clone(), id).await.unwrap();
        assert!(!item.from_cache);
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(redis.fallback().unwrap().fallbacks(), 3);

    server.restart();
    eventually(Duration::from_secs(5), async || {
        get_item(channel.clone(), 9).await.unwrap();
        get_item(channel.clone(), 9).await.unwrap().from_cache
    })
    .await;
}
