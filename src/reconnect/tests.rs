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
