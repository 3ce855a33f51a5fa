//! TLS through redis-rs's rustls support, against a TLS-only redis-server.
#![cfg(feature = "tls")]

mod support;

use std::time::{Duration, Instant};

use redis::{AsyncCommands, TlsCertificates};
use support::RedisServer;
use tower_redis_resilience::{Client, Connector, RedisService, ResilientClient};

fn trusting(server: &RedisServer) -> redis::Client {
    redis::Client::build_with_tls(server.url(), support::trust(server.ca_certificate())).unwrap()
}

/// The default stack over TLS, its connector given the server's CA.
async fn trusting_client(server: &RedisServer) -> ResilientClient {
    let connector = Connector::from_url(&server.url())
        .unwrap()
        .tls_certificates(support::trust(server.ca_certificate()))
        .unwrap();
    ResilientClient::builder_with_connector(connector)
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn commands_work_over_tls_with_a_private_ca() {
    let server = RedisServer::config().tls().password("tls-pw").start();
    let redis = RedisService::from_client(trusting(&server)).await.unwrap();
    let mut client = Client::new(redis);
    let () = client.set("k", "over tls").await.unwrap();
    let v: String = client.get("k").await.unwrap();
    assert_eq!(v, "over tls");
}

#[tokio::test]
async fn a_connector_given_the_ca_connects_and_one_without_tls_says_what_is_wrong() {
    let server = RedisServer::config().tls().password("tls-pw").start();
    let certificates = support::trust(server.ca_certificate());
    let connector = Connector::from_url(&server.url())
        .unwrap()
        .tls_certificates(certificates.clone())
        .unwrap();
    let mut client = Client::new(connector.connect().await.unwrap());
    let () = client.set("k", "trusted").await.unwrap();

    let plain = Connector::from_url("redis://127.0.0.1:6379")
        .unwrap()
        .tls_certificates(certificates.clone())
        .map(|_| ())
        .unwrap_err();
    assert!(
        plain.is_config() && plain.to_string().contains("rediss://"),
        "{plain}"
    );
    let unreadable = Connector::from_url(&server.url())
        .unwrap()
        .tls_certificates(support::trust(b"not a certificate".to_vec()))
        .map(|_| ())
        .unwrap_err();
    assert!(
        unreadable.is_config() && unreadable.to_string().contains("root certificate"),
        "{unreadable}"
    );
    assert!(!unreadable.to_string().contains("tls-pw"), "{unreadable}");
}

#[tokio::test]
async fn untrusted_certificate_is_config() {
    let server = RedisServer::config().tls().start();
    // The system roots do not include the test CA.
    let err = Connector::from_url(&server.url())
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(err.is_config(), "{err:?}");
}

/// Redis reads a ClientHello as the start of an inline command and waits for a newline
/// that never comes, so the handshake can only end by the connect timeout: unavailable,
/// within the bound.
#[tokio::test]
async fn tls_client_against_a_plain_server_fails_within_the_connect_timeout() {
    let server = RedisServer::start();
    let url = format!("rediss://127.0.0.1:{}", server.port());
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = Connector::from_url(&url)
        .unwrap()
        .connect_timeout(timeout)
        .connect()
        .await
        .unwrap_err();
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
    assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
}

/// Redis resets a connection whose first bytes are not a TLS handshake: to the client
/// that is indistinguishable from a server going away, so it is unavailable, with a hint.
#[tokio::test]
async fn plain_client_against_a_tls_server_is_reset_at_once() {
    let server = RedisServer::config().tls().start();
    let url = format!("redis://127.0.0.1:{}", server.port());
    let result = Connector::from_url(&url)
        .unwrap()
        .connect_timeout(Duration::from_millis(300))
        .connect()
        .await;
    let err = result.unwrap_err();
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
    assert!(
        err.to_string().contains("TLS port"),
        "says what may be wrong: {err}"
    );
}

/// A server restart while the connection is quiet: the next `INCR` and `BLPOP` (neither
/// ever sent twice) go to the restarted server on new connections, as over plain TCP,
/// because this crate runs the TLS connection and sees it close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_quiet_restart_a_non_idempotent_call_goes_to_a_new_connection() {
    let mut server = RedisServer::config().tls().start();
    let mut client = trusting_client(&server).await;
    assert_eq!(client.incr::<_, _, i64>("n", 1).await.unwrap(), 1);
    let popped: Option<(String, String)> = client.blpop("queue", 0.01).await.unwrap();
    assert_eq!(popped, None, "a connection of its own, kept idle");

    server.restart();
    // The closes are seen before the next call is made.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(client.incr::<_, _, i64>("n", 1).await.unwrap(), 1);
    let popped: Option<(String, String)> = client.blpop("queue", 0.01).await.unwrap();
    assert_eq!(popped, None);
    assert_eq!(client.incr::<_, _, i64>("n", 1).await.unwrap(), 2);
    assert_eq!(client.reconnect_stats().successes, 2);
}

