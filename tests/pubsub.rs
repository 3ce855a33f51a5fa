//! The Pub/Sub subscriber against real redis-server processes: messages, subscriptions
//! made again after a restart, a stalled server found by PING, a slow application told what
//! it missed.

mod support;

use std::time::Duration;

use support::{RedisServer, eventually};
use tower_redis_resilience::{
    Connector, ResilientClient,
    backoff::{ExponentialBackoff, Jitter},
    pubsub::{Event, Events, Subscriber, SubscriberConfig},
    reconnect::ConnectionState,
};

/// The next event, within 5 s.
async fn next(events: &mut Events) -> Event {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event within 5 s")
        .expect("the subscriber runs")
}

/// The next event, which must be a message: its channel, pattern and payload.
async fn message(events: &mut Events) -> (String, Option<String>, String) {
    match next(events).await {
        Event::Message(msg) => (
            msg.get_channel_name().to_owned(),
            msg.get_pattern::<Option<String>>().unwrap(),
            msg.get_payload().unwrap(),
        ),
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Waits (5 s at most) until the subscriber is connected, its subscriptions made.
async fn until_connected(subscriber: &Subscriber) {
    let mut state = subscriber.state();
    tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|state| *state == ConnectionState::Connected),
    )
    .await
    .expect("connected within 5 s")
    .unwrap();
}

fn publish(server: &RedisServer, channel: &str, payload: &str) -> String {
    server.raw_command(&["PUBLISH", channel, payload])
}

/// Waits until Redis has written everything it owes its subscribers to their sockets:
/// `PUBLISH` answers once a message is queued for them, and a process killed right after
/// may not have sent it.
async fn until_sent_to_subscribers(server: &RedisServer) {
    eventually(Duration::from_secs(5), async || {
        let clients = server.raw_command(&["CLIENT", "LIST"]);
        let subscribers: Vec<&str> = clients
            .lines()
            .filter(|client| client.contains(" sub=1") || client.contains(" psub=1"))
            .collect();
        !subscribers.is_empty()
            && subscribers
                .iter()
                .all(|client| client.contains(" obl=0 ") && client.contains(" oll=0 "))
    })
    .await;
}

