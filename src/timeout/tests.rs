//! Deadlines under a paused clock, with the in-memory leaf.

use std::time::Duration;

use redis::Value;
use tokio::time::{Instant, advance};
use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::testing::{Capture, Leaf, command};

const MS: Duration = Duration::from_millis(1);

fn timeouts(layer: TimeoutLayer) -> Timeout<Leaf> {
    layer.layer(Leaf::default())
}

/// Sends the request and answers its result and how long it took on the paused clock.
async fn timed(service: &mut Timeout<Leaf>, request: Request) -> (Result<Value, Error>, Duration) {
    let start = Instant::now();
    let result = service.ready().await.unwrap().call(request).await;
    (result, start.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_times_out_at_the_default_with_command_and_deadline() {
    let mut service = timeouts(TimeoutLayer::new(250 * MS));
    let (result, took) = timed(&mut service, command("GET", "hang", 0)).await;
    let err = result.unwrap_err();
    assert!(err.is_timeout());
    assert_eq!(err.command(), Some("GET"));
    assert_eq!(err.timeout(), Some(250 * MS));
    assert_eq!(took, 250 * MS);
    assert_eq!(err.to_string(), "GET: timed out after 250ms");
}

#[tokio::test(start_paused = true)]
async fn an_answer_within_the_deadline_passes_through() {
    let mut service = timeouts(TimeoutLayer::new(250 * MS));
    let (result, took) = timed(&mut service, command("GET", "ok", 249)).await;
    assert_eq!(result.unwrap(), Value::Okay);
    assert_eq!(took, 249 * MS);
    // Errors from below are not turned into timeouts.
    let (result, _) = timed(&mut service, command("GET", "fail", 10)).await;
    assert!(result.unwrap_err().is_unavailable());
}

#[tokio::test(start_paused = true)]
async fn an_answer_arriving_with_the_deadline_wins() {
    let mut service = timeouts(TimeoutLayer::new(250 * MS));
    let (result, _) = timed(&mut service, command("GET", "ok", 250)).await;
    assert_eq!(result.unwrap(), Value::Okay);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_runs_from_the_call_not_the_first_poll() {
    let mut service = timeouts(TimeoutLayer::new(250 * MS));
    let start = Instant::now();
    let future = service
        .ready()
        .await
        .unwrap()
        .call(command("GET", "hang", 0));
    advance(100 * MS).await;
    assert!(future.await.unwrap_err().is_timeout());
    assert_eq!(start.elapsed(), 250 * MS);
}

#[tokio::test(start_paused = true)]
async fn a_request_with_a_deadline_of_its_own_gets_it_whatever_the_layer_would_give() {
    let layer = TimeoutLayer::new(250 * MS)
        .command("GET", 100 * MS)
        .unwrap()
        .blocking_cap(Duration::from_secs(1));
    let mut service = timeouts(layer);
    let own = command("GET", "hang", 0).with_deadline(10 * MS);
    let (result, took) = timed(&mut service, own).await;
    let err = result.unwrap_err();
    assert!(err.is_timeout() && err.is_own_deadline(), "{err:?}");
    assert_eq!((err.timeout(), took), (Some(10 * MS), 10 * MS));
    assert_eq!(
        err.to_string(),
        "GET: timed out after 10ms, its own deadline"
    );
    // Longer than the layer's, and for a blocking command past the cap, too.
    let own = command("GET", "ok", 400).with_deadline(500 * MS);
    assert_eq!(timed(&mut service, own).await.0.unwrap(), Value::Okay);
    let mut blpop = redis::cmd("BLPOP");
    blpop.arg("hang").arg(0).arg(0);
    let own = Request::from(blpop).with_deadline(Duration::from_secs(3));
    let (result, took) = timed(&mut service, own).await;
    assert!(result.unwrap_err().is_own_deadline());
    assert_eq!(took, Duration::from_secs(3));
    // The layer's own deadlines are not the request's.
    let (result, _) = timed(&mut service, command("GET", "hang", 0)).await;
    let err = result.unwrap_err();
    assert!(err.is_timeout() && !err.is_own_deadline(), "{err:?}");
    // A removed timeout layer enforces nothing.
    let mut off = timeouts(TimeoutLayer::off());
    let own = command("GET", "ok", 50).with_deadline(10 * MS);
    let (result, took) = timed(&mut off, own).await;
    assert_eq!((result.unwrap(), took), (Value::Okay, 50 * MS));
}

#[tokio::test(start_paused = true)]
async fn per_command_overrides_replace_the_default() {
    let layer = TimeoutLayer::new(250 * MS)
        .command("keys", 2 * Duration::from_secs(1))
        .unwrap();
    let mut service = timeouts(layer);
    let (result, took) = timed(&mut service, command("KEYS", "ok", 1500)).await;
    assert_eq!(result.unwrap(), Value::Okay);
    assert_eq!(took, 1500 * MS);
    let (result, took) = timed(&mut service, command("KEYS", "hang", 0)).await;
    assert_eq!(result.unwrap_err().timeout(), Some(2000 * MS));
    assert_eq!(took, 2000 * MS);
    let (_, took) = timed(&mut service, command("GET", "hang", 0)).await;
    assert_eq!(took, 250 * MS);
}

#[tokio::test(start_paused = true)]
async fn a_blocking_command_gets_its_block_time_plus_the_grace() {
    let mut service = timeouts(TimeoutLayer::new(250 * MS));
    // BLPOP hang 5: blocks 5 s (its last argument), never answers.
    let (result, took) = timed(&mut service, command("BLPOP", "hang", 5)).await;
    assert_eq!(took, 5250 * MS);
    assert_eq!(result.unwrap_err().timeout(), Some(5250 * MS));
    // An answer after 4 s is on time.
    let (result, _) = timed(&mut service, command("BLPOP", "ok", 4000)).await;
    assert_eq!(result.unwrap(), Value::Okay);

    let mut service = timeouts(TimeoutLayer::new(250 * MS).blocking_grace(MS));
    let (_, took) = timed(&mut service, command("BLPOP", "hang", 5)).await;
    assert_eq!(took, 5001 * MS);
}

#[tokio::test(start_paused = true)]
async fn blocking_forever_is_unbounded_unless_capped() {
    let mut service = timeouts(TimeoutLayer::new(250 * MS));
    let mut future = std::pin::pin!(
        service
            .ready()
            .await
            .unwrap()
            .call(command("BLPOP", "hang", 0))
    );
    tokio::select! {
        _ = &mut future => panic!("BLPOP k 0 must wait as long as Redis does"),
        () = tokio::time::sleep(Duration::from_secs(24 * 3600)) => {}
    }

    let cap = Duration::from_secs(30);
    let mut service = timeouts(TimeoutLayer::new(250 * MS).blocking_cap(cap));
    let (result, took) = timed(&mut service, command("BLPOP", "hang", 0)).await;
    assert_eq!((result.unwrap_err().timeout(), took), (Some(cap), cap));
    // The cap bounds finite blocks too.
    let (_, took) = timed(&mut service, command("BLPOP", "hang", 60)).await;
    assert_eq!(took, cap);
}

#[tokio::test(start_paused = true)]
async fn a_pipeline_gets_one_deadline_for_the_whole_batch() {
    let mut pipe = redis::pipe();
    pipe.cmd("GET")
        .arg("hang")
        .arg(0)
        .cmd("GET")
        .arg("k")
        .cmd("GET")
        .arg("k");
    let mut service = timeouts(TimeoutLayer::new(100 * MS).pipeline(400 * MS));
    let (result, took) = timed(&mut service, Request::from(&pipe)).await;
    let err = result.unwrap_err();
    assert_eq!(
        (err.command(), err.timeout()),
        (Some("PIPELINE"), Some(400 * MS))
    );
    assert_eq!(took, 400 * MS);

    // Without a pipeline deadline, the default covers the batch.
    let mut service = timeouts(TimeoutLayer::new(100 * MS));
    let (_, took) = timed(&mut service, Request::from(&pipe)).await;
    assert_eq!(took, 100 * MS);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_too_long_to_represent_means_none() {
    let mut service = timeouts(TimeoutLayer::new(Duration::MAX));
    let mut future = std::pin::pin!(
        service
            .ready()
            .await
            .unwrap()
            .call(command("GET", "hang", 0))
    );
    tokio::select! {
        _ = &mut future => panic!("no deadline"),
        () = tokio::time::sleep(Duration::from_secs(3600)) => {}
    }
}

#[test]
fn an_override_for_a_command_that_does_not_exist_is_a_config_error() {
    let err = TimeoutLayer::default()
        .command("GETT", Duration::from_secs(1))
        .unwrap_err();
    assert!(err.is_config());
    assert!(err.to_string().contains("`GETT`"), "{err}");
}

#[test]
fn the_layer_reports_the_deadline_each_request_gets() {
    let layer = TimeoutLayer::default()
        .command("CONFIG GET", 3 * Duration::from_secs(1))
        .unwrap();
    let deadline = |cmd: &redis::Cmd| layer.deadline_for(&Request::from(cmd));
    assert_eq!(deadline(redis::cmd("GET").arg("k")), Some(250 * MS));
    assert_eq!(
        deadline(redis::cmd("config").arg("get").arg("maxmemory")),
        Some(3000 * MS)
    );
    assert_eq!(
        deadline(
            redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(1500)
                .arg("STREAMS")
                .arg("s")
                .arg("$")
        ),
        Some(1750 * MS)
    );
    assert_eq!(deadline(redis::cmd("WAIT").arg(1).arg(0)), None);
}

#[tokio::test(start_paused = true)]
async fn concurrent_calls_each_time_out_at_their_own_deadline() {
    let layer = TimeoutLayer::new(300 * MS)
        .command("HGET", 50 * MS)
        .unwrap();
    let start = Instant::now();
    let call = |request: Request| {
        let mut service = timeouts(layer.clone());
        async move {
            let result = service.ready().await.unwrap().call(request).await;
            (result, start.elapsed())
        }
    };
    // The long deadline first: the driver then sleeps until 300 ms, and must be told
    // of the earlier one.
    let long = tokio::spawn(call(command("GET", "hang", 0)));
    tokio::task::yield_now().await;
    let short = tokio::spawn(call(command("HGET", "hang", 0)));
    let answered = tokio::spawn(call(command("GET", "ok", 100)));
    let (short, answered, long) = (
        short.await.unwrap(),
        answered.await.unwrap(),
        long.await.unwrap(),
    );
    assert!(short.0.unwrap_err().is_timeout());
    assert_eq!(short.1, 50 * MS);
    assert_eq!(answered.0.unwrap(), Value::Okay);
    assert_eq!(answered.1, 100 * MS);
    assert!(long.0.unwrap_err().is_timeout());
    assert_eq!(long.1, 300 * MS);
    assert_eq!(layer.timer.waiting(), 0, "every call gave its slot back");
}

#[tokio::test(start_paused = true)]
async fn answered_and_abandoned_calls_give_their_slot_back_at_once() {
    let layer = TimeoutLayer::new(250 * MS);
    let mut service = timeouts(layer.clone());
    let (result, _) = timed(&mut service, command("GET", "ok", 10)).await;
    assert_eq!(result.unwrap(), Value::Okay);
    assert_eq!(layer.timer.waiting(), 0);

    let abandoned = tokio::time::timeout(
        20 * MS,
        service
            .ready()
            .await
            .unwrap()
            .call(command("GET", "hang", 0)),
    )
    .await;
    assert!(abandoned.is_err());
    assert_eq!(
        layer.timer.waiting(),
        0,
        "a dropped call leaves no slot behind"
    );
}

/// A layer kept across runtimes, as a client shared by tests each with its own runtime:
/// the runtime that started the timer's driver is gone, or idle, and calls from another
/// runtime must still time out.
#[test]
fn calls_time_out_on_any_runtime_the_layer_is_used_from() {
    let layer = TimeoutLayer::new(30 * MS);
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    };
    let hang = |layer: TimeoutLayer| async move {
        let mut service = timeouts(layer);
        let call = service
            .ready()
            .await
            .unwrap()
            .call(command("GET", "hang", 0));
        tokio::time::timeout(Duration::from_secs(5), call).await
    };
    // From a task, the runtime is looked up once per task.
    let times_out = |rt: &tokio::runtime::Runtime, in_a_task: bool| {
        let started = std::time::Instant::now();
        let result = rt.block_on(async {
            if in_a_task {
                tokio::spawn(hang(layer.clone())).await.unwrap()
            } else {
                hang(layer.clone()).await
            }
        });
        assert!(
            result
                .expect("the layer's deadline, not the guard's")
                .unwrap_err()
                .is_timeout()
        );
        // A guard that fires polls the call once more, which then sees its deadline
        // passed: tell the layer's own timing from that.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "timed out by the guard"
        );
    };
    let first = runtime();
    times_out(&first, false);
    times_out(&first, true);
    // `first` is alive but idle: its driver cannot run. A task on another runtime, on
    // the same thread, must not take `first` for its own.
    let second = runtime();
    times_out(&second, true);
    times_out(&second, false);
    drop(first);
    drop(second);
    times_out(&runtime(), true);
    times_out(&runtime(), false);
    assert_eq!(layer.timer.waiting(), 0);
}

/// Polls a call outside any runtime, as `futures`' `block_on` on a thread of the app's
/// own does, until it ends or `limit` (real time) passes.
fn outside_a_runtime(service: &mut Timeout<Leaf>, limit: Duration) -> Option<Result<Value, Error>> {
    let future = service.call(command("GET", "hang", 0));
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if let std::task::Poll::Ready(result) = future.as_mut().poll(&mut cx) {
            return Some(result);
        }
        std::thread::sleep(MS);
    }
    None
}

#[test]
fn a_call_that_waits_outside_a_runtime_with_none_to_time_it_is_a_config_error_not_a_panic() {
    let mut service = timeouts(TimeoutLayer::new(30 * MS));
    let error = outside_a_runtime(&mut service, 10 * MS)
        .expect("an error at once")
        .unwrap_err();
    assert!(error.is_config(), "{error}");
    assert_eq!(error.command(), Some("GET"));
    // The leaf had it when the layer found it could not time it: it may be on its way.
    assert!(error.may_have_run(), "{error}");
}

/// A service with a 30 ms deadline, made on `runtime`.
fn made_on(runtime: &tokio::runtime::Runtime) -> Timeout<Leaf> {
    let _entered = runtime.enter();
    timeouts(TimeoutLayer::new(30 * MS))
}

/// A call made outside any runtime (another executor's `block_on` on a thread of the
/// app's own) while the runtime the layer was made on runs: its deadline is kept there,
/// as redis-rs's connection serves such a call from its task there. A `current_thread`
/// runtime runs its tasks only while a thread is in its `block_on`, so none is counted on.
#[test]
fn a_call_outside_a_runtime_is_timed_by_a_multi_threaded_one_the_layer_was_made_on() {
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .unwrap();
    let mut service = made_on(&multi);
    let started = std::time::Instant::now();
    let result = outside_a_runtime(&mut service, Duration::from_secs(5)).expect("timed out");
    assert!(result.unwrap_err().is_timeout());
    assert!(started.elapsed() >= 30 * MS);
    // Its driver on that runtime keeps the next one's too.
    assert!(
        outside_a_runtime(&mut service, Duration::from_secs(5))
            .expect("timed out")
            .unwrap_err()
            .is_timeout()
    );
    drop(multi);
    let error = outside_a_runtime(&mut service, 10 * MS)
        .expect("an error at once")
        .unwrap_err();
    assert!(error.is_config() && error.may_have_run(), "{error}");

    let single = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut service = made_on(&single);
    let error = outside_a_runtime(&mut service, 10 * MS)
        .expect("an error at once")
        .unwrap_err();
    assert!(error.is_config(), "{error}");
}

/// Spawned requests may outlive the client that made them: with the layer gone, they
/// keep their deadline, and the timer's driver stops once they are over.
#[tokio::test(start_paused = true)]
async fn calls_keep_their_deadline_after_the_layer_is_dropped_and_the_driver_then_stops() {
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let layer = TimeoutLayer::new(250 * MS);
    let mut service = timeouts(layer.clone());
    let start = Instant::now();
    // Waiting in the timer when the layer goes.
    let waiting = service.call(command("GET", "hang", 0));
    let waiting = tokio::spawn(async move { (waiting.await, start.elapsed()) });
    tokio::task::yield_now().await;
    assert_eq!(alive(), 2, "the call's task and the timer's driver");
    // Not polled yet when the layer goes: it takes its slot afterwards.
    let later = service.call(command("GET", "hang", 0));
    drop(service);
    drop(layer);
    advance(100 * MS).await;
    let later = tokio::spawn(async move { (later.await, start.elapsed()) });
    let (waiting, later) = (waiting.await.unwrap(), later.await.unwrap());
    assert!(waiting.0.unwrap_err().is_timeout());
    assert_eq!(waiting.1, 250 * MS);
    assert!(later.0.unwrap_err().is_timeout());
    assert_eq!(later.1, 250 * MS);
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    assert_eq!(alive(), 0, "the driver stopped");
}

#[tokio::test(start_paused = true)]
async fn a_layer_switched_off_gives_no_call_a_deadline() {
    let mut service = timeouts(TimeoutLayer::off());
    let (result, took) = timed(&mut service, command("GET", "ok", 5_000)).await;
    assert_eq!(result.unwrap(), Value::Okay);
    assert_eq!(took, 5_000 * MS);
}

/// A service whose calls, in turn, wait for the reply sent on the channels it answers.
fn replied_by_hand(
    calls: usize,
) -> (
    Timeout<impl Service<Request, Response = Value, Error = Error, Future: Send>>,
    Vec<tokio::sync::oneshot::Sender<Value>>,
) {
    let (replies, mut answers): (Vec<_>, Vec<_>) =
        (0..calls).map(|_| tokio::sync::oneshot::channel()).unzip();
    answers.reverse();
    let leaf = tower::service_fn(move |_: Request| {
        let answer = answers.pop().expect("a reply for each call");
        async move {
            answer
                .await
                .map_err(|_| Error::unavailable("never answered"))
        }
    });
    (TimeoutLayer::new(30 * MS).layer(leaf), replies)
}

/// The reply `reply` gets from the connection's task: it comes at 10 ms, and takes the
/// task a few turns to read, so the timer's driver runs first after a stall.
fn answer_at_10ms(reply: tokio::sync::oneshot::Sender<Value>) {
    tokio::spawn(async move {
        tokio::time::sleep(10 * MS).await;
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        let _ = reply.send(Value::Okay);
    });
}

/// The runtime's thread is blocked (a blocking call in a task, the process throttled or
/// descheduled) past a call's deadline while Redis answers it: the reply waits, unread,
/// for the task that reads the connection to run. On the real clock, as a stall is only
/// seen while tokio's clock runs with it.
#[tokio::test(flavor = "current_thread")]
async fn a_reply_that_comes_while_the_runtime_is_held_up_is_taken_not_timed_out() {
    let capture = Capture::default();
    let _guard = capture.install();
    let (mut service, mut replies) = replied_by_hand(1);
    let call = service.ready().await.unwrap().call(command("GET", "k", 0));
    let mut call = std::pin::pin!(call);
    assert!(
        futures::poll!(call.as_mut()).is_pending(),
        "waits in the timer"
    );
    answer_at_10ms(replies.remove(0));
    std::thread::sleep(100 * MS);
    assert_eq!(call.await.unwrap(), Value::Okay);
    // The application is told its runtime was held up.
    let warnings = warnings(&capture);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(
        (
            &*warnings[0].fields["stalls"],
            &*warnings[0].fields["calls"]
        ),
        ("1", "1")
    );
    let longest: f64 = warnings[0].fields["longest_ms"].parse().unwrap();
    assert!((50.0..1000.0).contains(&longest), "{longest}");
}

fn warnings(capture: &Capture) -> Vec<crate::testing::CapturedEvent> {
    capture
        .events()
        .into_iter()
        .filter(|event| event.level == tracing::Level::WARN)
        .collect()
}

/// The same with the timer's driver already asleep until an earlier call's deadline:
/// it wakes late for that one.
#[tokio::test(flavor = "current_thread")]
async fn a_stall_past_the_deadline_the_driver_sleeps_until_is_seen() {
    let (mut service, mut replies) = replied_by_hand(2);
    let unanswered = service.ready().await.unwrap().call(command("GET", "k", 0));
    let mut unanswered = std::pin::pin!(unanswered);
    assert!(futures::poll!(unanswered.as_mut()).is_pending());
    // The driver starts, and sleeps until that call's deadline.
    tokio::time::sleep(MS).await;
    let call = service.ready().await.unwrap().call(command("GET", "k", 0));
    let mut call = std::pin::pin!(call);
    assert!(futures::poll!(call.as_mut()).is_pending());
    answer_at_10ms(replies.remove(1));
    std::thread::sleep(100 * MS);
    assert_eq!(call.await.unwrap(), Value::Okay);
    assert!(unanswered.await.unwrap_err().is_timeout());
    drop(replies);
}

/// The grace a stall gives is the call's deadline at most, and given once: a call
/// nothing answers still times out.
#[tokio::test(flavor = "current_thread")]
async fn a_call_held_up_by_a_stall_and_never_answered_times_out_a_deadline_after_it() {
    let (mut service, _replies) = replied_by_hand(1);
    let call = service.ready().await.unwrap().call(command("GET", "k", 0));
    let mut call = std::pin::pin!(call);
    assert!(futures::poll!(call.as_mut()).is_pending());
    std::thread::sleep(100 * MS);
    let resumed = std::time::Instant::now();
    let err = call.await.unwrap_err();
    let took = resumed.elapsed();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(err.timeout(), Some(30 * MS), "the error names the deadline");
    assert!(took >= 25 * MS, "given its deadline again: {took:?}");
    assert!(took < Duration::from_secs(1), "given it once: {took:?}");
}

/// Under a paused clock neither a blocked thread nor a clock advanced by hand is a stall:
/// the call times out when the clock passes its deadline, as every test that pauses
/// time expects.
#[tokio::test(start_paused = true)]
async fn a_paused_clock_advanced_past_a_deadline_is_no_stall() {
    let capture = Capture::default();
    let _guard = capture.install();
    let (mut service, _replies) = replied_by_hand(1);
    let start = Instant::now();
    let call = service.ready().await.unwrap().call(command("GET", "k", 0));
    let mut call = std::pin::pin!(call);
    assert!(futures::poll!(call.as_mut()).is_pending());
    std::thread::sleep(50 * MS);
    advance(100 * MS).await;
    assert!(call.await.unwrap_err().is_timeout());
    assert_eq!(start.elapsed(), 100 * MS);
    assert!(warnings(&capture).is_empty());
}
