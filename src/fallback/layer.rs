use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use redis::Value;
use tokio::time::Instant;
use tower::Layer;

use super::Fallback;
use crate::{
    Error, Request,
    directory::{self, Key},
    metrics::{Outcome, Registry},
};

/// What a [`FallbackLayer`] answers for a call that failed because Redis could not
/// answer ([unavailable](Error::is_unavailable), [timeout](Error::is_timeout) or
/// [circuit open](Error::is_circuit_open)). Server and configuration errors always pass
/// through unchanged, whatever the policy.
#[derive(Clone)]
#[non_exhaustive]
pub enum FallbackPolicy {
    /// Read-only commands and read-only pipelines answer a miss: `Nil` (so
    /// `get::<_, Option<T>>` gives `Ok(None)`, `Vec` and map types come back empty, and
    /// `bool` false), or one `Nil` per key, field, member or index asked for where the
    /// reply has a slot for each (`MGET`, `HMGET`, `SMISMEMBER`, `ZMSCORE`, `GEOPOS`,
    /// `GEOHASH`, `HTTL`, `HPTTL`, `HEXPIRETIME`, `HPEXPIRETIME`, `ARMGET`, `JSON.MGET`),
    /// so `Vec<Option<T>>` keeps its length; a pipeline answers each command as it would
    /// alone. Writes keep their error. The default.
    ///
    /// A plain integer or `String` cannot hold a miss: redis-rs fails to convert the
    /// `Nil` ("value was nil"). Read what may be answered by a fallback as `Option<T>`:
    /// `scard::<_, Option<u64>>`, `strlen::<_, Option<u64>>`.
    ReadsOnly,
    /// Reads as [`ReadsOnly`](Self::ReadsOnly); writes answer this value (`Value::Okay`,
    /// `Value::Int(0)`, `Value::Nil`...), and a pipeline mixing both answers each
    /// command its own. For data you can afford to lose, such as a cache fill.
    ReadsAndWrites(Value),
    /// Your function decides from the request and the error: `Some(value)` answers the
    /// value, `None` keeps the error.
    Custom(FallbackFn),
}

/// The function of a [`FallbackPolicy::Custom`].
pub type FallbackFn = Arc<dyn Fn(&Request, &Error) -> Option<Value> + Send + Sync>;

impl FallbackPolicy {
    /// A [`Custom`](Self::Custom) policy from a function.
    pub fn custom<F>(answer: F) -> Self
    where
        F: Fn(&Request, &Error) -> Option<Value> + Send + Sync + 'static,
    {
        FallbackPolicy::Custom(Arc::new(answer))
    }
}

impl fmt::Debug for FallbackPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FallbackPolicy::ReadsOnly => f.write_str("ReadsOnly"),
            FallbackPolicy::ReadsAndWrites(value) => {
                f.debug_tuple("ReadsAndWrites").field(value).finish()
            }
            FallbackPolicy::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Degrades instead of failing: while Redis cannot answer, reads answer "nothing there",
/// so a cache read becomes a cache miss and the application carries on.
///
/// A call that fails as [unavailable](Error::is_unavailable), [timeout](Error::is_timeout)
/// or [circuit open](Error::is_circuit_open) is answered as the [`FallbackPolicy`] says
/// (default: reads answer `Nil`, writes keep their error). Server errors (`WRONGTYPE`)
/// and configuration errors always pass through: they are bugs to see, not outages to
/// hide.
///
/// Never silent: every fallback is counted ([`fallbacks`](Self::fallbacks), and as the
/// `fallback` outcome in a metrics [`Registry`] given with
/// [`record_to`](Self::record_to)), logged at `debug`, and summed up in one `warn` at most
/// every [`warn_every`](Self::warn_every) (default 10 s): an outage produces a line every
/// few seconds, not one per request.
///
/// Put it outermost (`Fallback → Metrics → CircuitBreaker → Timeout → ...`), so it
/// answers for every failure below, and the metrics below it still see each failure.
///
/// ```
/// use tower::{Layer, Service, ServiceExt, service_fn};
/// use tower_redis_resilience::{Error, Request, fallback::FallbackLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let fallback = FallbackLayer::default();
/// let down = service_fn(|_: Request| async { Err::<redis::Value, _>(Error::unavailable("down")) });
/// let mut redis = fallback.layer(down);
///
/// let get = Request::from(redis::cmd("GET").arg("k"));
/// assert_eq!(redis.ready().await?.call(get).await?, redis::Value::Nil);
/// let set = Request::from(redis::cmd("SET").arg("k").arg("v"));
/// assert!(redis.ready().await?.call(set).await.unwrap_err().is_unavailable());
/// assert_eq!(fallback.fallbacks(), 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use]
pub struct FallbackLayer {
    shared: Arc<Shared>,
}

