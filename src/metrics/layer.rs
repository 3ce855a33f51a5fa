use std::fmt;

use tower::Layer;

use super::{Metrics, Registry, Snapshot};

/// Counts every call per command name and [`Outcome`](super::Outcome) (`ok`,
/// `server_error`, `timeout`, `unavailable`, `circuit_open`, `config_error`,
/// `cancelled`) with its latency, in a lock-free [`Registry`] whose
/// [`snapshot`](Self::snapshot) gives counts and p50/p90/p99/max per command and overall.
///
/// **Cancellation is an outcome**: a call dropped before it finished (an outer
/// `tokio::time::timeout`, a client that went away) is counted as `cancelled` with the
/// time it ran, not lost. Latency runs from the moment the request entered the stack
/// to its answer; the start is read once and shared with the layers below (the
/// timeout's deadline runs from the same instant).
///
/// Every service the layer makes shares its registry. Command names are a bounded set
/// (commands unknown to the command table count as `UNKNOWN`), so the number of series
/// is bounded too. With the `metrics` feature, each call is also recorded through the
/// [`metrics`](https://docs.rs/metrics) facade under OpenTelemetry names
/// (`db.client.operation.duration` in seconds, labels `db.system.name`,
/// `db.operation.name` and, on failure, `error.type`; fallbacks as
/// `redis.client.fallbacks`), so `metrics-exporter-prometheus` and friends see it. Install
/// the recorder before the first call: series are registered with the recorder of the
/// moment a command is first seen.
///
/// Put it outside the breaker and the deadline (`Fallback → Metrics → CircuitBreaker →
/// Timeout → ...`) to see what callers see, rejections and timeouts included.
///
/// ```
/// use tower::{Layer, Service, ServiceExt, service_fn};
/// use tower_redis_resilience::{Request, metrics::{MetricsLayer, Outcome}};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_redis_resilience::Error> {
/// let metrics = MetricsLayer::new();
/// let redis = service_fn(|_: Request| async { Ok(redis::Value::Okay) });
/// let mut redis = metrics.layer(redis);
/// redis.ready().await?.call(Request::from(redis::cmd("SET").arg("k").arg("v"))).await?;
///
/// let snapshot = metrics.snapshot();
/// assert_eq!(snapshot.command("SET").unwrap().count(Outcome::Ok), 1);
/// assert_eq!(snapshot.overall.calls(), 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use]
pub struct MetricsLayer {
    registry: Registry,
    /// False for a layer that stands in for a removed one: it records nothing.
    on: bool,
}

impl Default for MetricsLayer {
    fn default() -> Self {
        MetricsLayer::with_registry(Registry::default())
    }
}

impl MetricsLayer {
    /// A layer with a registry of its own.
    pub fn new() -> Self {
        MetricsLayer::default()
    }

    /// A layer recording into `registry`, shared with whoever else holds it (a
    /// [fallback layer](crate::fallback::FallbackLayer), a second stack).
    pub fn with_registry(registry: Registry) -> Self {
        MetricsLayer { registry, on: true }
    }

    /// A layer that records nothing. What the builder puts in place of removed metrics,
    /// so the stack keeps one type.
    pub(crate) fn off() -> Self {
        // Never recorded into: one for the whole process, not ~16 KiB per client.
        static UNUSED: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
        MetricsLayer {
            registry: UNUSED.get_or_init(Registry::default).clone(),
            on: false,
        }
    }

    /// The registry this layer records into.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Shorthand for `registry().snapshot()`.
    pub fn snapshot(&self) -> Snapshot {
        self.registry.snapshot()
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics {
            inner,
            registry: self.registry.clone(),
            on: self.on,
        }
    }
}

impl fmt::Debug for MetricsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsLayer")
            .field("registry", &self.registry)
            .finish()
    }
}
