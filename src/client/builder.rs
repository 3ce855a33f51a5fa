use std::{sync::Arc, time::Duration};

use tower::ServiceBuilder;

use super::{ResilientClient, ResilientStack, resilient::Parts};
use crate::{
    Client, Connector, Error,
    circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer},
    fallback::FallbackLayer,
    metrics::{MetricsLayer, Registry},
    reconnect::{Reconnect, ReconnectConfig},
    retry::RetryLayer,
    timeout::TimeoutLayer,
    trace::TraceLayer,
};

/// A layer of the assembled stack: its default, one the user gave, or none.
#[derive(Debug, Clone)]
enum Slot<T> {
    Default,
    Set(T),
    Off,
}

impl<T> Slot<T> {
    fn resolve(self, default: impl FnOnce() -> T) -> Option<T> {
        match self {
            Slot::Default => Some(default()),
            Slot::Set(value) => Some(value),
            Slot::Off => None,
        }
    }
}

/// Assembles a [`ResilientClient`]: the recommended stack with defaults for a Redis cache,
/// every layer replaceable (`.timeout(..)`) or removable (`.without_timeout()`).
///
/// | layer | default |
/// |-------|---------|
/// | [fallback](FallbackLayer) | reads answer `Nil` (a miss) while Redis cannot answer; writes keep their error |
/// | [metrics](MetricsLayer) | a fresh [`Registry`], also fed by the fallback layer |
/// | [trace](TraceLayer) | a `DEBUG` span per call with the server's address, port and database |
/// | [circuit breaker](CircuitBreakerConfig) | opens at 50 % failures over the last 100 calls (20 at least); half-open as soon as Redis reconnects |
/// | [timeout](TimeoutLayer) | 250 ms, blocking commands their block time plus 250 ms |
/// | [retry](RetryLayer) | up to 2 retries of what is safe to resend, within a budget |
/// | [reconnect](ReconnectConfig) | every ~25 ms for the first 2 s of an outage, then exponential to 1 s; a `PING` every 5 s replaces a connection that does not answer it within 1 s; a `READONLY` reply (a failover) replaces the connection, at most once a second; blocking commands that wait for data (`BLPOP`, `XREAD BLOCK`...) on connections of their own, up to 4 kept between calls |
///
/// ```no_run
/// use std::time::Duration;
/// use tower_redis_resilience::{
///     ResilientClient,
///     fallback::{FallbackLayer, FallbackPolicy},
///     timeout::TimeoutLayer,
/// };
///
/// # async fn run() -> Result<(), tower_redis_resilience::Error> {
/// let client = ResilientClient::builder("redis://127.0.0.1:6379")
///     .timeout(TimeoutLayer::new(Duration::from_millis(100)).command("KEYS", Duration::from_secs(2))?)
///     .fallback(FallbackLayer::new(FallbackPolicy::ReadsAndWrites(redis::Value::Nil)))
///     .without_retry()
///     .connect() // or .build() to start while Redis is down
///     .await?;
/// # let _ = client; Ok(()) }
/// ```
#[must_use]
#[derive(Debug, Clone)]
pub struct ResilientClientBuilder {
    connector: Result<Connector, Error>,
    reconnect: ReconnectConfig,
    fallback: Slot<FallbackLayer>,
    metrics: Slot<Registry>,
    trace: Slot<TraceLayer>,
    breaker: Slot<CircuitBreakerConfig>,
    timeout: Slot<TimeoutLayer>,
    retry: Slot<RetryLayer>,
    replica: Option<Connector>,
    health_timeout: Duration,
}

impl ResilientClientBuilder {
    /// The default stack for `url`; a malformed URL is reported by `build`/`connect`.
    pub fn new(url: &str) -> Self {
        Self::from_result(Connector::from_url(url))
    }

    /// The default stack for `connector` (connection details, TLS, connect timeout).
    pub fn with_connector(connector: Connector) -> Self {
        Self::from_result(Ok(connector))
    }

    fn from_result(connector: Result<Connector, Error>) -> Self {
        ResilientClientBuilder {
            connector,
            reconnect: ReconnectConfig::new(),
            fallback: Slot::Default,
            metrics: Slot::Default,
            trace: Slot::Default,
            breaker: Slot::Default,
            timeout: Slot::Default,
            retry: Slot::Default,
            replica: None,
            health_timeout: Duration::from_millis(250),
        }
    }

    /// How to keep the connection (backoff, health check, `max_wait`, on-connect hook).
    pub fn reconnect(mut self, config: ReconnectConfig) -> Self {
        self.reconnect = config;
        self
    }

    /// Replaces the fallback layer. If the metrics layer is on, fallbacks are also
    /// recorded in its registry (this replaces the layer's own `record_to`); read the
    /// count from [`ResilientClient::fallback`].
    pub fn fallback(mut self, layer: FallbackLayer) -> Self {
        self.fallback = Slot::Set(layer);
        self
    }

    /// No fallback: failed reads return their errors.
    pub fn without_fallback(mut self) -> Self {
        self.fallback = Slot::Off;
        self
    }

