//! An open breaker rejects without allocating: counted with a global allocator.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    future::{Future, ready},
    pin::pin,
    task::{Context, Poll, Waker},
    time::Duration,
};

use redis::Value;
use tower::{Layer, Service, service_fn};
use tower_redis_resilience::{
    Error, Request,
    circuit_breaker::{BreakerState, CircuitBreakerConfig, CircuitBreakerLayer},
};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
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
