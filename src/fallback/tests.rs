//! The fallback layer over the in-memory leaf.

use std::time::Duration;

use tower::Layer;

use super::*;
use crate::{
    metrics::{MetricsLayer, Outcome},
    testing::{Capture, Leaf, call, command},
};

#[tokio::test(start_paused = true)]
async fn reads_answer_nil_when_redis_cannot_answer() {
    let fallback = FallbackLayer::default();
    let mut service = fallback.layer(Leaf::default());
    for behaviour in ["fail", "timeout"] {
        let value = call(&mut service, command("GET", behaviour, 0))
            .await
            .unwrap();
        assert_eq!(value, Value::Nil, "{behaviour}");
    }
    let open = tower::service_fn(|_: Request| async {
        Err::<Value, _>(Error::circuit_open(Duration::from_secs(1)))
    });
    let value = call(&mut fallback.layer(open), command("GET", "ok", 0)).await;
    assert_eq!(value.unwrap(), Value::Nil);
    assert_eq!(fallback.fallbacks(), 3);
}

#[tokio::test(start_paused = true)]
async fn writes_keep_their_error_by_default() {
    let fallback = FallbackLayer::default();
    let mut service = fallback.layer(Leaf::default());
    for name in ["SET", "INCR", "DEL"] {
        let err = call(&mut service, command(name, "fail", 0))
            .await
            .unwrap_err();
        assert!(err.is_unavailable(), "{name}");
    }
    assert_eq!(fallback.fallbacks(), 0);
}

#[tokio::test(start_paused = true)]
async fn server_errors_and_successes_pass_through_unchanged() {
    let fallback = FallbackLayer::new(FallbackPolicy::ReadsAndWrites(Value::Okay));
    let mut service = fallback.layer(Leaf::default());
    let err = call(&mut service, command("GET", "server", 0))
        .await
        .unwrap_err();
    assert_eq!(err.server_code(), Some("WRONGTYPE"));
    assert_eq!(
        call(&mut service, command("GET", "ok", 0)).await.unwrap(),
        Value::Okay
    );
    let config =
        tower::service_fn(|_: Request| async { Err::<Value, _>(Error::config("WRONGPASS")) });
    let err = call(&mut fallback.layer(config), command("GET", "ok", 0)).await;
    assert!(err.unwrap_err().is_config());
    assert_eq!(fallback.fallbacks(), 0);
}

