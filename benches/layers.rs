//! What each layer costs per call on the healthy path, over an in-memory leaf that answers
//! at once: the layers' own overhead, with no network in the way.
//!
//! `cargo bench --bench layers`

use std::{
    future::{Future, Ready, ready},
    hint::black_box,
    pin::pin,
    task::{Context, Poll, Waker},
};

use criterion::{Criterion, criterion_group, criterion_main};
use redis::Value;
use tokio::runtime::{Builder, Runtime};
use tower::{Layer, Service, ServiceExt};
use tower_redis_resilience::{
    Error, MakeConnection, Request,
    reconnect::{Reconnect, ReconnectConfig},
    retry::RetryLayer,
};

/// A leaf that answers `OK` at once.
#[derive(Clone)]
struct Memory;

impl Service<Request> for Memory {
    type Response = Value;
    type Error = Error;
    type Future = Ready<Result<Value, Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request) -> Self::Future {
        ready(Ok(Value::Okay))
    }
}

struct MemoryConnector;

impl MakeConnection for MemoryConnector {
    type Connection = Memory;

    async fn connect(&self) -> Result<Memory, Error> {
        Ok(Memory)
    }

    fn address(&self) -> &str {
        "memory"
    }
}

fn runtime() -> Runtime {
    Builder::new_current_thread().enable_all().build().unwrap()
}

/// Polls a future that completes at once: no runtime in the measurement.
fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the healthy path over an in-memory leaf never waits"),
    }
}

fn bench_one<S>(c: &mut Criterion, name: &str, mut service: S)
where
    S: Service<Request, Response = Value, Error = Error>,
{
    let request = Request::from(redis::cmd("GET").arg("k").to_owned());
    c.bench_function(name, |b| {
        b.iter(|| {
            now(async {
                let reply = service
                    .ready()
                    .await
                    .unwrap()
                    .call(black_box(request.clone()))
                    .await;
                black_box(reply).unwrap()
            })
        })
    });
}

fn layers(c: &mut Criterion) {
    let rt = runtime();
    let reconnect = rt
        .block_on(Reconnect::connect(
            MemoryConnector,
            ReconnectConfig::default(),
        ))
        .unwrap();

    // Entered so layers that need a runtime find one; the measured calls never use it.
    let _guard = rt.enter();
    bench_one(c, "healthy/leaf alone", Memory);
    bench_one(c, "healthy/Reconnect", reconnect.clone());
    bench_one(c, "healthy/Retry", RetryLayer::default().layer(Memory));
    bench_one(
        c,
        "healthy/Retry+Reconnect",
        RetryLayer::default().layer(reconnect),
    );
}

criterion_group!(benches, layers);
criterion_main!(benches);