    /// While there is no connection to Redis (it is down, or the connection is being
    /// replaced), reads go to the replica `connector` leads to (a replica's address, or a
    /// managed Redis's reader endpoint) instead of missing: see
    /// [`ReconnectConfig::read_replica`]. The replica's connection is kept as this
    /// client's is (the same [`reconnect`](Self::reconnect) settings, its `on_connect`
    /// hook included, except that a `READONLY` reply there is no failover), and opened in
    /// the background: a replica that is down does not fail [`connect`](Self::connect).
    /// For a replica that Sentinel knows, give
    /// [`Connector::sentinel_replica`](crate::Connector::sentinel_replica). Count its reads in
    /// [`ResilientClient::reconnect_stats`]'s `replica_reads`.
    ///
    /// ```no_run
    /// use tower_redis_resilience::{Connector, ResilientClient};
    ///
    /// # async fn run() -> Result<(), tower_redis_resilience::Error> {
    /// let client = ResilientClient::builder("redis://127.0.0.1:6379")
    ///     .read_replica(Connector::from_url("redis://127.0.0.1:6380")?)
    ///     .connect()
    ///     .await?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub fn read_replica(mut self, connector: Connector) -> Self {
        self.replica = Some(connector);
        self
    }

    /// Records into `registry` (share one between clients, or keep a handle).
    pub fn metrics(mut self, registry: Registry) -> Self {
        self.metrics = Slot::Set(registry);
        self
    }

    /// No metrics layer (and fallbacks are counted only by the fallback layer).
    pub fn without_metrics(mut self) -> Self {
        self.metrics = Slot::Off;
        self
    }

    /// Replaces the trace layer (to record arguments, change the level, warn on slow
    /// calls).
    pub fn trace(mut self, layer: TraceLayer) -> Self {
        self.trace = Slot::Set(layer);
        self
    }

    /// No spans.
    pub fn without_trace(mut self) -> Self {
        self.trace = Slot::Off;
        self
    }

    /// Configures the circuit breaker; an invalid configuration is reported by
    /// `build`/`connect`.
    pub fn circuit_breaker(mut self, config: CircuitBreakerConfig) -> Self {
        self.breaker = Slot::Set(config);
        self
    }

    /// No circuit breaker.
    pub fn without_circuit_breaker(mut self) -> Self {
        self.breaker = Slot::Off;
        self
    }

    /// Replaces the deadlines.
    pub fn timeout(mut self, layer: TimeoutLayer) -> Self {
        self.timeout = Slot::Set(layer);
        self
    }

    /// No deadlines: a call to a stalled server waits as long as the server does.
    pub fn without_timeout(mut self) -> Self {
        self.timeout = Slot::Off;
        self
    }

    /// Replaces the retry policy.
    pub fn retry(mut self, layer: RetryLayer) -> Self {
        self.retry = Slot::Set(layer);
        self
    }

    /// No retries.
    pub fn without_retry(mut self) -> Self {
        self.retry = Slot::Off;
        self
    }

    /// How long [`ResilientClient::health`] waits for its `PING`. Default 250 ms.
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.health_timeout = timeout;
        self
    }

    /// Starts at once and connects in the background: calls fail (reads fall back) until
    /// Redis is reachable. Needs a tokio runtime.
    pub fn build(self) -> Result<ResilientClient, Error> {
        let connector = self.connector.clone()?;
        let redis = Reconnect::lazy(connector.clone(), self.reconnect_config()?)?;
        self.assemble(&connector, redis)
    }

    /// Connects first and returns the error if Redis cannot be reached.
    pub async fn connect(self) -> Result<ResilientClient, Error> {
        let connector = self.connector.clone()?;
        let redis = Reconnect::connect(connector.clone(), self.reconnect_config()?).await?;
        self.assemble(&connector, redis)
    }

    /// The reconnect settings, with the replica's connection if there is one.
    fn reconnect_config(&self) -> Result<ReconnectConfig, Error> {
        let Some(replica) = &self.replica else {
            return Ok(self.reconnect.clone());
        };
        let replica = Reconnect::lazy(
            replica.clone(),
            self.reconnect.clone().reconnect_on_readonly(None),
        )?;
        Ok(self.reconnect.clone().read_replica(replica))
    }

    fn assemble(self, connector: &Connector, redis: Reconnect) -> Result<ResilientClient, Error> {
        let breaker = match self.breaker {
            Slot::Default => Some(CircuitBreakerLayer::default()),
            Slot::Set(config) => Some(CircuitBreakerLayer::new(config)?),
            Slot::Off => None,
        };
        if let Some(breaker) = &breaker {
            breaker.half_open_on_reconnect(redis.state())?;
        }
        let registry = self.metrics.resolve(Registry::new);
        let fallback = self
            .fallback
            .resolve(FallbackLayer::default)
            .map(|layer| match &registry {
                Some(registry) => layer.record_to(registry.clone()),
                None => layer,
            });
        let trace = self.trace.resolve(|| TraceLayer::for_connector(connector));
        let timeout = self.timeout.resolve(TimeoutLayer::default);
        let retry = self.retry.resolve(RetryLayer::default);
        let db = connector.connection_info().redis_settings().db();

        // A removed layer is replaced by the same layer switched off (it passes calls
        // through), so every client holds the one concrete stack: no allocation or
        // dynamic dispatch per call, and removing a layer never costs more than keeping it.
        let stack = ServiceBuilder::new()
            .layer(fallback.clone().unwrap_or_else(FallbackLayer::off))
            .layer(
                registry
                    .clone()
                    .map_or_else(MetricsLayer::off, MetricsLayer::with_registry),
            )
            .layer(trace.unwrap_or_else(TraceLayer::off))
            .layer(breaker.clone().unwrap_or_else(CircuitBreakerLayer::off))
            .layer(timeout.clone().unwrap_or_else(TimeoutLayer::off))
            .layer(retry.clone().unwrap_or_else(RetryLayer::off))
            .service(redis.clone());
        Ok(ResilientClient {
            client: Client::new(ResilientStack::new(stack)).with_db(db),
            parts: Arc::new(Parts {
                redis,
                breaker,
                registry,
                fallback,
                timeout,
                retry,
                health_timeout: self.health_timeout,
            }),
        })
    }
}