#[tokio::test(start_paused = true)]
async fn mget_and_read_pipelines_answer_one_nil_per_key() {
    let mut service = FallbackLayer::default().layer(Leaf::default());
    let mget = Request::from(redis::cmd("MGET").arg("fail").arg("0").arg("c"));
    let nils = |n| Value::Array(vec![Value::Nil; n]);
    assert_eq!(call(&mut service, mget).await.unwrap(), nils(3));
    let hmget = Request::from(redis::cmd("HMGET").arg("fail").arg("0"));
    assert_eq!(call(&mut service, hmget).await.unwrap(), nils(1));
    let armget = Request::from(redis::cmd("ARMGET").arg("fail").arg(0).arg(1));
    assert_eq!(call(&mut service, armget).await.unwrap(), nils(2));
    let json_mget = Request::from(redis::cmd("JSON.MGET").arg("fail").arg(0).arg(1).arg("$"));
    assert_eq!(call(&mut service, json_mget).await.unwrap(), nils(3));
    // (The leaf reads its behaviour and delay from the first two arguments: "0" is a
    // member, or stands where `FIELDS` goes.)
    for (args, n) in [
        (&["SMISMEMBER", "fail", "0", "b"][..], 2),
        (&["ZMSCORE", "fail", "0", "b", "c"], 3),
        (&["GEOPOS", "fail", "0"], 1),
        (&["GEOHASH", "fail", "0", "b"], 2),
        (&["HTTL", "fail", "0", "2", "a", "b"], 2),
        (&["HPTTL", "fail", "0", "1", "a"], 1),
        (&["HEXPIRETIME", "fail", "0", "3", "a", "b", "c"], 3),
        (&["HPEXPIRETIME", "fail", "0", "2", "a", "b"], 2),
    ] {
        let mut cmd = redis::cmd(args[0]);
        cmd.arg(&args[1..]);
        assert_eq!(
            call(&mut service, Request::from(cmd)).await.unwrap(),
            nils(n),
            "{args:?}"
        );
    }
    let ismember = Request::from(redis::cmd("SMISMEMBER").arg("fail").arg("0").arg("b"));
    let typed: Vec<bool> =
        redis::from_redis_value(call(&mut service, ismember).await.unwrap()).unwrap();
    assert_eq!(typed, [false, false]);

    let mut pipe = redis::pipe();
    pipe.cmd("GET")
        .arg("fail")
        .arg(0)
        .cmd("HGET")
        .arg("h")
        .arg("f");
    assert_eq!(
        call(&mut service, Request::from(&pipe)).await.unwrap(),
        nils(2)
    );
    pipe.atomic();
    assert_eq!(
        call(&mut service, Request::from(&pipe)).await.unwrap(),
        nils(2)
    );
    // Each command in a pipeline answers as it would alone: an MGET or HMGET one `Nil`
    // per key or field, so `Vec<Option<T>>` keeps its length there too.
    let mut reads = redis::pipe();
    reads
        .get("fail")
        .mget(&["a", "b"])
        .hmget("h", &["f", "g", "i"])
        .exists("k");
    let answer = call(&mut service, Request::from(&reads)).await.unwrap();
    assert_eq!(
        answer,
        Value::Array(vec![Value::Nil, nils(2), nils(3), Value::Nil])
    );
    type Values = Vec<Option<String>>;
    let typed: (Option<String>, Values, Values, bool) = redis::from_redis_value(answer).unwrap();
    assert_eq!(
        typed,
        (None, vec![None, None], vec![None, None, None], false)
    );
    // A pipeline with a write is a write.
    pipe.cmd("SET").arg("k").arg("v");
    assert!(call(&mut service, Request::from(&pipe)).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn reads_and_writes_answers_writes_with_the_configured_value() {
    let fallback = FallbackLayer::new(FallbackPolicy::ReadsAndWrites(Value::Int(0)));
    let mut service = fallback.layer(Leaf::default());
    assert_eq!(
        call(&mut service, command("INCR", "fail", 0))
            .await
            .unwrap(),
        Value::Int(0)
    );
    assert_eq!(
        call(&mut service, command("GET", "fail", 0)).await.unwrap(),
        Value::Nil
    );
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg("fail")
        .arg(0)
        .cmd("GET")
        .arg("k")
        .cmd("MGET")
        .arg("a")
        .arg("b");
    assert_eq!(
        call(&mut service, Request::from(&pipe)).await.unwrap(),
        Value::Array(vec![
            Value::Int(0),
            Value::Nil,
            Value::Array(vec![Value::Nil; 2])
        ])
    );
}

#[tokio::test(start_paused = true)]
async fn a_custom_policy_sees_the_request_and_the_error() {
    let fallback = FallbackLayer::new(FallbackPolicy::custom(|request, error| {
        (request.info().name() == "GET" && error.is_timeout())
            .then(|| Value::BulkString(b"stale".to_vec()))
    }));
    let mut service = fallback.layer(Leaf::default());
    let value = call(&mut service, command("GET", "timeout", 0))
        .await
        .unwrap();
    assert_eq!(value, Value::BulkString(b"stale".to_vec()));
    assert!(
        call(&mut service, command("GET", "fail", 0))
            .await
            .unwrap_err()
            .is_unavailable()
    );
    assert_eq!(fallback.fallbacks(), 1);
}

#[tokio::test(start_paused = true)]
async fn fallbacks_are_counted_in_the_registry_as_their_own_outcome() {
    let metrics = MetricsLayer::new();
    let fallback = FallbackLayer::default().record_to(metrics.registry().clone());
    let mut service = fallback.layer(metrics.layer(Leaf::default()));
    for _ in 0..3 {
        call(&mut service, command("GET", "fail", 0)).await.unwrap();
    }
    call(&mut service, command("GET", "ok", 0)).await.unwrap();
    let get = metrics.snapshot().command("GET").cloned().unwrap();
    assert_eq!(
        get.count(Outcome::Unavailable),
        3,
        "the metrics below saw the failures"
    );
    assert_eq!(get.count(Outcome::Fallback), 3);
    assert_eq!(get.count(Outcome::Ok), 1);
    assert_eq!(get.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn an_outage_warns_once_per_period_with_the_count_not_once_per_call() {
    let capture = Capture::default();
    let _guard = capture.install();
    let fallback = FallbackLayer::default().warn_every(Duration::from_secs(10));
    let mut service = fallback.layer(Leaf::default());
    // 1,000 failed reads over 25 s: warnings at 0 s, 10 s and 20 s.
    for _ in 0..1000 {
        call(&mut service, command("GET", "fail", 25))
            .await
            .unwrap();
    }
    let warnings: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|event| event.level == tracing::Level::WARN)
        .collect();
    let counts: Vec<_> = warnings
        .iter()
        .map(|w| w.fields["fallbacks"].clone())
        .collect();
    assert_eq!(counts, ["1", "400", "400"]);
    assert_eq!(warnings[0].fields["last_command"], "GET");
    assert_eq!(fallback.fallbacks(), 1000);
}

#[tokio::test(start_paused = true)]
async fn a_layer_switched_off_answers_for_nothing() {
    let fallback = FallbackLayer::off();
    let mut service = fallback.layer(Leaf::default());
    let error = call(&mut service, command("GET", "fail", 0))
        .await
        .unwrap_err();
    assert!(error.is_unavailable());
    assert_eq!(fallback.fallbacks(), 0);
}
