//! The crate in one screen: Redis as a tower `Service`, redis-rs's command API on top of
//! it, and errors that say what went wrong.
//!
//! `cargo run --example quickstart` uses `REDIS_URL` if set, and otherwise starts a
//! throwaway `redis-server` on a free loopback port (it must be installed).

#[path = "../tests/support/mod.rs"]
mod support;

use redis::AsyncCommands;
use tower::{Service, ServiceExt};
use tower_redis_resilience::{Client, Error, RedisService, Request};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (url, server) = support::redis_url_or_throwaway_server();
    if let Some(server) = &server {
        let port = server.port();
        println!("started a throwaway redis-server on 127.0.0.1:{port}");
    }

    // The leaf service: one multiplexed connection, cheap to clone.
    let redis = RedisService::connect(&url).await?;
    println!("connected: {redis:?}");

    // Used directly as a tower Service, a request carries what layers need to know.
    let request = Request::from(
        redis::cmd("SET")
            .arg("quickstart:greeting")
            .arg("hello")
            .to_owned(),
    );
    let info = *request.info();
    let reply = redis.clone().ready().await?.call(request).await?;
    println!(
        "{} (read-only: {}, idempotent: {}) -> {reply:?}",
        info.name(),
        info.is_read_only(),
        info.is_idempotent()
    );

    // Through Client, every redis-rs command works; layers would sit between the two.
    let mut client = Client::new(redis);
    let greeting: Option<String> = client.get("quickstart:greeting").await?;
    println!("GET quickstart:greeting -> {greeting:?}");
    let visits: i64 = client.incr("quickstart:visits", 1).await?;
    println!("INCR quickstart:visits -> {visits}");

    // Errors are classified, even when they come out through redis-rs's API.
    let err = client
        .lpush::<_, _, i64>("quickstart:greeting", "x")
        .await
        .expect_err("a string is not a list");
    let err = Error::from(err);
    println!(
        "LPUSH on a string -> server error: {}, outage: {}, message: {err}",
        err.is_server(),
        err.is_unavailable()
    );
    Ok(())
}
