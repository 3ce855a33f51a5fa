use std::{fmt, sync::Arc};

use tokio::sync::watch;
use tower::Layer;

use super::{BreakerMetrics, BreakerState, CircuitBreaker, CircuitBreakerConfig, shared::Shared};
use crate::{Error, reconnect::ConnectionState, sync::Leased};

/// A circuit breaker for Redis calls: after enough evidence of an outage it rejects calls
/// at once instead of letting each one wait for a timeout, then lets a few probes through
/// to see whether Redis is back.
///
/// **The layer owns the breaker.** Every service it makes and every clone of it (the
/// layer's or a service's) shares one state and one window, so a stack that a framework
/// rebuilds per request still trips. Keep a clone of the layer as the handle for
/// [`state`](Self::state), [`metrics`](Self::metrics) and the manual controls.
///
/// - **Closed**: calls go through; their outcomes fill a [sliding
///   window](super::SlidingWindow). With at least `minimum_calls` in it, a failure rate
///   or slow-call rate at its threshold opens the breaker. Recording costs a few atomic
///   operations and no lock; a count window reads no clock for calls answered at once.
/// - **Open**: calls are rejected with a [circuit-open](Error::is_circuit_open) error
///   telling when the next probe is due. After `wait_in_open` — or at once when Redis
///   reconnects, see [`half_open_on_reconnect`](Self::half_open_on_reconnect) — it goes
///   half-open.
/// - **Half-open**: exactly `permitted_calls_in_half_open` calls go through, however many
///   arrive at once; their outcomes close or re-open it.
/// - **Forced open / disabled**: set by hand with [`force_open`](Self::force_open) and
///   [`disable`](Self::disable), left with [`reset`](Self::reset).
///
/// Calls dropped before they finish (an outer timeout gave up) are recorded as the
/// [`CancelPolicy`](super::CancelPolicy) says, so a timeout above the breaker cannot hide an
/// outage from it. State changes are logged with `tracing` (warn on open, info on close),
/// published on a `watch` channel ([`subscribe`](Self::subscribe)) and given to the
/// [`on_state_change`](CircuitBreakerConfig::on_state_change) hook.
///
/// How it behaves, over a stand-in for a Redis that is down:
///
/// ```
/// use tower::{Layer, Service, ServiceExt, service_fn};
/// use tower_redis_resilience::{
///     Error, Request,
///     circuit_breaker::{BreakerState, CircuitBreakerConfig, CircuitBreakerLayer, SlidingWindow},
/// };
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let breaker = CircuitBreakerLayer::new(
///     CircuitBreakerConfig::new()
///         .sliding_window(SlidingWindow::Count(10))
///         .minimum_calls(5),
/// )?;
/// let down = service_fn(|_: Request| async { Err::<redis::Value, _>(Error::unavailable("down")) });
/// let mut redis = breaker.layer(down);
/// let get = || Request::from(redis::cmd("GET").arg("k").to_owned());
///
/// for _ in 0..5 {
///     let err = redis.ready().await?.call(get()).await.unwrap_err();
///     assert!(err.is_unavailable());
/// }
/// assert_eq!(breaker.state(), BreakerState::Open);
/// let err = redis.ready().await?.call(get()).await.unwrap_err();
/// assert!(err.is_circuit_open()); // without calling the inner service
/// assert_eq!(breaker.metrics().failure_rate, Some(100.0));
/// # Ok(()) }
/// ```
///
/// In a stack over a real connection:
///
/// ```no_run
/// use tower::ServiceBuilder;
/// use tower_redis_resilience::{
///     Client, Connector,
///     circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer},
///     reconnect::{Reconnect, ReconnectConfig},
/// };
///
/// # async fn run() -> Result<(), tower_redis_resilience::Error> {
/// let redis = Reconnect::lazy(Connector::from_url("redis://127.0.0.1:6379")?, ReconnectConfig::new())?;
/// let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new())?;
/// // Probe as soon as a new connection is up instead of waiting out `wait_in_open`.
/// breaker.half_open_on_reconnect(redis.state())?;
/// let client = Client::new(ServiceBuilder::new().layer(breaker.clone()).service(redis));
/// println!("breaker is {:?}", breaker.state());
/// # let _ = client; Ok(()) }
/// ```
#[derive(Clone)]
#[must_use]
pub struct CircuitBreakerLayer {
    pub(super) shared: Arc<Leased<Shared>>,
}

impl CircuitBreakerLayer {
    /// A breaker with these settings; a setting out of range is a
    /// [configuration](Error::is_config) error.
    pub fn new(config: CircuitBreakerConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(CircuitBreakerLayer {
            shared: Shared::new(config),
        })
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        self.shared.state()
    }

    /// The state now and as it changes.
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.shared.subscribe()
    }

    /// Window counts, rates and rejections.
    pub fn metrics(&self) -> BreakerMetrics {
        self.shared.metrics()
    }

    /// Reject every call until [`reset`](Self::reset) (a maintenance switch).
    pub fn force_open(&self) {
        self.shared.force_open();
    }

    /// Let every call through and record nothing until [`reset`](Self::reset).
    pub fn disable(&self) {
        self.shared.disable();
    }

    /// Close the breaker with an empty window, whatever its state.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Go half-open as soon as `connection` (from
    /// [`Reconnect::state`](crate::reconnect::Reconnect::state)) reports a new connection
    /// while the breaker is open, instead of waiting out `wait_in_open`: after a restart
    /// the app is served again within milliseconds of Redis accepting connections.
    /// `wait_in_open` still ends an open period when no reconnect happens (a stalled
    /// server). While the breaker is closed, a new connection clears its window: the
    /// calls in it were the lost connection's, and with few calls a second they would
    /// reach `minimum_calls` only after Redis is back, opening the breaker on an outage
    /// that has ended (measured at 10 calls a second through a connection silently
    /// dropped: it opened 0.6 s after calls were served again, and refused them for 2 s).
    /// The calls in flight then are not counted either when they end (their timeouts
    /// come after). A connection put back because it answered a `PING` (Redis slow, not
    /// gone) keeps them. A cluster's master found gone or stalled, and fenced off (its
    /// slots' requests answered at once, unsent), counts as a new connection here: the
    /// calls that failed on it before opened the breaker for every node's calls, and
    /// kept it open for its wait while the other masters served. Spawns a task on the current tokio runtime that ends when the breaker or
    /// the connection is dropped (or the runtime shuts down: a rejection on another
    /// runtime then starts one there); without a runtime it is a
    /// [configuration](Error::is_config) error.
    pub fn half_open_on_reconnect(
        &self,
        connection: watch::Receiver<ConnectionState>,
    ) -> Result<(), Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::config("half_open_on_reconnect must be called within a tokio runtime")
        })?;
        self.shared.follow(&runtime, connection);
        Ok(())
    }

    /// A breaker that is disabled from the start: it lets every call through and records
    /// nothing. What the builder puts in place of a removed breaker, so the stack keeps
    /// one type.
    pub(crate) fn off() -> Self {
        CircuitBreakerLayer {
            shared: Shared::disabled(CircuitBreakerConfig::default()),
        }
    }
}

impl Default for CircuitBreakerLayer {
    /// The [default settings](CircuitBreakerConfig), which are always valid.
    fn default() -> Self {
        CircuitBreakerLayer {
            shared: Shared::new(CircuitBreakerConfig::default()),
        }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            shared: self.shared.clone(),
        }
    }
}

impl fmt::Debug for CircuitBreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("config", &self.shared.config)
            .field("metrics", &self.metrics())
            .finish()
    }
}
