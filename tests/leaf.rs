//! RedisService and Client against real redis-server processes.

mod support;

use std::time::Duration;

use redis::{AsyncCommands, RedisError, Value};
use support::{FaultProxy, RedisServer};
use tower::{Service, ServiceExt};
use tower_redis_resilience::{Client, Connector, Error, RedisService, Request};

fn cmd(args: &[&str]) -> Request {
    let mut c = redis::cmd(args[0]);
    for arg in &args[1..] {
        c.arg(*arg);
    }
    Request::from(c)
}

async fn call(service: &mut RedisService, request: Request) -> Result<Value, Error> {
    service.ready().await?.call(request).await
}

fn bulk(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

#[tokio::test]
async fn set_then_get_round_trips_through_the_service() {
    let server = RedisServer::start();
    let mut redis = RedisService::connect(&server.url()).await.unwrap();

    assert_eq!(
        call(&mut redis, cmd(&["SET", "k", "v"])).await.unwrap(),
        Value::Okay
    );
    assert_eq!(
        call(&mut redis, cmd(&["GET", "k"])).await.unwrap(),
        bulk("v")
    );
    assert_eq!(
        call(&mut redis, cmd(&["GET", "missing"])).await.unwrap(),
        Value::Nil
    );
}

#[tokio::test]
async fn plain_pipeline_answers_an_array_in_order_with_errors_in_their_slots() {
    let server = RedisServer::start();
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg("a")
        .arg("1")
        .cmd("INCR")
        .arg("a")
        .cmd("HGET")
        .arg("a")
        .arg("f");

    let reply = call(&mut redis, Request::from(pipe)).await.unwrap();
    let Value::Array(items) = reply else {
        panic!("not an array: {reply:?}")
    };
    assert_eq!(items[0], Value::Okay);
    assert_eq!(items[1], Value::Int(2));
    assert!(
        matches!(&items[2], Value::ServerError(e) if e.code() == "WRONGTYPE"),
        "{items:?}"
    );
}

#[tokio::test]
async fn atomic_pipeline_answers_the_exec_array() {
    let server = RedisServer::start();
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("INCR")
        .arg("n")
        .cmd("INCR")
        .arg("n")
        .cmd("GET")
        .arg("n");

    let reply = call(&mut redis, Request::from(pipe)).await.unwrap();
    assert_eq!(
        reply,
        Value::Array(vec![Value::Int(1), Value::Int(2), bulk("2")])
    );
}

#[tokio::test]
async fn empty_plain_pipeline_answers_an_empty_array_without_a_round_trip() {
    let server = RedisServer::start();
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    let reply = call(&mut redis, Request::from(redis::pipe()))
        .await
        .unwrap();
    assert_eq!(reply, Value::Array(vec![]));
}

#[tokio::test]
async fn binary_and_16_mib_values_survive_unchanged() {
    let server = RedisServer::start();
    let mut client = Client::new(RedisService::connect(&server.url()).await.unwrap());

    let binary: Vec<u8> = (0..=255u8).chain([0, b'\r', b'\n', 0]).collect();
    let () = client.set(b"bin\x00key", &binary).await.unwrap();
    let back: Vec<u8> = client.get(b"bin\x00key").await.unwrap();
    assert_eq!(back, binary);

    let large: Vec<u8> = (0..16 * 1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
    let () = client.set("large", &large).await.unwrap();
    let back: Vec<u8> = client.get("large").await.unwrap();
    assert_eq!(back.len(), large.len());
    assert!(back == large, "16 MiB value came back different");
}

#[tokio::test]
async fn client_gives_the_whole_async_commands_api() {
    let server = RedisServer::start();
    let redis = RedisService::connect(&server.url()).await.unwrap();
    let mut client = Client::new(redis);

    let () = client.set_ex("session", "alice", 60).await.unwrap();
    let name: Option<String> = client.get("session").await.unwrap();
    assert_eq!(name.as_deref(), Some("alice"));
    let missing: Option<String> = client.get("nobody").await.unwrap();
    assert_eq!(missing, None);

    let () = client
        .hset_multiple("h", &[("a", 1), ("b", 2)])
        .await
        .unwrap();
    let total: i64 = client.hincr("h", "a", 10).await.unwrap();
    assert_eq!(total, 11);
    let n: i64 = client.incr("counter", 5).await.unwrap();
    assert_eq!(n, 5);

    // Pipelines through Pipeline::query_async, plain and atomic, with ignored replies.
    let (a, b): (i64, i64) = redis::pipe()
        .cmd("SET")
        .arg("x")
        .arg(1)
        .ignore()
        .cmd("INCR")
        .arg("x")
        .cmd("INCR")
        .arg("x")
        .query_async(&mut client)
        .await
        .unwrap();
    assert_eq!((a, b), (2, 3));
    let (x,): (i64,) = redis::pipe()
        .atomic()
        .cmd("INCR")
        .arg("x")
        .ignore()
        .cmd("GET")
        .arg("x")
        .query_async(&mut client)
        .await
        .unwrap();
    assert_eq!(x, 4);

    // A clone shares the connection.
    let mut other = client.clone();
    let x: i64 = other.get("x").await.unwrap();
    assert_eq!(x, 4);
}

#[tokio::test]
async fn server_errors_through_client_are_the_plain_redis_rs_errors() {
    let server = RedisServer::start();
    let mut client = Client::new(RedisService::connect(&server.url()).await.unwrap());
    let () = client.set("s", "text").await.unwrap();

    let err: RedisError = client.lpush::<_, _, i64>("s", "x").await.unwrap_err();
    assert_eq!(err.code(), Some("WRONGTYPE"));
    let ours = Error::from(err);
    assert!(ours.is_server() && !ours.is_unavailable(), "{ours:?}");

    // A failing command inside a transaction aborts it the way redis-rs reports it.
    let err = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg("t")
        .arg(1)
        .cmd("NOSUCHCOMMAND")
        .query_async::<Value>(&mut client)
        .await
        .unwrap_err();
    assert!(Error::from(err.clone()).is_server(), "{err:?}");
    let t: Option<i64> = client.get("t").await.unwrap();
    assert_eq!(t, None, "the aborted transaction wrote nothing");
}

#[tokio::test]
async fn server_error_replies_are_classified_by_code() {
    let server = RedisServer::start();
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    call(&mut redis, cmd(&["SET", "s", "text"])).await.unwrap();

    let wrongtype = call(&mut redis, cmd(&["LPUSH", "s", "x"]))
        .await
        .unwrap_err();
    assert!(wrongtype.is_server(), "{wrongtype:?}");
    assert_eq!(wrongtype.server_code(), Some("WRONGTYPE"));
    assert_eq!(wrongtype.command(), Some("LPUSH"));

    let noscript = call(&mut redis, cmd(&["EVALSHA", &"0".repeat(40), "0"]))
        .await
        .unwrap_err();
    assert!(noscript.is_server(), "{noscript:?}");
    assert_eq!(noscript.server_code(), Some("NOSCRIPT"));

    let syntax = call(&mut redis, cmd(&["SET", "k", "v", "BOGUS"]))
        .await
        .unwrap_err();
    assert!(
        syntax.is_server() && syntax.server_code() == Some("ERR"),
        "{syntax:?}"
    );

    // The connection is still fine after server errors.
    assert_eq!(
        call(&mut redis, cmd(&["GET", "s"])).await.unwrap(),
        bulk("text")
    );
}

#[tokio::test]
async fn loading_is_unavailable_and_did_not_run() {
    let mut server = RedisServer::config()
        .arg("enable-debug-command", "yes")
        .arg("key-load-delay", "500") // µs per key: 2000 keys load for ~1 s
        .arg("loading-process-events-interval-bytes", "1024")
        .start();
    server.raw_command(&["DEBUG", "POPULATE", "2000", "key", "100"]);
    server.raw_command(&["SAVE"]);
    server.restart_while_loading();

    // The handshake itself may see LOADING; keep trying until a connection is up.
    let mut redis = loop {
        match RedisService::connect(&server.url()).await {
            Ok(redis) => break redis,
            Err(err) => {
                assert!(err.is_unavailable(), "connect while loading: {err:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let err = call(&mut redis, cmd(&["INCR", "counter"]))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(err.server_code(), Some("LOADING"));
    assert!(
        !err.may_have_run(),
        "LOADING means the INCR was not executed"
    );
}

#[tokio::test]
async fn wrong_password_is_a_clear_config_error_that_never_shows_the_password() {
    let server = RedisServer::config()
        .password("right-horse-battery")
        .start();
    let url = format!("redis://:wrong-staple@127.0.0.1:{}", server.port());

    let err = RedisService::connect(&url).await.unwrap_err();
    assert!(err.is_config(), "{err:?}");
    assert!(!err.may_have_run());
    let shown = format!("{err} {err:?}");
    assert!(
        shown.contains("WRONGPASS") || shown.to_lowercase().contains("auth"),
        "{shown}"
    );
    assert!(
        !shown.contains("wrong-staple") && !shown.contains("right-horse"),
        "{shown}"
    );

    // The right password works.
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    assert_eq!(
        call(&mut redis, cmd(&["PING"])).await.unwrap(),
        Value::SimpleString("PONG".into())
    );
}

#[tokio::test]
async fn a_server_at_maxclients_is_unavailable_and_the_error_says_what_may_be_wrong() {
    let server = RedisServer::start();
    assert_eq!(
        server.raw_command(&["CONFIG", "SET", "maxclients", "1"]),
        "OK"
    );
    // Accepted before the connects below (Redis accepts in order), so they find no room.
    let _only_client = std::net::TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    for _ in 0..5 {
        let err = RedisService::connect(&server.url()).await.unwrap_err();
        assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
        // Redis's own words when the handshake reads them, else our guess.
        let shown = err.to_string();
        assert!(
            shown.contains("maxclients") || shown.contains("max number of clients"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn missing_password_answers_noauth_as_config() {
    let server = RedisServer::config().password("secret").start();
    let url = format!("redis://127.0.0.1:{}", server.port());
    let result = match RedisService::connect(&url).await {
        Ok(mut redis) => call(&mut redis, cmd(&["GET", "k"])).await.map(|_| ()),
        Err(err) => Err(err),
    };
    let err = result.unwrap_err();
    assert!(err.is_config(), "{err:?}");
}

#[tokio::test]
async fn acl_user_authenticates_and_a_wrong_one_is_config() {
    let server = RedisServer::config().user("app", "app-secret").start();
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    call(&mut redis, cmd(&["SET", "k", "v"])).await.unwrap();

    let url = format!("redis://app:nope@127.0.0.1:{}", server.port());
    let err = RedisService::connect(&url).await.unwrap_err();
    assert!(err.is_config(), "{err:?}");
}

#[tokio::test]
async fn database_index_out_of_range_is_config() {
    let server = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}/99", server.port());
    let err = RedisService::connect(&url).await.unwrap_err();
    assert!(err.is_config(), "{err:?}");
}

/// A port where something other than Redis listens (a wrong port: an HTTP server's):
/// its answer to the handshake does not parse. That is a configuration error that says
/// so, tried again at the slowest rate, not an outage tried every 25 ms. Before, it was
/// "unavailable: Incompatible type - Parse error at 1 Unexpected `84`...", and the
/// reconnect loop tried ~50 times a second for its first 2 s.
#[tokio::test]
async fn a_port_where_something_else_listens_is_a_config_error_that_says_so() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            use std::io::{Read, Write};
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let url = format!("redis://127.0.0.1:{port}");
    let err = RedisService::connect(&url).await.unwrap_err();
    assert!(err.is_config() && !err.may_have_run(), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("Redis's protocol"), "{shown}");
    assert!(!shown.contains('\n'), "one line: {shown:?}");

    let client = tower_redis_resilience::ResilientClient::builder(&url)
        .build()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let attempts = client.reconnect_stats().attempts;
    assert!(attempts <= 2, "{attempts} attempts in 500 ms");
}

#[tokio::test]
async fn malformed_url_is_config_with_the_password_hidden() {
    let err = RedisService::connect("redis://:s3cr3t@127.0.0.1:99999999")
        .await
        .unwrap_err();
    assert!(err.is_config(), "{err:?}");
    assert!(!format!("{err}{err:?}").contains("s3cr3t"));
    let err = RedisService::connect("http://127.0.0.1:6379")
        .await
        .unwrap_err();
    assert!(err.is_config(), "{err:?}");
}

#[tokio::test]
async fn refused_connection_is_unavailable_and_did_not_run() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.kill();
    let err = RedisService::connect(&url).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(!err.may_have_run());
}

#[tokio::test]
async fn connection_closed_during_a_request_is_unavailable_and_may_have_run() {
    let server = RedisServer::start();
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    let Value::Int(id) = call(&mut redis, cmd(&["CLIENT", "ID"])).await.unwrap() else {
        panic!("CLIENT ID is an integer")
    };

    let pending = tokio::spawn({
        let mut redis = redis.clone();
        async move { call(&mut redis, cmd(&["BLPOP", "never", "10"])).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.raw_command(&["CLIENT", "KILL", "ID", &id.to_string()]);

    let err = pending.await.unwrap().unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.may_have_run(), "the BLPOP had reached Redis");
    assert_eq!(err.command(), Some("BLPOP"));

    // The broken connection keeps answering unavailable instead of hanging.
    let next = tokio::time::timeout(Duration::from_secs(2), call(&mut redis, cmd(&["GET", "k"])))
        .await
        .expect("a dead connection answers at once");
    assert!(next.unwrap_err().is_unavailable());
}

#[tokio::test]
async fn a_call_after_the_connection_closed_says_it_was_not_sent() {
    let server = RedisServer::start();
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    call(&mut redis, cmd(&["INCR", "n"])).await.unwrap();
    server.raw_command(&["CLIENT", "KILL", "TYPE", "normal"]);
    // The connection's task sees the close within microseconds; this is ample.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = call(&mut redis, cmd(&["INCR", "n"])).await.unwrap_err();
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
    assert_eq!(err.command(), Some("INCR"));
    assert_eq!(server.raw_command(&["GET", "n"]), "1");
}

/// Sends `request()` 1000 times in a row, each refused at once, as an app's loop that
/// tries until it works: answers whether another task of the runtime got its turn.
async fn others_run_while_refused(redis: &mut RedisService, request: impl Fn() -> Request) -> bool {
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = ran.clone();
    tokio::spawn(async move { other.store(true, std::sync::atomic::Ordering::SeqCst) });
    for _ in 0..1000 {
        let err = call(redis, request()).await.unwrap_err();
        assert!(!err.may_have_run(), "{err:?}");
    }
    ran.load(std::sync::atomic::Ordering::SeqCst)
}

/// A call refused unsent is answered without waiting on anything; it still takes its unit
/// of the task's Tokio budget, so a loop of them yields now and then and the runtime's
/// other tasks (a reconnect loop among them) get to run.
#[tokio::test]
async fn a_loop_of_calls_refused_unsent_lets_the_runtime_run_its_other_tasks() {
    let server = RedisServer::start();
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    assert!(others_run_while_refused(&mut redis, || cmd(&["SELECT", "3"])).await);
    server.raw_command(&["CLIENT", "KILL", "TYPE", "normal"]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(others_run_while_refused(&mut redis, || cmd(&["INCR", "n"])).await);
}

#[tokio::test]
async fn a_unix_socket_serves_calls_and_tells_a_closed_connection() {
    let dir = support::TempDir::new();
    let socket = dir.path().join("redis.sock");
    let server = RedisServer::config()
        .arg("unixsocket", socket.to_str().unwrap())
        .arg("unixsocketperm", "700")
        .start();
    let mut redis = RedisService::connect(&format!("unix://{}", socket.display()))
        .await
        .unwrap();
    call(&mut redis, cmd(&["SET", "k", "v"])).await.unwrap();
    assert_eq!(
        call(&mut redis, cmd(&["GET", "k"])).await.unwrap(),
        Value::BulkString(b"v".to_vec())
    );
    server.raw_command(&["CLIENT", "KILL", "TYPE", "normal"]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = call(&mut redis, cmd(&["GET", "k"])).await.unwrap_err();
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
}

#[tokio::test]
async fn server_killed_mid_request_is_unavailable() {
    let mut server = RedisServer::start();
    let redis = RedisService::connect(&server.url()).await.unwrap();
    let pending = tokio::spawn({
        let mut redis = redis.clone();
        async move { call(&mut redis, cmd(&["BLPOP", "never", "10"])).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.kill();
    let err = tokio::time::timeout(Duration::from_secs(2), pending)
        .await
        .expect("the kill is noticed at once")
        .unwrap()
        .unwrap_err();
    assert!(err.is_unavailable() && err.may_have_run(), "{err:?}");
}

#[tokio::test]
async fn reply_cut_mid_way_is_unavailable_not_a_truncated_value() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port()).await;
    let mut redis = RedisService::connect(&proxy.url()).await.unwrap();
    let big = "x".repeat(1 << 20);
    call(&mut redis, cmd(&["SET", "big", &big])).await.unwrap();

    proxy.cut_replies_after(4096);
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        call(&mut redis, cmd(&["GET", "big"])),
    )
    .await
    .expect("a cut reply fails instead of hanging");
    let err = result.unwrap_err();
    assert!(err.is_unavailable() && err.may_have_run(), "{err:?}");
}

#[tokio::test]
async fn commands_that_would_change_the_shared_connection_are_refused_unsent() {
    let server = RedisServer::start();
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    call(&mut redis, cmd(&["SET", "k", "v"])).await.unwrap();
    // Each of these, sent, changed the connection under every other caller: GETs then
    // answered "QUEUED" (MULTI), read another database (SELECT), or failed from then on
    // (SUBSCRIBE, MONITOR).
    for (args, hint) in [
        (&["SUBSCRIBE", "news"][..], "pubsub::Subscriber"),
        (&["MONITOR"], "connection of its own"),
        (&["MULTI"], "redis::pipe().atomic()"),
        (&["WATCH", "k"], "in a script"),
        (&["SELECT", "3"], "in the URL"),
        (&["HELLO", "3"], "in the URL"),
        (&["AUTH", "default", "hunter2"], "in the URL"),
        (&["RESET"], "in the URL"),
        (&["CLIENT", "REPLY", "OFF"], "leave replies on"),
        (
            &["CLIENT", "TRACKING", "ON"],
            "track on a connection of its own",
        ),
        (
            &["CLIENT", "CACHING", "YES"],
            "track on a connection of its own",
        ),
        (&["QUIT"], "drop the client"),
    ] {
        let err = call(&mut redis, cmd(args)).await.unwrap_err();
        assert!(err.is_config() && !err.may_have_run(), "{args:?}: {err:?}");
        let text = err.to_string();
        assert!(text.contains("refused") && text.contains(hint), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(
            call(&mut redis, cmd(&["GET", "k"])).await.unwrap(),
            bulk("v"),
            "after {args:?}"
        );
    }
    // In a pipeline too; an atomic pipeline's own MULTI and EXEC are fine.
    let mut pipe = redis::pipe();
    pipe.set("k", "w").cmd("SELECT").arg(3).get("k");
    let err = call(&mut redis, Request::from(pipe)).await.unwrap_err();
    assert!(
        err.is_config() && err.to_string().contains("pipeline refused"),
        "{err}"
    );
    assert_eq!(
        call(&mut redis, cmd(&["GET", "k"])).await.unwrap(),
        bulk("v")
    );
    // Nothing refused reached Redis.
    let stats = server.raw_command(&["INFO", "commandstats"]);
    for name in [
        "subscribe",
        "monitor",
        "multi",
        "watch",
        "select",
        "hello",
        "auth",
        "reset",
        "client|reply",
        "client|tracking",
        "client|caching",
        "quit",
    ] {
        assert!(
            !stats.contains(&format!("cmdstat_{name}:")),
            "{name} ran: {stats}"
        );
    }
    let mut atomic = redis::pipe();
    atomic.atomic().set("k", "w").get("k");
    call(&mut redis, Request::from(atomic)).await.unwrap();
}

#[tokio::test]
async fn oversized_value_is_refused_with_a_clear_error_and_nothing_written() {
    let server = RedisServer::config()
        .arg("proto-max-bulk-len", "1mb")
        .start();
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    let too_big = "x".repeat(2 << 20);
    let err = call(&mut redis, cmd(&["SET", "big", &too_big]))
        .await
        .unwrap_err();
    assert!(!err.is_timeout(), "{err:?}");
    assert!(err.to_string().contains("SET"), "{err}");

    // Redis drops a connection that sent an invalid bulk length; a new one sees no key.
    let mut fresh = RedisService::connect(&server.url()).await.unwrap();
    assert_eq!(
        call(&mut fresh, cmd(&["EXISTS", "big"])).await.unwrap(),
        Value::Int(0)
    );
}

#[tokio::test]
async fn connect_timeout_bounds_a_stalled_server() {
    let server = RedisServer::start();
    server.pause();
    let started = std::time::Instant::now();
    let err = Connector::from_url(&server.url())
        .unwrap()
        .connect_timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap_err();
    let waited = started.elapsed();
    server.resume();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(waited < Duration::from_secs(1), "waited {waited:?}");
}

#[tokio::test]
async fn debug_of_services_never_shows_the_password() {
    let server = RedisServer::config().password("pw-do-not-print").start();
    let redis = RedisService::connect(&server.url()).await.unwrap();
    let client = Client::new(redis.clone());
    let connector = Connector::from_url(&server.url()).unwrap();
    for shown in [
        format!("{redis:?}"),
        format!("{client:?}"),
        format!("{connector:?}"),
    ] {
        assert!(!shown.contains("pw-do-not-print"), "{shown}");
        assert!(shown.contains(&server.port().to_string()), "{shown}");
    }
}

#[tokio::test]
async fn a_dropped_service_closes_its_connection_though_its_calls_boxes_are_kept() {
    let server = RedisServer::start();
    let clients = || {
        server
            .info_field("connected_clients")
            .parse::<u32>()
            .unwrap()
    };
    // The INFO connection counts itself.
    assert_eq!(clients(), 1);
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    for _ in 0..5 {
        call(&mut redis, cmd(&["GET", "k"])).await.unwrap();
    }
    // A call dropped while it waits holds the connection in its box until then.
    let mut waiting = Box::pin(redis.call(cmd(&["BLPOP", "empty", "5"])));
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    assert_eq!(clients(), 2);

    drop(waiting);
    drop(redis);
    support::eventually(Duration::from_secs(5), async || clients() == 1).await;
}

#[tokio::test]
async fn a_call_polled_again_after_it_answered_gets_an_error_not_a_panic() {
    let server = RedisServer::start();
    let mut redis = RedisService::connect(&server.url()).await.unwrap();
    let mut get = Box::pin(redis.call(cmd(&["GET", "k"])));
    assert_eq!(get.as_mut().await.unwrap(), Value::Nil);

    let std::task::Poll::Ready(again) = futures::poll!(get.as_mut()) else {
        panic!("answers at once");
    };
    assert!(again.unwrap_err().is_unavailable());
}

/// Calls finish on one thread and start on another, so each thread's spare boxes go
/// round: every reply must still be its own call's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_on_many_threads_each_get_their_own_reply() {
    let server = RedisServer::start();
    let redis = RedisService::connect(&server.url()).await.unwrap();
    let tasks: Vec<_> = (0..32)
        .map(|task| {
            let mut redis = redis.clone();
            tokio::spawn(async move {
                for round in 0..50 {
                    let key = format!("k{task}");
                    let value = format!("{task}:{round}");
                    let set = call(&mut redis, cmd(&["SET", &key, &value]));
                    assert_eq!(set.await.unwrap(), Value::Okay);
                    // Dropped before it answers, now and then: its box must come back empty.
                    if round % 7 == 0 {
                        drop(redis.call(cmd(&["GET", &key])));
                    }
                    let got = call(&mut redis, cmd(&["GET", &key])).await.unwrap();
                    assert_eq!(got, bulk(&value));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}
