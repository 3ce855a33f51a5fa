//! Metrics of a running app, scraped by Prometheus: the metrics layer records each Redis
//! call through the `metrics` facade under OpenTelemetry's names, and
//! `metrics-exporter-prometheus` serves them.
//!
//! `cargo run --example prometheus --features metrics` uses `REDIS_URL` if set, and
//! otherwise starts a throwaway `redis-server` on a free loopback port. It serves
//! `/metrics` on a loopback port, scrapes it once itself and prints what Prometheus would
//! read; pass `--serve` to keep serving until Ctrl-C.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use redis::AsyncCommands;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tower::ServiceBuilder;
use tower_redis_resilience::{
    Client, Connector,
    metrics::MetricsLayer,
    reconnect::{Reconnect, ReconnectConfig},
    timeout::TimeoutLayer,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Install the recorder before the first Redis call: the layer registers its series
    // with whatever recorder is installed when it first sees a command.
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let (url, _server) = support::redis_url_or_throwaway_server();
    let redis = Reconnect::connect(Connector::from_url(&url)?, ReconnectConfig::new()).await?;
    let metrics = MetricsLayer::new();
    let stack = ServiceBuilder::new()
        .layer(metrics.clone())
        .layer(TimeoutLayer::new(Duration::from_millis(250)))
        .service(redis);
    let mut client = Client::new(stack);

    // Some traffic: hits, misses, and one WRONGTYPE.
    for i in 0..100 {
        let () = client.set(format!("example:{i}"), i).await?;
        let _: Option<i64> = client.get(format!("example:{}", i * 2)).await?;
    }
    let _ = client.lpush::<_, _, i64>("example:1", "x").await;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    println!("serving http://{address}/metrics");
    tokio::spawn(serve(listener, prometheus));

    let scrape = scrape(&address.to_string()).await?;
    println!("--- a scrape of http://{address}/metrics (Redis series) ---");
    for line in scrape.lines().filter(|line| line.contains("db_client")) {
        println!("{line}");
    }
    println!("--- the built-in registry, for a health endpoint ---");
    for command in &metrics.snapshot().commands {
        println!(
            "{:<6} calls {:>4}  p50 {:?}  p99 {:?}  max {:?}",
            command.name,
            command.calls(),
            command.latency.p50,
            command.latency.p99,
            command.latency.max
        );
    }

    if std::env::args().any(|arg| arg == "--serve") {
        println!("serving until Ctrl-C");
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}

/// A minimal HTTP/1.0 server for `/metrics` (an app would use its own router, e.g. axum).
async fn serve(listener: TcpListener, prometheus: PrometheusHandle) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let body = prometheus.render();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let head = format!(
                "HTTP/1.0 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

/// What Prometheus does every scrape interval.
async fn scrape(address: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nhost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}
