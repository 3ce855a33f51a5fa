//! What the layer benches share: in-memory leaves (one that answers at once, one that
//! waits once as a network call does) and the default stack built over them.

#![allow(dead_code)] // each bench uses its own part of this

use std::{
    future::{Future, Ready, ready},
    pin::Pin,
    task::{Context, Poll},
};

use redis::Value;
use tower::{Service, ServiceExt, util::BoxCloneSyncService};
use tower_redis_resilience::{
    Error, MakeConnection, Request,
    circuit_breaker::CircuitBreakerLayer,
    fallback::FallbackLayer,
    metrics::MetricsLayer,
    reconnect::{Reconnect, ReconnectConfig},
    retry::RetryLayer,
    timeout::TimeoutLayer,
    trace::TraceLayer,
};

/// A leaf that answers at once with `$reply`.
macro_rules! answering_at_once {
    ($(#[$doc:meta])* $name:ident => $reply:expr) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name;

        impl Service<Request> for $name {
            type Response = Value;
            type Error = Error;
            type Future = Ready<Result<Value, Error>>;

            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, _: Request) -> Self::Future {
                ready($reply)
            }
        }
    };
}

answering_at_once! {
    /// A leaf that answers `OK` at once.
    Memory => Ok(Value::Okay)
}

answering_at_once! {
    /// A leaf that refuses at once, as an open breaker does: the floor a rejection is
    /// measured against (the harness and the error's own cost, with no layer).
    Refusing => Err(Error::circuit_open(std::time::Duration::from_secs(1)))
}

/// A leaf whose answer is not ready at the first poll, as a network call's never is: the
/// layers' full cost, clock readings included.
#[derive(Clone)]
pub struct Waiting;

pub struct WaitOnce(bool);

impl Future for WaitOnce {
    type Output = Result<Value, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.0 {
            return Poll::Ready(Ok(Value::Okay));
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Service<Request> for Waiting {
    type Response = Value;
    type Error = Error;
    type Future = WaitOnce;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request) -> WaitOnce {
        WaitOnce(false)
    }
}

/// Connects by handing out a clone of its leaf.
pub struct LeafConnector<S>(pub S);

impl<S> MakeConnection for LeafConnector<S>
where
    S: Service<Request, Response = Value, Error = Error, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static,
{
    type Connection = S;

    async fn connect(&self) -> Result<S, Error> {
        Ok(self.0.clone())
    }

    fn address(&self) -> &str {
        "memory"
    }
}

/// The default stack `ResilientClient` assembles, over `redis`: `Fallback → Metrics →
/// Trace → CircuitBreaker → Timeout → Retry → redis`.
pub fn full_stack<S>(
    redis: S,
    breaker: CircuitBreakerLayer,
) -> impl Service<Request, Response = Value, Error = Error, Future: Send> + Clone + Send + Sync + 'static
where
    S: Service<Request, Response = Value, Error = Error> + Clone + Send + Sync + 'static,
    S::Future: Send,
{
    let metrics = MetricsLayer::new();
    tower::ServiceBuilder::new()
        .layer(FallbackLayer::default().record_to(metrics.registry().clone()))
        .layer(metrics)
        .layer(TraceLayer::new())
        .layer(breaker)
        .layer(TimeoutLayer::default())
        .layer(RetryLayer::default())
        .service(redis)
}

/// [`full_stack`] as a hand-built stack whose layers are chosen at run time gets it with
/// `ServiceBuilder::option_layer`: every layer an `Either`, boxed to one type.
/// (`ResilientClient` always holds [`full_stack`]: a layer removed there is switched off
/// in place.)
pub fn built_stack<S>(redis: S) -> BoxCloneSyncService<Request, Value, Error>
where
    S: Service<Request, Response = Value, Error = Error> + Clone + Send + Sync + 'static,
    S::Future: Send,
{
    let metrics = MetricsLayer::new();
    BoxCloneSyncService::new(
        tower::ServiceBuilder::new()
            .option_layer(Some(
                FallbackLayer::default().record_to(metrics.registry().clone()),
            ))
            .option_layer(Some(metrics))
            .option_layer(Some(TraceLayer::new()))
            .option_layer(Some(CircuitBreakerLayer::default()))
            .option_layer(Some(TimeoutLayer::default()))
            .option_layer(Some(RetryLayer::default()))
            .service(redis),
    )
}

/// `GET k`.
pub fn get() -> Request {
    Request::from(redis::cmd("GET").arg("k").to_owned())
}

/// A `Reconnect` over `connector`, connected, with the default settings.
pub async fn reconnect_over<M: MakeConnection>(connector: M) -> Reconnect<M> {
    Reconnect::connect(connector, ReconnectConfig::default())
        .await
        .unwrap()
}

/// `calls` GETs through `service`, one after another, each checked `Ok`.
pub async fn call_n<S>(service: &mut S, calls: u64)
where
    S: Service<Request, Response = Value, Error = Error>,
{
    let request = get();
    for _ in 0..calls {
        let reply = service
            .ready()
            .await
            .unwrap()
            .call(std::hint::black_box(request.clone()))
            .await;
        assert!(std::hint::black_box(reply).is_ok());
    }
}
