//! An axum app that uses Redis as a cache in front of a slow database, and keeps
//! answering while Redis is down or stalled: reads become misses served from the
//! database, cache calls wait no longer than the page's budget for them, cache writes
//! fail fast instead of hanging, and the client reconnects by itself.
//!
//! - `GET /items/{id}`: cache-aside; the reply says whether it came from the cache or
//!   the database.
//! - `GET /health`: `ResilientClient::health()` as JSON (connection, breaker, ping,
//!   call counts and latency).
//! - `GET /metrics`: the Redis calls in Prometheus's text format, under OpenTelemetry's
//!   names.
//!
//! `cargo run --example axum_cache --features serde,metrics` uses `REDIS_URL` if set, and
//! otherwise starts a throwaway `redis-server` on a free loopback port (it must be
//! installed); it serves on `127.0.0.1:3000` (or `$PORT`) until Ctrl-C. Try
//! `curl 127.0.0.1:3000/items/7` twice, then stop Redis and try again.

// `pub` so that the test that runs this example uses the same harness.
#[path = "../tests/support/mod.rs"]
pub mod support;

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    routing::get,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use redis::AsyncCommands;
use serde_json::{Value, json};
use tower_redis_resilience::{Health, ResilientClient};

/// What the handlers share. Everything in it is cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub redis: ResilientClient,
    pub db: Arc<Database>,
    pub prometheus: PrometheusHandle,
}

/// The stand-in for a real database: every read takes 20 ms.
#[derive(Default)]
pub struct Database {
    items: HashMap<u32, String>,
}

impl Database {
    /// Items 1 to 100.
    pub fn with_items() -> Self {
        let items = (1..=100)
            .map(|id| (id, format!("item number {id}")))
            .collect();
        Database { items }
    }

    async fn load(&self, id: u32) -> Option<String> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.items.get(&id).cloned()
    }
}

/// How long a page waits for the cache.
const CACHE_BUDGET: Duration = Duration::from_millis(10);

/// The routes.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/items/{id}", get(item))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn item(
    State(state): State<AppState>,
    Path(id): Path<u32>,
) -> Result<Json<Value>, StatusCode> {
    let key = format!("item:{id}");
    // The cache is worth waiting for only while it beats the database (20 ms): past
    // `CACHE_BUDGET` a read is a miss and the page goes to the database. Running out of
    // this handler's budget is not Redis failing, so it opens no breaker for the others.
    let mut redis = state.redis.with_deadline(CACHE_BUDGET);
    // While Redis cannot answer, the client's fallback makes this `Ok(None)`: a miss.
    match redis.get::<_, Option<String>>(&key).await {
        Ok(Some(name)) => return Ok(Json(json!({ "id": id, "name": name, "source": "cache" }))),
        Ok(None) => {}
        // A server error (say, WRONGTYPE) is a bug to log, not a reason to fail the page.
        Err(err) => tracing::warn!(%err, "cache read failed"),
    }
    let name = state.db.load(id).await.ok_or(StatusCode::NOT_FOUND)?;
    // While Redis is down this fails within milliseconds (circuit open); the page is
    // served all the same.
    if let Err(err) = redis.set_ex::<_, _, ()>(&key, &name, 60).await {
        tracing::debug!(%err, "cache write skipped");
    }
    Ok(Json(
        json!({ "id": id, "name": name, "source": "database" }),
    ))
}

/// Always 200: the app serves without Redis, so a Redis outage must not make a load
/// balancer take it out of rotation. The body says how Redis is doing.
async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(state.redis.health().await)
}

async fn metrics(State(state): State<AppState>) -> String {
    state.prometheus.render()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Before the first Redis call, so the metrics layer records through it.
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let (url, _server) = support::redis_url_or_throwaway_server();
    // `build`, not `connect`: the app starts even if Redis is down, and connects when it
    // can.
    let redis = ResilientClient::builder(&url).build()?;
    let state = AppState {
        redis,
        db: Arc::new(Database::with_items()),
        prometheus,
    };
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!(
        "serving http://{}/items/7 (and /health, /metrics)",
        listener.local_addr()?
    );
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
