use std::{
    collections::VecDeque,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use redis::{RedisError, Value};
use tower::{Service, ServiceExt};

use super::*;
use crate::backoff::Jitter;

/// Answers each call with the next scripted result and counts the calls.
#[derive(Clone)]
struct Script {
    results: Arc<Mutex<VecDeque<Result<Value, Error>>>>,
    calls: Arc<AtomicUsize>,
}

impl Script {
    fn new(results: Vec<Result<Value, Error>>) -> Self {
        Script {
            results: Arc::new(Mutex::new(results.into())),
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request> for Script {
    type Response = Value;
    type Error = Error;
    type Future = std::future::Ready<Result<Value, Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let next = self.results.lock().unwrap().pop_front();
        std::future::ready(next.unwrap_or(Ok(Value::Okay)))
    }
}

fn broken_after_send() -> Error {
    Error::from_request(RedisError::from(io::Error::from(
        io::ErrorKind::ConnectionReset,
    )))
}

fn not_sent() -> Error {
    Error::reconnecting(1, None)
}

fn request(args: &[&str]) -> Request {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    Request::from(cmd)
}

async fn send<S>(service: &mut S, args: &[&str]) -> Result<Value, Error>
where
    S: Service<Request, Response = Value, Error = Error>,
{
    service.ready().await?.call(request(args)).await
}

fn layer() -> RetryLayer {
    RetryLayer::new(
        2,
        ExponentialBackoff::new(Duration::from_millis(10), Duration::from_millis(100))
            .jitter(Jitter::None),
        RetryBudget::new(0.2, 10),
    )
}

#[tokio::test(start_paused = true)]
async fn idempotent_read_is_retried_after_a_broken_connection() {
    let script = Script::new(vec![Err(broken_after_send()), Ok(Value::Int(7))]);
    let mut service = layer().layer(script.clone());
    let started = tokio::time::Instant::now();
    let reply = send(&mut service, &["GET", "k"]).await;
    assert_eq!(reply.unwrap(), Value::Int(7));
    assert_eq!(script.calls(), 2);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(10),
        "one backoff step"
    );
}

#[tokio::test(start_paused = true)]
async fn incr_that_may_have_run_is_never_resent() {
    let script = Script::new(vec![Err(broken_after_send())]);
    let mut service = layer().layer(script.clone());
    let err = send(&mut service, &["INCR", "n"]).await.unwrap_err();
    assert!(err.may_have_run());
    assert_eq!(script.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn counting_writes_are_resent_unless_the_layer_says_not_to() {
    let script = Script::new(vec![Err(broken_after_send()), Ok(Value::Int(0))]);
    let mut service = layer().layer(script.clone());
    assert_eq!(
        send(&mut service, &["SADD", "s", "m"]).await.unwrap(),
        Value::Int(0)
    );
    assert_eq!(script.calls(), 2, "resent by default");

    let careful = layer().resend_counting_writes(false);
    let script = Script::new(vec![Err(broken_after_send())]);
    let mut service = careful.layer(script.clone());
    let err = send(&mut service, &["SADD", "s", "m"]).await.unwrap_err();
    assert!(err.may_have_run());
    assert_eq!(
        script.calls(),
        1,
        "a resend could answer 0 for the first sighting"
    );
    // Still resent: a write whose reply does not count, and one that never left.
    let script = Script::new(vec![Err(broken_after_send()), Ok(Value::Okay)]);
    let mut service = careful.layer(script.clone());
    assert_eq!(
        send(&mut service, &["SET", "k", "v"]).await.unwrap(),
        Value::Okay
    );
    let script = Script::new(vec![Err(not_sent()), Ok(Value::Int(1))]);
    let mut service = careful.layer(script.clone());
    assert_eq!(
        send(&mut service, &["SADD", "s", "m"]).await.unwrap(),
        Value::Int(1)
    );

    // Set on a layer already in use: a layer of its own, the original unchanged.
    let shared = layer();
    let _in_use = shared.layer(Script::new(Vec::new()));
    let changed = shared.clone().resend_counting_writes(false);
    let script = Script::new(vec![Err(broken_after_send())]);
    send(&mut changed.layer(script.clone()), &["DEL", "k"])
        .await
        .unwrap_err();
    assert_eq!(script.calls(), 1);
    let script = Script::new(vec![Err(broken_after_send()), Ok(Value::Int(1))]);
    send(&mut shared.layer(script.clone()), &["DEL", "k"])
        .await
        .unwrap();
    assert_eq!(script.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn incr_that_never_left_the_client_is_retried() {
    let script = Script::new(vec![Err(not_sent()), Err(not_sent()), Ok(Value::Int(1))]);
    let mut service = layer().layer(script.clone());
    let started = tokio::time::Instant::now();
    let reply = send(&mut service, &["INCR", "n"]).await;
    assert_eq!(reply.unwrap(), Value::Int(1));
    assert_eq!(script.calls(), 3);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(30),
        "10 ms, then 20 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn a_multi_key_command_told_to_try_again_is_retried() {
    // TRYAGAIN: a cluster slot on the move; Redis did not run it and asks for a resend.
    let tryagain =
        crate::error::server(b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n");
    let script = Script::new(vec![Err(tryagain), Ok(Value::Int(2))]);
    let mut service = layer().layer(script.clone());
    let reply = send(&mut service, &["SUNIONSTORE", "{t}d", "{t}a", "{t}b"]).await;
    assert_eq!(reply.unwrap(), Value::Int(2));
    assert_eq!(script.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn timeouts_server_errors_open_circuits_lasting_refusals_and_suspect_connections_are_not_retried()
 {
    let wrongtype = crate::error::server(b"-WRONGTYPE x\r\n");
    for error in [
        Error::timed_out(Duration::from_millis(5)),
        wrongtype,
        Error::circuit_open(Duration::from_secs(1)),
        Error::config("bad"),
        // Refusals that last seconds: a resend within milliseconds is refused again.
        crate::error::server(b"-LOADING Redis is loading the dataset in memory\r\n"),
        crate::error::server(b"-BUSY Redis is busy running a script.\r\n"),
        crate::error::server(b"-MASTERDOWN Link with MASTER is down\r\n"),
        crate::error::server(b"-CLUSTERDOWN The cluster is down\r\n"),
        // Unsent while a PING asks whether the connection is stuck: the answer takes
        // longer than the calls that timed out did.
        Error::suspect(),
    ] {
        let script = Script::new(vec![Err(error.clone())]);
        let mut service = layer().layer(script.clone());
        let result = send(&mut service, &["GET", "k"]).await;
        assert!(result.is_err());
        assert_eq!(script.calls(), 1, "{error:?} was retried");
    }
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_max_retries() {
    let script = Script::new(vec![
        Err(not_sent()),
        Err(not_sent()),
        Err(not_sent()),
        Ok(Value::Nil),
    ]);
    let mut service = layer().layer(script.clone());
    let err = send(&mut service, &["GET", "k"]).await.unwrap_err();
    assert!(err.is_unavailable());
    assert_eq!(script.calls(), 3, "one call and two retries");
}

#[tokio::test(start_paused = true)]
async fn budget_is_shared_by_every_service_of_one_layer_and_bounds_retries() {
    let layer = RetryLayer::new(
        5,
        ExponentialBackoff::new(Duration::from_millis(1), Duration::from_millis(1)),
        RetryBudget::new(0.0, 3),
    );
    let script = Script::new((0..100).map(|_| Err(not_sent())).collect());
    // A stack rebuilt per call, as axum does, still draws on one budget.
    for _ in 0..4 {
        let mut service = layer.layer(script.clone());
        let _ = send(&mut service, &["GET", "k"]).await;
    }
    assert_eq!(
        script.calls(),
        4 + 3,
        "four calls, and only the budget's three retries"
    );
    assert_eq!(layer.budget_available(), 0);
}

#[tokio::test(start_paused = true)]
async fn every_call_through_one_service_earns_the_budget_a_deposit() {
    let layer = RetryLayer::new(
        1,
        ExponentialBackoff::new(Duration::from_millis(1), Duration::from_millis(1)),
        RetryBudget::new(0.5, 1),
    );
    let script = Script::new(vec![]);
    let mut service = layer.layer(script.clone());
    // Spend the reserve, then let ten successful calls on the same service refill it.
    assert!(layer.settings.budget.withdraw());
    for _ in 0..10 {
        send(&mut service, &["GET", "k"]).await.unwrap();
    }
    assert_eq!(
        layer.budget_available(),
        1,
        "ten calls at 0.5 refill the one-retry reserve"
    );
}

#[tokio::test(start_paused = true)]
async fn a_layer_switched_off_never_retries_and_keeps_the_budget_as_it_was() {
    let script = Script::new(vec![Err(not_sent()), Ok(Value::Int(7))]);
    let layer = RetryLayer::off();
    let budget = layer.budget_available();
    let mut service = layer.layer(script.clone());
    let err = send(&mut service, &["GET", "k"]).await.unwrap_err();
    assert!(err.is_unavailable());
    assert_eq!(
        script.calls(),
        1,
        "the same call is retried by a layer that is on"
    );
    assert_eq!(layer.budget_available(), budget);
}