#[derive(Clone)]
pub(super) struct Settings {
    pub(super) policy: FallbackPolicy,
    /// False for a layer that stands in for a removed one: it answers for nothing.
    pub(super) on: bool,
    registry: Option<Registry>,
    warn_every: Duration,
}

/// What every service of one layer shares. Registered in the [directory](crate::directory)
/// so a call's future holds its key, not a reference count.
pub(super) struct Shared {
    pub(super) settings: Settings,
    pub(super) key: Key,
    fallbacks: AtomicU64,
    origin: Instant,
    /// Nanoseconds after `origin` before which no warning is logged.
    quiet_until: AtomicU64,
    /// Fallbacks since the last warning.
    unreported: AtomicU64,
}

impl Shared {
    fn create(settings: Settings) -> Arc<Shared> {
        directory::register(|key| Shared {
            settings,
            key,
            fallbacks: AtomicU64::new(0),
            origin: Instant::now(),
            quiet_until: AtomicU64::new(0),
            unreported: AtomicU64::new(0),
        })
    }

    /// Counts and reports one fallback.
    pub(super) fn fell_back(&self, command: &'static str, error: &Error) {
        self.fallbacks.fetch_add(1, Relaxed);
        if let Some(registry) = &self.settings.registry {
            registry.record(command, Outcome::Fallback, Duration::ZERO);
        }
        tracing::debug!(command, %error, "redis call answered by its fallback");
        self.unreported.fetch_add(1, Relaxed);
        let now = nanos(self.origin.elapsed());
        let quiet_until = self.quiet_until.load(Relaxed);
        let next = now.saturating_add(nanos(self.settings.warn_every));
        if now < quiet_until
            || self
                .quiet_until
                .compare_exchange(quiet_until, next, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        // Exactly one caller per period gets here and reports what piled up.
        let count = self.unreported.swap(0, Relaxed);
        tracing::warn!(
            fallbacks = count,
            last_command = command,
            last_error = %error,
            "redis calls answered by fallback values (reads as misses) since the last report"
        );
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        directory::unregister(self.key);
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl FallbackLayer {
    /// A layer with `policy`.
    pub fn new(policy: FallbackPolicy) -> Self {
        FallbackLayer {
            shared: Shared::create(Settings {
                policy,
                on: true,
                registry: None,
                warn_every: Duration::from_secs(10),
            }),
        }
    }

    /// Also records every fallback in `registry`, as the `fallback` outcome of its
    /// command (usually the registry of the [metrics layer](crate::metrics::MetricsLayer)
    /// below this one).
    pub fn record_to(self, registry: Registry) -> Self {
        self.configure(|settings| settings.registry = Some(registry))
    }

    /// The shortest time between two `warn` lines summing up fallbacks. Default: 10 s.
    pub fn warn_every(self, period: Duration) -> Self {
        self.configure(|settings| settings.warn_every = period)
    }

    /// How many failed calls the services of this layer answered with a fallback.
    pub fn fallbacks(&self) -> u64 {
        self.shared.fallbacks.load(Relaxed)
    }

    /// The policy.
    pub fn policy(&self) -> &FallbackPolicy {
        &self.shared.settings.policy
    }

    /// Settings are given before the layer makes services: a changed layer starts
    /// afresh (count included) rather than changing the services it already made.
    fn configure(self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.shared.settings.clone();
        change(&mut settings);
        FallbackLayer {
            shared: Shared::create(settings),
        }
    }

    /// A layer that answers for no call: every result passes through untouched. What the
    /// builder puts in place of a removed fallback, so the stack keeps one type.
    pub(crate) fn off() -> Self {
        FallbackLayer::default().configure(|settings| settings.on = false)
    }
}

impl Default for FallbackLayer {
    /// Reads answer misses, writes keep their errors.
    fn default() -> Self {
        FallbackLayer::new(FallbackPolicy::ReadsOnly)
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;

    fn layer(&self, inner: S) -> Fallback<S> {
        Fallback {
            inner,
            shared: self.shared.clone(),
        }
    }
}

impl fmt::Debug for FallbackLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("policy", &self.shared.settings.policy)
            .field("fallbacks", &self.fallbacks())
            .finish_non_exhaustive()
    }
}
