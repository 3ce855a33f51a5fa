//! Pub/Sub through a restart: a publisher sends a message every 20 ms through the
//! resilient client while a `Subscriber` listens; Redis is killed and restarted in between.
//! The subscriber reports the gap (`Disconnected`, then `Resubscribed`), and every message
//! Redis said it delivered (PUBLISH answered 1) arrives.
//!
//! `cargo run --example pubsub` starts a throwaway `redis-server` on a free loopback port
//! (it must be installed). With `REDIS_URL` set it uses that server and does not kill it.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use tower_redis_resilience::{
    ResilientClient,
    pubsub::{Event, SubscriberConfig},
};

const CHANNEL: &str = "example:ticks";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (url, mut server) = support::redis_url_or_throwaway_server();
    let client = ResilientClient::builder(&url).connect().await?;
    let (subscriber, mut events) = client.subscriber(SubscriberConfig::new())?;
    subscriber.subscribe(CHANNEL).await?;
    let mut connected = subscriber.state();
    connected
        .wait_for(|state| *state == tower_redis_resilience::reconnect::ConnectionState::Connected)
        .await?;

    let started = Instant::now();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::spawn(async move {
        let mut received = 0u64;
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                _ = &mut stopped => None,
            };
            let Some(event) = event else { break };
            let at = started.elapsed().as_millis();
            match event {
                Event::Message(_) => {
                    received += 1;
                    if received.is_multiple_of(25) {
                        println!("{at:>5} ms  {received} messages received");
                    }
                }
                Event::Disconnected { error } => println!("{at:>5} ms  disconnected: {error}"),
                Event::Resubscribed { down_for } => {
                    println!(
                        "{at:>5} ms  resubscribed after {down_for:?}: messages published meanwhile were missed"
                    )
                }
                Event::Lagged { missed } => println!("{at:>5} ms  fell behind: {missed} dropped"),
                other => println!("{at:>5} ms  {other:?}"),
            }
        }
        received
    });

    let mut publisher = client.clone();
    let publishing = tokio::spawn(async move {
        let (mut delivered, mut unheard, mut failed) = (0u64, 0u64, 0u64);
        for n in 0..150u32 {
            match publisher.publish::<_, _, u64>(CHANNEL, n).await {
                Ok(0) => unheard += 1,
                Ok(receivers) => delivered += receivers,
                Err(_) => failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (delivered, unheard, failed)
    });

    tokio::time::sleep(Duration::from_millis(1000)).await;
    if let Some(server) = &mut server {
        println!(
            "{:>5} ms  killing redis-server",
            started.elapsed().as_millis()
        );
        server.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("{:>5} ms  restarting it", started.elapsed().as_millis());
        server.restart();
    }
    let (delivered, unheard, failed) = publishing.await?;
    // Let the last messages arrive, then stop listening (dropping the events stops the
    // subscriber and closes its connection).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop.send(());
    let received = listener.await?;
    drop(server);
    println!(
        "published: {delivered} delivered to the subscriber, {unheard} before it had \
         subscribed again, {failed} failed while Redis was down; received: {received}"
    );
    assert_eq!(received, delivered, "every delivered message arrived");
    Ok(())
}