/// A server that asks for a client certificate (`tls-auth-clients yes`): refused without
/// one, served with the one given to the connector, also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_given_to_the_connector_is_presented() {
    let certificates = support::certificates();
    let mut server = RedisServer::config()
        .tls_beside_plain(certificates.path())
        .arg("tls-auth-clients", "yes")
        .start();
    let read = |name: &str| std::fs::read(certificates.path().join(name)).unwrap();
    let connector = |client_tls| {
        Connector::from_url(&server.url())
            .unwrap()
            .tls_certificates(TlsCertificates {
                client_tls,
                root_cert: Some(read("ca.crt")),
            })
            .unwrap()
    };
    let error = connector(None).connect().await.map(|_| ()).unwrap_err();
    assert!(
        error.is_config() && error.to_string().contains("CertificateRequired"),
        "{error}"
    );

    // The server's certificate, signed by the CA the server trusts, serves as a client's.
    let client_tls = Some(redis::ClientTlsConfig {
        client_cert: read("server.crt"),
        client_key: read("server.key"),
    });
    let mut client = ResilientClient::builder_with_connector(connector(client_tls))
        .connect()
        .await
        .unwrap();
    assert_eq!(client.incr::<_, _, i64>("n", 1).await.unwrap(), 1);
    server.restart();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(client.incr::<_, _, i64>("n", 1).await.unwrap(), 1);
}

/// A stalled TLS server (SIGSTOP): every call returns within its deadline (reads as
/// misses), and once it resumes, calls are served again within a second, on the
/// connection the leaf opened and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_server_costs_calls_their_deadline_and_no_more() {
    let certificates = support::certificates();
    let server = RedisServer::config()
        .tls_beside_plain(certificates.path())
        .start();
    let mut client = trusting_client(&server).await;
    let () = client.set("k", "v").await.unwrap();

    server.pause();
    let stalled = Instant::now();
    while stalled.elapsed() < Duration::from_secs(1) {
        let started = Instant::now();
        let value: Option<String> = client.get("k").await.unwrap();
        assert_eq!(value, None, "a miss while Redis cannot answer");
        assert!(client.incr::<_, _, i64>("n", 1).await.is_err());
        // Two calls, each within the default 250 ms deadline and a little grace.
        assert!(
            started.elapsed() < Duration::from_millis(600),
            "{:?}",
            started.elapsed()
        );
    }
    server.resume();
    let resumed = Instant::now();
    loop {
        let value: Option<String> = client.get("k").await.unwrap();
        if value.is_some() {
            break;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(1),
            "served again within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Credentials from a provider over TLS: with the CA given to the connector, and with a
/// `redis::Client` built with it (whose certificates live in its connection details).
#[tokio::test]
async fn a_credentials_providers_token_is_sent_over_tls() {
    let server = RedisServer::config().tls().password("tls-pw").start();
    let without_password = format!("rediss://127.0.0.1:{}", server.port());
    let token = || async {
        Ok::<_, std::io::Error>(tower_redis_resilience::Credentials::password_only("tls-pw"))
    };
    let own_tls = Connector::from_url(&without_password)
        .unwrap()
        .tls_certificates(support::trust(server.ca_certificate()))
        .unwrap();
    let redis_rs_tls = Connector::from_client(
        redis::Client::build_with_tls(
            without_password.as_str(),
            support::trust(server.ca_certificate()),
        )
        .unwrap(),
    );
    for connector in [own_tls, redis_rs_tls] {
        let mut unauthenticated = Client::new(connector.connect().await.unwrap());
        let refused = unauthenticated.set::<_, _, ()>("k", "v").await.unwrap_err();
        assert!(refused.to_string().contains("NOAUTH"), "{refused}");
        let mut client = Client::new(connector.credentials(token).connect().await.unwrap());
        let () = client.set("k", "authenticated").await.unwrap();
    }
}
