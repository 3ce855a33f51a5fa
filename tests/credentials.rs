//! Credentials asked for at every connect (`Connector::credentials`), against real
//! redis-server processes whose ACL user's password is rotated as a token service's would
//! be.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use redis::AsyncCommands;
use support::{RedisServer, TokenService, eventually};
use tower_redis_resilience::{
    Connector, Credentials, ResilientClient,
    pubsub::{Event, Subscriber, SubscriberConfig},
};

/// `connector` asking `tokens` for the password of the URL's user.
fn asking(tokens: &TokenService, connector: Connector) -> Connector {
    let tokens = tokens.clone();
    connector.credentials(move || {
        let token = tokens.take();
        async move { Ok::<_, std::io::Error>(Credentials::password_only(token)) }
    })
}

/// A server whose default user has a password of the harness's, with ACL user `app`
/// whose password is `token`.
fn server_with_app_user(token: &str) -> RedisServer {
    let server = RedisServer::config().password("harness-only").start();
    server.set_user_password("app", token);
    server
}

fn app_url(server: &RedisServer) -> String {
    format!("redis://app@127.0.0.1:{}", server.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_opened_after_a_rotation_authenticate_with_the_new_token() {
    let server = server_with_app_user("token-1");
    let tokens = TokenService::issuing("token-1");
    let connector = asking(&tokens, Connector::from_url(&app_url(&server)).unwrap());
    let mut client = ResilientClient::builder_with_connector(connector.clone())
        .connect()
        .await
        .unwrap();
    let (subscriber, mut events) = Subscriber::connect(connector, SubscriberConfig::new())
        .await
        .unwrap();
    subscriber.subscribe("news").await.unwrap();
    let _: () = client.set("k", "v").await.unwrap();
    let _: () = client.rpush("q", "first").await.unwrap();
    let popped: Option<(String, String)> = client.blpop("q", 1.0).await.unwrap();
    assert_eq!(popped, Some(("q".to_owned(), "first".to_owned())));
    assert_eq!(
        tokens.handed_out(),
        3,
        "the shared connection, the subscriber's and the BLPOP's"
    );

    tokens.issue("token-2");
    server.set_user_password("app", "token-2");
    server.close_connections_of_user("app");
    let fixed =
        Connector::from_url(&format!("redis://app:token-1@127.0.0.1:{}", server.port())).unwrap();
    let refused = fixed.connect().await.unwrap_err();
    assert!(
        refused.is_config(),
        "a password given once is refused after the rotation: {refused}"
    );

    eventually(Duration::from_secs(5), async || {
        client.get::<_, Option<String>>("k").await.ok().flatten() == Some("v".to_owned())
    })
    .await;
    let _: () = client.rpush("q", "second").await.unwrap();
    let popped: Option<(String, String)> = client.blpop("q", 1.0).await.unwrap();
    assert_eq!(popped, Some(("q".to_owned(), "second".to_owned())));
    let mut message = None;
    eventually(Duration::from_secs(5), async || {
        server.raw_command(&["PUBLISH", "news", "after"]);
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(100), events.recv()).await
        {
            if let Event::Message(msg) = event {
                message = Some(msg.get_payload::<String>().unwrap());
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(message.as_deref(), Some("after"));
    let clients = server.raw_command(&["CLIENT", "LIST"]);
    let as_app = clients.lines().filter(|l| l.contains(" user=app ")).count();
    assert!(
        as_app >= 3,
        "shared, blocking and subscriber connections, all as `app` again: {clients}"
    );
    assert!(
        tokens.handed_out() >= 6,
        "asked again for each: {}",
        tokens.handed_out()
    );
}

#[tokio::test]
async fn a_provider_that_fails_leaves_redis_unavailable_with_its_error_and_is_asked_again() {
    let server = server_with_app_user("token");
    let asked = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&asked);
    let connector = Connector::from_url(&app_url(&server))
        .unwrap()
        .credentials(move || {
            let attempt = counted.fetch_add(1, SeqCst);
            async move {
                if attempt < 2 {
                    return Err(std::io::Error::other("the token service is down"));
                }
                Ok(Credentials::new("app", "token"))
            }
        });

    let error = connector.connect().await.unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    assert!(
        error.to_string().contains("the token service is down"),
        "{error}"
    );
    let mut client = ResilientClient::builder_with_connector(connector)
        .build()
        .unwrap();
    eventually(Duration::from_secs(5), async || {
        client.set::<_, _, ()>("k", "v").await.is_ok()
    })
    .await;
    assert!(asked.load(SeqCst) >= 3);
}

#[tokio::test(start_paused = true)]
async fn a_provider_that_never_answers_is_cut_off_at_the_connect_timeout() {
    let connector = Connector::from_url("redis://app@127.0.0.1:1")
        .unwrap()
        .connect_timeout(Duration::from_millis(300))
        .credentials(std::future::pending::<Result<Credentials, std::io::Error>>);
    let start = tokio::time::Instant::now();
    let error = connector.connect().await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    assert!(error.is_unavailable(), "{error}");
}

#[tokio::test]
async fn a_refused_token_is_a_config_error_that_never_shows_it() {
    let server = server_with_app_user("token");
    let connector = Connector::from_url(&app_url(&server))
        .unwrap()
        .credentials(|| async {
            Ok::<_, std::io::Error>(Credentials::new("app", "expired-token-do-not-print"))
        });
    let error = connector.connect().await.unwrap_err();
    assert!(error.is_config(), "{error}");
    assert!(format!("{connector:?}").contains("credentials_provider: true"));
    for shown in [
        error.to_string(),
        format!("{error:?}"),
        format!("{connector:?}"),
    ] {
        assert!(!shown.contains("do-not-print"), "{shown}");
    }
}

#[tokio::test]
async fn the_providers_user_name_replaces_the_urls() {
    let server = server_with_app_user("token");
    let connector =
        Connector::from_url(&format!("redis://someone-else@127.0.0.1:{}", server.port()))
            .unwrap()
            .credentials(|| async { Ok::<_, std::io::Error>(Credentials::new("app", "token")) });
    let mut redis = connector.connect().await.unwrap();
    let whoami = tower::ServiceExt::oneshot(
        &mut redis,
        tower_redis_resilience::Request::from(redis::cmd("ACL").arg("WHOAMI").clone()),
    )
    .await
    .unwrap();
    assert_eq!(whoami, redis::Value::BulkString(b"app".to_vec()));
}

type Answer = std::future::Ready<Result<Credentials, std::io::Error>>;

/// A provider that gives `answers` in turn (an `Err` is its failure), then the last one
/// for good; and how many times it was asked.
fn scripted(
    answers: Vec<Result<Credentials, &'static str>>,
) -> (
    impl Fn() -> Answer + Send + Sync + 'static,
    Arc<AtomicUsize>,
) {
    let asked = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&asked);
    let provider = move || {
        let n = counted.fetch_add(1, SeqCst).min(answers.len() - 1);
        std::future::ready(answers[n].clone().map_err(std::io::Error::other))
    };
    (provider, asked)
}

/// Credentials for user `app1`, valid for 1.2 s: renewed at 0.9 s.
fn expiring() -> Credentials {
    Credentials::new("app1", "token-1").valid_for(Duration::from_millis(1200))
}

/// Credentials for user `app2`, that do not expire: a connection that became `app2`'s
/// renewed its credentials in place.
fn lasting() -> Credentials {
    Credentials::new("app2", "token-2")
}

fn server_with_users_app1_and_app2() -> RedisServer {
    let server = RedisServer::config().password("harness-only").start();
    server.set_user_password("app1", "token-1");
    server.set_user_password("app2", "token-2");
    server
}

/// The default client of `server`, asking `provider` for credentials.
async fn client_asking(
    server: &RedisServer,
    provider: impl Fn() -> Answer + Send + Sync + 'static,
) -> ResilientClient {
    let connector = Connector::from_url(&format!("redis://127.0.0.1:{}", server.port()))
        .unwrap()
        .credentials(provider);
    ResilientClient::builder_with_connector(connector)
        .connect()
        .await
        .unwrap()
}

/// Calls until `until` after `start`, each of which must succeed.
async fn keep_calling(client: &mut ResilientClient, start: std::time::Instant, until: Duration) {
    while start.elapsed() < until {
        let _: () = client.set("k", "v").await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_that_expire_are_renewed_on_the_open_connections() {
    let server = server_with_users_app1_and_app2();
    // The shared connection's, the BLPOP's, then their renewals.
    let (provider, asked) = scripted(vec![Ok(expiring()), Ok(expiring()), Ok(lasting())]);
    let start = std::time::Instant::now();
    let mut client = client_asking(&server, provider).await;
    let popped: Option<(String, String)> = client.blpop("q", 0.05).await.unwrap();
    assert_eq!(popped, None);
    let opened = server.connection_ids_of_user("app1");
    assert_eq!(opened.len(), 2, "the shared connection and the BLPOP's");

    keep_calling(&mut client, start, Duration::from_millis(1500)).await;
    assert_eq!(server.connection_ids_of_user("app1"), Vec::<u64>::new());
    assert_eq!(
        server.connection_ids_of_user("app2"),
        opened,
        "the same connections, authenticated again"
    );
    assert_eq!(asked.load(SeqCst), 4);
    let popped: Option<(String, String)> = client.blpop("q", 0.05).await.unwrap();
    assert_eq!(popped, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_fails_is_tried_again_before_the_credentials_expire() {
    let server = server_with_users_app1_and_app2();
    let down = Err("the token service is down");
    let for_two_seconds = expiring().valid_for(Duration::from_secs(2));
    let (provider, asked) = scripted(vec![Ok(for_two_seconds), down, Ok(lasting())]);
    let start = std::time::Instant::now();
    let mut client = client_asking(&server, provider).await;
    let opened = server.connection_ids_of_user("app1");
    assert_eq!(opened.len(), 1);

    // Renewed at 1.5 s, which fails; tried again at half the 0.5 s left, before they
    // expire at 2 s.
    keep_calling(&mut client, start, Duration::from_millis(1950)).await;
    assert_eq!(asked.load(SeqCst), 3);
    assert_eq!(server.connection_ids_of_user("app2"), opened);
}

/// A connection whose credentials are renewed still takes its connector's settings:
/// before, the renewal's handle to it, taken first, kept the argument limit from being
/// set, so the default one (512 MiB) held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_credentials_to_renew_keeps_the_connectors_argument_limit() {
    let server = server_with_app_user("token-1");
    let connector = Connector::from_url(&app_url(&server))
        .unwrap()
        .max_argument_size(16)
        .credentials(|| async {
            Ok::<_, std::io::Error>(
                Credentials::password_only("token-1").valid_for(Duration::from_secs(60)),
            )
        });
    let mut redis = connector.connect().await.unwrap();
    let set =
        tower_redis_resilience::Request::from(redis::cmd("SET").arg("k").arg(vec![b'v'; 100]));
    let err = tower::ServiceExt::oneshot(&mut redis, set)
        .await
        .unwrap_err();
    assert!(err.is_config() && !err.may_have_run(), "{err:?}");
    assert_eq!(server.raw_command(&["EXISTS", "k"]), "0");
}
