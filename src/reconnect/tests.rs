//! The reconnect layer's own logic over the in-memory leaf, on a paused clock.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use super::*;
use crate::testing::{self, Leaf};

/// Hands out the in-memory leaf and counts the connections it opened.
#[derive(Clone, Default)]
struct Counting {
    opened: Arc<AtomicUsize>,
}

impl Counting {
    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }
}

impl MakeConnection for Counting {
    type Connection = Leaf;

    async fn connect(&self) -> Result<Leaf, Error> {
        self.opened.fetch_add(1, Ordering::SeqCst);
        Ok(Leaf::default())
    }

    fn address(&self) -> &str {
        "memory"
    }
}

/// Redis away: every connect fails.
struct Down;

impl MakeConnection for Down {
    type Connection = Leaf;

    async fn connect(&self) -> Result<Leaf, Error> {
        Err(Error::unavailable("connection refused"))
    }

    fn address(&self) -> &str {
        "memory"
    }
}

#[tokio::test(start_paused = true)]
async fn a_loop_of_calls_failed_while_reconnecting_lets_the_reconnect_loop_run() {
    let mut redis = Reconnect::lazy(Down, ReconnectConfig::default()).unwrap();
    assert!(
        testing::others_run_while_failing(&mut redis, 1000).await,
        "1000 calls failed fast in a row never yielded"
    );
}

async fn connected(interval: Option<Duration>) -> (Reconnect<Counting>, Counting) {
    let connector = Counting::default();
    let config = ReconnectConfig::default().reconnect_on_readonly(interval);
    let redis = Reconnect::connect(connector.clone(), config).await.unwrap();
    (redis, connector)
}

/// Writes that a replica refuses, each followed by a read, which never fails: the
/// connection keeps serving while its replacement is made.
async fn refused_writes(redis: &mut Reconnect<Counting>, n: usize) {
    for _ in 0..n {
        let error = testing::call(redis, testing::command("SET", "readonly", 0))
            .await
            .unwrap_err();
        assert_eq!(error.server_code(), Some("READONLY"), "{error}");
        assert!(error.is_unavailable() && !error.may_have_run(), "{error}");
        testing::call(redis, testing::get("ok", 0)).await.unwrap();
        // Let the replacement run.
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_readonly_reply_replaces_the_connection_at_most_once_per_interval() {
    let (mut redis, connector) = connected(Some(Duration::from_secs(1))).await;
    assert_eq!(connector.opened(), 1);

    refused_writes(&mut redis, 20).await;
    assert_eq!(
        connector.opened(),
        2,
        "the first READONLY reconnects, the rest wait"
    );

    tokio::time::advance(Duration::from_millis(999)).await;
    refused_writes(&mut redis, 20).await;
    assert_eq!(connector.opened(), 2, "still within the interval");

    tokio::time::advance(Duration::from_millis(1)).await;
    refused_writes(&mut redis, 20).await;
    assert_eq!(connector.opened(), 3, "one more once the interval is over");
}

#[tokio::test(start_paused = true)]
async fn readonly_replies_keep_the_connection_when_turned_off() {
    let (mut redis, connector) = connected(None).await;
    refused_writes(&mut redis, 20).await;
    tokio::time::advance(Duration::from_secs(5)).await;
    refused_writes(&mut redis, 20).await;
    assert_eq!(connector.opened(), 1);
}

#[tokio::test(start_paused = true)]
async fn other_server_errors_keep_the_connection() {
    let (mut redis, connector) = connected(Some(Duration::ZERO)).await;
    for _ in 0..20 {
        let error = testing::call(&mut redis, testing::command("SET", "server", 0))
            .await
            .unwrap_err();
        assert!(error.is_server(), "{error}");
        tokio::task::yield_now().await;
    }
    assert_eq!(connector.opened(), 1);
}

/// Calls `behaviour` on `redis` once a millisecond for `period` of the paused clock.
async fn call_every_millisecond(
    redis: &mut Reconnect<Counting>,
    behaviour: &str,
    period: Duration,
) {
    let end = tokio::time::Instant::now() + period;
    while tokio::time::Instant::now() < end {
        let _ = testing::call(redis, testing::get(behaviour, 0)).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Breaks the connection with a call; answers whether another was opened at once.
async fn broken_then_reopened_at_once(
    redis: &mut Reconnect<Counting>,
    connector: &Counting,
) -> bool {
    let before = connector.opened();
    let _ = testing::call(redis, testing::get("broken", 0)).await;
    tokio::task::yield_now().await;
    connector.opened() == before + 1
}

#[tokio::test(start_paused = true)]
async fn connections_that_break_as_soon_as_they_open_are_opened_at_the_schedules_pace() {
    let connector = Counting::default();
    let backoff =
        crate::backoff::ExponentialBackoff::new(Duration::from_millis(50), Duration::from_secs(1))
            .jitter(crate::backoff::Jitter::None);
    let config = ReconnectConfig::default().backoff(backoff);
    let mut redis = Reconnect::connect(connector.clone(), config).await.unwrap();

    // Every connection breaks at its first call. The first one had lived since the start
    // of the outage it ended, as far as anyone knows: it is replaced at once. Each later
    // one broke within a millisecond of opening, so the schedule goes on: 50, 100, 200,
    // 400, 800 ms, then 1 s steps.
    call_every_millisecond(&mut redis, "broken", Duration::from_secs(5)).await;
    // Opened at 0, ~0, ~51 ms, ~152, ~353, ~754, ~1.55 s, ~2.56, ~3.56 and ~4.56 s.
    assert_eq!(connector.opened(), 10, "one per step, not one per call");

    // The next opens at ~5.56 s, with no call made. Having lived a second unanswered, it
    // ends a new outage: it is replaced at once.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(connector.opened(), 11);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(broken_then_reopened_at_once(&mut redis, &connector).await);

    // So is one that answered a call, however young: it was of use.
    testing::call(&mut redis, testing::get("ok", 0))
        .await
        .unwrap();
    assert!(broken_then_reopened_at_once(&mut redis, &connector).await);
    testing::call(&mut redis, testing::get("ok", 0))
        .await
        .unwrap();
}

#[test]
fn reads_go_aside_but_writes_and_pfcount_which_a_write_pause_holds() {
    let request = |args: &[&str]| {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        Request::from(cmd)
    };
    let pipeline = |commands: &[&[&str]]| {
        let mut pipeline = redis::pipe();
        for args in commands {
            let cmd = pipeline.cmd(args[0]);
            for arg in &args[1..] {
                cmd.arg(*arg);
            }
        }
        Request::from(pipeline)
    };
    assert!(goes_aside(&request(&["GET", "k"])));
    assert!(goes_aside(&request(&["EXISTS", "k"])));
    assert!(goes_aside(&pipeline(&[&["GET", "a"], &["HGETALL", "b"]])));
    assert!(!goes_aside(&request(&["SET", "k", "v"])));
    assert!(!goes_aside(&request(&["PFCOUNT", "h"])));
    assert!(!goes_aside(&request(&["pfcount", "h"])));
    assert!(!goes_aside(&pipeline(&[&["GET", "a"], &["PFCOUNT", "h"]])));
    assert!(!goes_aside(&pipeline(&[&["GET", "a"], &["INCR", "n"]])));
}
