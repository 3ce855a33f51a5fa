use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use crate::{Error, RedisService, backoff::ExponentialBackoff};

type OnConnect<S> =
    Arc<dyn Fn(S) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send>> + Send + Sync>;

/// How [`Reconnect`](super::Reconnect) behaves when the connection is lost.
///
/// The default schedule is made for short blips and long outages alike: an attempt at
/// once, then one every 25 ms (±50 %) for the first 2 s, so a restart or failover is
/// noticed within a few tens of milliseconds; then exponential from 50 ms, doubling, with
/// full jitter, capped at 1 s. Against a server that refuses at once that costs about 40
/// attempts per second per client for 2 s, then one every ½ s on average.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_resilience::{backoff::ExponentialBackoff, reconnect::ReconnectConfig};
///
/// let config = ReconnectConfig::new()
///     .backoff(ExponentialBackoff::new(Duration::from_millis(25), Duration::from_secs(1)))
///     .max_wait(Duration::from_millis(50))
///     .health_check(Duration::from_secs(1), Duration::from_millis(250))
///     .on_connect(|mut redis| async move {
///         use tower::{Service, ServiceExt};
///         let name = redis::cmd("CLIENT").arg("SETNAME").arg("checkout-api").to_owned();
///         redis.ready().await?.call(name.into()).await.map(|_| ())
///     });
/// # let _ = config;
/// ```
///
/// `S` is the connection's service: [`RedisService`] unless a custom
/// [`MakeConnection`](crate::MakeConnection) opens something else.
#[must_use]
pub struct ReconnectConfig<S = RedisService> {
    pub(super) backoff: ExponentialBackoff,
    pub(super) stuck_after: u32,
    pub(super) max_wait: Duration,
    pub(super) health_check: Option<(Duration, Duration)>,
    pub(super) on_connect: Option<OnConnect<S>>,
}

impl<S> Clone for ReconnectConfig<S> {
    fn clone(&self) -> Self {
        ReconnectConfig {
            backoff: self.backoff.clone(),
            stuck_after: self.stuck_after,
            max_wait: self.max_wait,
            health_check: self.health_check,
            on_connect: self.on_connect.clone(),
        }
    }
}

impl<S> Default for ReconnectConfig<S> {
    fn default() -> Self {
        ReconnectConfig {
            backoff: ExponentialBackoff::new(Duration::from_millis(50), Duration::from_secs(1))
                .fast_phase(Duration::from_millis(25), Duration::from_secs(2)),
            stuck_after: 3,
            max_wait: Duration::ZERO,
            health_check: None,
            on_connect: None,
        }
    }
}

impl ReconnectConfig<RedisService> {
    /// The defaults, for connections opened by a [`Connector`](crate::Connector). (With a
    /// custom [`MakeConnection`](crate::MakeConnection), use `ReconnectConfig::default()`.)
    pub fn new() -> Self {
        ReconnectConfig::default()
    }
}

impl<S> ReconnectConfig<S> {
    /// The schedule of delays between connection attempts. A fresh schedule starts with
    /// each outage; when it ends (`max_attempts`, `max_elapsed`) the state becomes
    /// [`Failed`](super::ConnectionState::Failed).
    pub fn backoff(mut self, backoff: ExponentialBackoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Replace the connection after this many calls in a row were cancelled (an outer
    /// timeout dropped them, say) with no reply in between: a connection to a stalled
    /// server or a half-open TCP connection never fails by itself. Blocking commands do
    /// not count. `0` turns this off. Default 3.
    pub fn stuck_after(mut self, cancelled_calls: u32) -> Self {
        self.stuck_after = cancelled_calls;
        self
    }

    /// While reconnecting, let calls wait up to this long for the connection instead of
    /// failing at once. Default zero: fail fast with an unavailable error saying which
    /// attempt is under way and when the next one comes.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Send `PING` every `interval` and replace the connection if it gets no reply within
    /// `timeout`, so a dead connection is found before a user request finds it.
    pub fn health_check(mut self, interval: Duration, timeout: Duration) -> Self {
        self.health_check = Some((interval, timeout));
        self
    }

    /// Run this on every new connection before it serves calls (`CLIENT SETNAME`,
    /// `SCRIPT LOAD`...). If it fails, the connection is dropped and the attempt counts as
    /// failed.
    pub fn on_connect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(S) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        self.on_connect = Some(Arc::new(move |redis| Box::pin(hook(redis))));
        self
    }
}

impl<S> fmt::Debug for ReconnectConfig<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReconnectConfig")
            .field("backoff", &self.backoff)
            .field("stuck_after", &self.stuck_after)
            .field("max_wait", &self.max_wait)
            .field("health_check", &self.health_check)
            .field("on_connect", &self.on_connect.as_ref().map(|_| "<hook>"))
            .finish()
    }
}
