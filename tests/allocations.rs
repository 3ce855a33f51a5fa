//! Allocations on hot paths, counted with a global allocator (per thread): an open
//! breaker rejects without allocating, and the leaf reuses the box of redis-rs's
//! ~1.3 KiB request future instead of allocating one per call.

mod support;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    future::{Future, ready},
    pin::pin,
    task::{Context, Poll, Waker},
    time::Duration,
};

use redis::Value;
use support::RedisServer;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_redis_resilience::{
    Error, RedisService, Request,
    circuit_breaker::{BreakerState, CircuitBreakerConfig, CircuitBreakerLayer},
};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// Of at least 1 KiB: glibc serves those outside its per-thread cache.
    static LARGE_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        if layout.size() >= 1024 {
            LARGE_ALLOCATIONS.with(|count| count.set(count.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn large_allocations() -> u64 {
    LARGE_ALLOCATIONS.with(Cell::get)
}

fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("answers at once"),
    }
}

#[test]
fn an_open_breaker_rejects_without_allocating() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .minimum_calls(5)
            .wait_in_open(Duration::from_secs(3600)),
    )
    .unwrap();
    let mut redis = breaker.layer(service_fn(|_: Request| {
        ready(Err::<Value, _>(Error::unavailable("down")))
    }));
    let request = Request::from(redis::cmd("GET").arg("k").to_owned());
    for _ in 0..5 {
        assert!(
            now(redis.call(request.clone()))
                .unwrap_err()
                .is_unavailable()
        );
    }
    assert_eq!(breaker.state(), BreakerState::Open);

    let before = allocations();
    for _ in 0..1_000 {
        let err = now(redis.call(request.clone())).unwrap_err();
        assert!(err.is_circuit_open() && err.command() == Some("GET"));
    }
    assert_eq!(allocations() - before, 0);
}

#[test]
fn the_leaf_reuses_the_box_of_a_finished_calls_future() {
    let server = RedisServer::start();
    // One thread: the calls, the connection's task and the counter share it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut redis = RedisService::connect(&server.url()).await.unwrap();
        let get = || Request::from(redis::cmd("GET").arg("k").to_owned());
        let set = Request::from(redis::cmd("SET").arg("k").arg("v").to_owned());
        redis.ready().await.unwrap().call(set).await.unwrap();
        // The first calls fill the connection's buffers and the thread's free boxes.
        for _ in 0..10 {
            let (first, second) = tokio::join!(redis.call(get()), redis.call(get()));
            assert!(first.is_ok() && second.is_ok());
        }

        let before = large_allocations();
        for _ in 0..200 {
            let reply = redis.ready().await.unwrap().call(get()).await.unwrap();
            assert_eq!(reply, Value::BulkString(b"v".to_vec()));
        }
        // Two at a time: the second call cannot take the box the first still holds.
        for _ in 0..100 {
            let (first, second) = tokio::join!(redis.call(get()), redis.call(get()));
            assert!(first.is_ok() && second.is_ok());
        }
        // A box per call would be 400. redis-rs's channel allocates a block of messages
        // now and then, which is not ours to save.
        let large = large_allocations() - before;
        assert!(
            large <= 10,
            "{large} allocations of 1 KiB or more in 400 calls"
        );
    });
}