async fn subscriber(server: &RedisServer, config: SubscriberConfig) -> (Subscriber, Events) {
    let connector = Connector::from_url(&server.url()).unwrap();
    Subscriber::connect(connector, config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arrive_and_subscriptions_come_back_after_a_restart() {
    let mut server = RedisServer::start();
    let (subscriber, mut events) = subscriber(&server, SubscriberConfig::new()).await;
    subscriber.subscribe("news").await.unwrap();
    subscriber.psubscribe("user:*").await.unwrap();

    assert_eq!(publish(&server, "news", "a"), "1");
    assert_eq!(
        message(&mut events).await,
        ("news".into(), None, "a".into())
    );
    assert_eq!(publish(&server, "user:7", "b"), "1");
    assert_eq!(
        message(&mut events).await,
        ("user:7".into(), Some("user:*".into()), "b".into())
    );

    server.kill();
    assert!(
        matches!(next(&mut events).await, Event::Disconnected { error } if error.is_unavailable())
    );
    server.restart();
    assert!(matches!(
        next(&mut events).await,
        Event::Resubscribed { .. }
    ));
    assert_eq!(*subscriber.state().borrow(), ConnectionState::Connected);
    // Both subscriptions are back: each PUBLISH reaches one subscriber.
    assert_eq!(publish(&server, "news", "c"), "1");
    assert_eq!(
        message(&mut events).await,
        ("news".into(), None, "c".into())
    );
    assert_eq!(publish(&server, "user:8", "d"), "1");
    assert_eq!(message(&mut events).await.2, "d");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_is_found_by_ping_and_the_subscriber_comes_back() {
    let server = RedisServer::start();
    let config = SubscriberConfig::new()
        .ping_interval(Duration::from_millis(100))
        .reply_timeout(Duration::from_millis(100));
    let (subscriber, mut events) = subscriber(&server, config).await;
    subscriber.subscribe("news").await.unwrap();

    // A stalled server keeps the socket open: without a PING the subscriber could not
    // tell it from a quiet channel.
    server.pause();
    let lost = next(&mut events).await;
    server.resume();
    assert!(
        matches!(&lost, Event::Disconnected { error } if error.is_timeout()),
        "{lost:?}"
    );
    assert!(matches!(
        next(&mut events).await,
        Event::Resubscribed { .. }
    ));
    // One subscriber: the stalled connection was closed, not kept beside the new one.
    assert_eq!(publish(&server, "news", "back"), "1");
    assert_eq!(message(&mut events).await.2, "back");
}

/// A slow Redis (every reply 700 ms late, through a proxy) still delivers: the subscriber
/// keeps its connection, and its subscriptions, instead of taking each late `PING` for a
/// lost connection, reconnecting, and losing what was published meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_keeps_its_subscriber_and_the_messages_come() {
    let server = RedisServer::start();
    let proxy = support::FaultProxy::start(server.port()).await;
    let connector = Connector::from_url(&proxy.url()).unwrap();
    let (subscriber, mut events) = Subscriber::connect(connector, SubscriberConfig::new())
        .await
        .unwrap();
    subscriber.subscribe("news").await.unwrap();

    proxy.delay_replies(Duration::from_millis(700));
    // Three PINGs' time.
    for n in 0..3 {
        assert_eq!(publish(&server, "news", &n.to_string()), "1");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for n in 0..3 {
        assert_eq!(message(&mut events).await.2, n.to_string());
    }
    assert_eq!(proxy.connections(), 1, "never reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_that_falls_behind_is_told_how_many_messages_it_missed() {
    let server = RedisServer::start();
    let (subscriber, mut events) = subscriber(&server, SubscriberConfig::new().buffer(2)).await;
    subscriber.subscribe("news").await.unwrap();
    for n in 1..=10 {
        assert_eq!(publish(&server, "news", &n.to_string()), "1");
    }
    // Loopback delivers them within microseconds; the subscriber reads them meanwhile.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(message(&mut events).await.2, "1");
    assert_eq!(message(&mut events).await.2, "2");
    assert_eq!(publish(&server, "news", "11"), "1");
    let lagged = next(&mut events).await;
    assert!(matches!(lagged, Event::Lagged { missed: 8 }), "{lagged:?}");
    assert_eq!(message(&mut events).await.2, "11");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribed_channels_get_nothing_and_stay_unsubscribed() {
    let mut server = RedisServer::start();
    let (subscriber, mut events) = subscriber(&server, SubscriberConfig::new()).await;
    subscriber.subscribe(&["a", "b"]).await.unwrap();
    subscriber.unsubscribe("a").await.unwrap();
    assert_eq!(publish(&server, "a", "x"), "0");
    assert_eq!(publish(&server, "b", "y"), "1");
    assert_eq!(message(&mut events).await.0, "b");

    server.kill();
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected { .. }
    ));
    // Changes made while there is no connection are made on the next one.
    subscriber.subscribe("c").await.unwrap();
    subscriber.unsubscribe("b").await.unwrap();
    server.restart();
    assert!(matches!(
        next(&mut events).await,
        Event::Resubscribed { .. }
    ));
    assert_eq!(publish(&server, "a", "x"), "0");
    assert_eq!(publish(&server, "b", "x"), "0");
    assert_eq!(publish(&server, "c", "z"), "1");
    assert_eq!(message(&mut events).await.0, "c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_subscriber_subscribes_once_redis_is_up() {
    let mut server = RedisServer::start();
    server.kill();
    let connector = Connector::from_url(&server.url()).unwrap();
    let (subscriber, mut events) = Subscriber::lazy(connector, SubscriberConfig::new()).unwrap();
    subscriber.subscribe("news").await.unwrap();
    assert_ne!(*subscriber.state().borrow(), ConnectionState::Connected);
    server.restart();
    until_connected(&subscriber).await;
    assert_eq!(publish(&server, "news", "first"), "1");
    assert_eq!(message(&mut events).await.2, "first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_events_closes_the_connection() {
    let server = RedisServer::start();
    let (subscriber, events) = subscriber(&server, SubscriberConfig::new()).await;
    subscriber.subscribe("news").await.unwrap();
    assert_eq!(publish(&server, "news", "x"), "1");
    drop(events);
    eventually(Duration::from_secs(5), async || {
        publish(&server, "news", "x") == "0"
    })
    .await;
    let err = subscriber.subscribe("other").await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_config_error_without_the_password() {
    let server = RedisServer::config().password("right").start();
    let url = format!("redis://:wrong-secret@127.0.0.1:{}", server.port());
    let connector = Connector::from_url(&url).unwrap();
    let err = Subscriber::connect(connector, SubscriberConfig::new())
        .await
        .unwrap_err();
    assert!(err.is_config(), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("wrong-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_connector_subscribes_on_the_master() {
    let master = RedisServer::start();
    let sentinel = RedisServer::sentinel_of(&master, "cache");
    let connector = Connector::sentinel([sentinel.url()], "cache", "redis://cache/0").unwrap();
    let (subscriber, mut events) = Subscriber::connect(connector, SubscriberConfig::new())
        .await
        .unwrap();
    subscriber.subscribe("news").await.unwrap();
    assert_eq!(publish(&master, "news", "via sentinel"), "1");
    assert_eq!(message(&mut events).await.2, "via sentinel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_makes_a_subscriber_to_the_same_redis() {
    let server = RedisServer::config().password("pw").start();
    let client = ResilientClient::builder(&server.url()).build().unwrap();
    let (subscriber, mut events) = client.subscriber(SubscriberConfig::new()).unwrap();
    subscriber.subscribe("news").await.unwrap();
    until_connected(&subscriber).await;
    assert_eq!(publish(&server, "news", "hello"), "1");
    assert_eq!(message(&mut events).await.2, "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_behind_does_not_hold_up_the_reconnect() {
    let mut server = RedisServer::start();
    let (subscriber, mut events) = subscriber(&server, SubscriberConfig::new().buffer(2)).await;
    subscriber.subscribe("news").await.unwrap();
    assert_eq!(publish(&server, "news", "1"), "1");
    assert_eq!(publish(&server, "news", "2"), "1");
    until_sent_to_subscribers(&server).await;
    // The application reads nothing meanwhile: its buffer is full.
    server.kill();
    server.restart();
    until_connected(&subscriber).await;
    assert_eq!(publish(&server, "news", "3"), "1", "subscribed again");
    assert_eq!(message(&mut events).await.2, "1");
    assert_eq!(message(&mut events).await.2, "2");
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected { .. }
    ));
    assert!(matches!(
        next(&mut events).await,
        Event::Resubscribed { .. }
    ));
    // "3" follows them, or, if it reached the subscriber while they still waited for
    // room, its loss is counted.
    match next(&mut events).await {
        Event::Lagged { missed: 1 } => {}
        Event::Message(message) => assert_eq!(message.get_payload::<String>().unwrap(), "3"),
        other => panic!("{other:?}"),
    }
}

/// Over TLS with a CA of its own: messages, and the subscription back after a restart.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_messages_arrive_and_the_subscription_comes_back_after_a_restart() {
    let certificates = support::certificates();
    let mut server = RedisServer::config()
        .tls_beside_plain(certificates.path())
        .start();
    let connector = Connector::from_url(&server.url())
        .unwrap()
        .tls_certificates(support::trust(server.ca_certificate()))
        .unwrap();
    let (subscriber, mut events) = Subscriber::connect(connector, SubscriberConfig::new())
        .await
        .unwrap();
    subscriber.subscribe("news").await.unwrap();
    assert_eq!(publish(&server, "news", "a"), "1");
    assert_eq!(message(&mut events).await.2, "a");

    server.kill();
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected { .. }
    ));
    server.restart();
    assert!(matches!(
        next(&mut events).await,
        Event::Resubscribed { .. }
    ));
    assert_eq!(publish(&server, "news", "b"), "1");
    assert_eq!(message(&mut events).await.2, "b");
}

/// How many connections a subscriber that sends a `PING` every 20 ms opens in 3 s through
/// a load balancer or firewall that lets connections open and resets each one once it
/// has answered `pings` of them (0: at its first request). The backoff schedule is 50,
/// 100, 200, 400, 800 ms, then 1 s steps, with no jitter.
async fn connections_opened_when_reset_after(pings: u64) -> u64 {
    let server = RedisServer::start();
    let proxy = support::FaultProxy::start(server.port()).await;
    let connector = || Connector::from_url(&proxy.url()).unwrap();
    // The handshake's bytes and a `PING`'s reply, from a first connection.
    let measuring = SubscriberConfig::new().ping_interval(Duration::from_millis(100));
    let (first, _events) = Subscriber::connect(connector(), measuring).await.unwrap();
    let handshake = proxy.first_connection_bytes();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let pong = proxy.first_connection_bytes() - handshake;
    assert!(handshake > 0 && pong > 0);
    drop(first);
    proxy.cut_each_connection_after(handshake + pings * pong);

    let backoff = ExponentialBackoff::new(Duration::from_millis(50), Duration::from_secs(1))
        .jitter(Jitter::None);
    let config = SubscriberConfig::new()
        .backoff(backoff)
        .ping_interval(Duration::from_millis(20));
    let (subscriber, mut events) = Subscriber::connect(connector(), config).await.unwrap();
    let drained = tokio::spawn(async move { while events.recv().await.is_some() {} });
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(subscriber);
    drained.abort();
    // Not the first, which measured.
    proxy.connections() - 1
}

/// Each connection breaks before it delivered anything, so the next is opened at the
/// schedule's pace, not at once, as it was: one every `PING` interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_at_their_first_request_are_opened_at_the_backoff_pace() {
    // The subscriber's first is replaced at once; the next ones opened at ~90, ~210,
    // ~430, ~850 ms, ~1.67 and ~2.69 s. Before: one every ~20 ms, ~150.
    let opened = connections_opened_when_reset_after(0).await;
    assert!((3..=10).contains(&opened), "{opened} connections in 3 s");
}

/// Each connection answers a `PING`, then breaks at the next: it was of use, so the next
/// is opened at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_after_answering_are_opened_again_at_once() {
    // One every ~40 ms.
    let opened = connections_opened_when_reset_after(1).await;
    assert!(opened >= 30, "{opened} connections in 3 s");
}
