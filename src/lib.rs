//! Redis as a [`tower::Service`], for applications that must keep answering when Redis
//! restarts, stalls, fails over or vanishes.
//!
//! A [`Request`] is a redis-rs [`Cmd`](redis::Cmd) or [`Pipeline`](redis::Pipeline) with
//! its [`CommandInfo`] (read-only? idempotent? blocking, and for how long?) computed once.
//! [`RedisService`] sends requests on one multiplexed connection, opened by a [`Connector`]
//! (a URL, [`Connector::sentinel`] to find the master through Redis Sentinel and follow
//! it through failovers, or `Connector::cluster` with feature `cluster`; credentials that
//! expire or rotate from a provider of yours, [`Connector::credentials`]), and answers
//! [`redis::Value`]s or one [`Error`] type whose classifiers (`is_unavailable`,
//! `is_timeout`, `is_circuit_open`, `is_server`, `is_config`, `may_have_run`) drive every
//! resilience policy. [`reconnect::Reconnect`] keeps that connection through restarts and
//! stalls (and, while Redis holds it up in a write pause, sends reads on a second one),
//! [`retry::RetryLayer`] resends what is safe to resend,
//! [`circuit_breaker::CircuitBreakerLayer`] fails fast while Redis is down and probes for
//! its return, [`timeout::TimeoutLayer`] gives every request a deadline sized to its
//! command (or the one the caller gave it: [`Request::with_deadline`],
//! [`Client::with_deadline`]), and does not charge a call for a stall of your own runtime
//! (a reply that came meanwhile is taken, not thrown away), [`fallback::FallbackLayer`] turns failed reads into misses,
//! [`metrics::MetricsLayer`] and [`trace::TraceLayer`] count, time and trace every call,
//! and [`Client`] puts redis-rs's whole command API on top of any stack.
//! [`pubsub::Subscriber`] keeps Pub/Sub subscriptions through restarts, and says when
//! messages may have been missed.
//!
//! [`ResilientClient`] assembles the recommended stack, outermost first: `Fallback →
//! Metrics → Trace → CircuitBreaker → Timeout → Retry → Reconnect`. Fallback answers for
//! every failure below it while the metrics still see each one; the breaker sees
//! timeouts; the deadline covers retries.
//!
//! ```no_run
//! use redis::AsyncCommands;
//! use tower_redis_resilience::ResilientClient;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut client = ResilientClient::builder("redis://127.0.0.1:6379").build()?;
//! // A cache miss while Redis is down, never a hang.
//! let value: Option<String> = client.get("k").await?;
//! println!("{value:?}, {:?}", client.health().await.status);
//! # Ok(()) }
//! ```
//!
//! The same stack by hand, from the public layers (the builder also wires the two
//! signals shown here):
//!
//! ```no_run
//! use redis::AsyncCommands;
//! use tower::ServiceBuilder;
//! use tower_redis_resilience::{
//!     Client, Connector,
//!     circuit_breaker::CircuitBreakerLayer,
//!     fallback::FallbackLayer,
//!     metrics::MetricsLayer,
//!     reconnect::{Reconnect, ReconnectConfig},
//!     retry::RetryLayer,
//!     timeout::TimeoutLayer,
//!     trace::TraceLayer,
//! };
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let connector = Connector::from_url("redis://127.0.0.1:6379")?;
//! let trace = TraceLayer::for_connector(&connector);
//! let redis = Reconnect::lazy(connector, ReconnectConfig::new())?;
//! let breaker = CircuitBreakerLayer::default();
//! // A new connection after an outage lets the breaker probe at once.
//! breaker.half_open_on_reconnect(redis.state())?;
//! let metrics = MetricsLayer::new();
//! let stack = ServiceBuilder::new()
//!     // Fallbacks are counted in the metrics registry.
//!     .layer(FallbackLayer::default().record_to(metrics.registry().clone()))
//!     .layer(metrics)
//!     .layer(trace)
//!     .layer(breaker)
//!     .layer(TimeoutLayer::default())
//!     .layer(RetryLayer::default())
//!     .service(redis);
//! let mut client = Client::new(stack);
//! let value: Option<String> = client.get("k").await?;
//! # let _ = value; Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! | feature | what it adds |
//! |---------|--------------|
//! | `tls`   | `rediss://` URLs, `Connector::tls_certificates` (a CA of your own, a client certificate) and `redis::Client::build_with_tls`, through rustls (crypto provider: the process's default, else `ring`) |
//! | `serde` | `Serialize` for [`Health`] (durations in milliseconds) and the states it holds |
//! | `cluster` | `Connector::cluster`: Redis Cluster, through redis-rs's cluster client (with its `token-based-authentication`, which [`Connector::credentials`] uses for the nodes) |
//! | `metrics` | [`metrics::MetricsLayer`] also records through the [`metrics`](https://docs.rs/metrics) facade under OpenTelemetry names: `db.client.operation.duration` (seconds; labels `db.system.name`, `db.operation.name`, `error.type`) and `redis.client.fallbacks` |

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

pub mod backoff;
pub mod circuit_breaker;
mod client;
mod clock;
mod connect;
mod credentials;
mod directory;
mod error;
pub mod fallback;
pub mod metrics;
pub mod pubsub;
pub mod reconnect;
mod request;
pub mod retry;
mod sentinel;
mod service;
mod sync;
#[cfg(test)]
mod testing;
pub mod timeout;
#[cfg(feature = "tls")]
mod tls;
pub mod trace;

pub use client::{
    CallSummary, Client, Health, HealthStatus, ResilientClient, ResilientClientBuilder,
    ResilientFuture, ResilientStack,
};
pub use connect::{
    Connector, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_ARGUMENT_SIZE, DEFAULT_SENTINEL_CHECK_INTERVAL,
    DEFAULT_TCP_KEEPALIVE, MakeConnection,
};
pub use credentials::Credentials;
pub use error::Error;
pub use request::{Blocking, CommandInfo, PIPELINE, Request, TRANSACTION, UNKNOWN_COMMAND};
pub use service::{RedisService, ResponseFuture};

/// Compiles the README's Rust examples as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
