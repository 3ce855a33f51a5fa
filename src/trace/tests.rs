//! Spans captured by a test subscriber, over the in-memory leaf.

use std::time::Duration;

use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::{
    Connector,
    testing::{Capture, Leaf, call, command},
};

fn connector() -> Connector {
    Connector::from_url("redis://:hunter2@127.0.0.1:6390/3").unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_span_carries_the_opentelemetry_database_attributes_and_no_key() {
    let capture = Capture::default();
    let _guard = capture.install();
    let mut service = TraceLayer::for_connector(&connector()).layer(Leaf::default());
    call(&mut service, command("GET", "ok", 5)).await.unwrap();

    let spans = capture.spans();
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!((span.name, span.level), ("redis", tracing::Level::DEBUG));
    let fields: Vec<_> = span
        .fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("db.namespace", "3"),
            ("db.operation.name", "GET"),
            ("db.system.name", "redis"),
            ("otel.kind", "client"),
            ("otel.name", "GET"),
            ("server.address", "127.0.0.1"),
            ("server.port", "6390"),
        ]
    );
    let everything = capture.text();
    assert!(
        !everything.contains("ok"),
        "the key never shows: {everything}"
    );
    assert!(!everything.contains("hunter2"));
}

#[tokio::test(start_paused = true)]
async fn a_failure_records_its_error_type_and_server_code() {
    let capture = Capture::default();
    let _guard = capture.install();
    let mut service = TraceLayer::new().layer(Leaf::default());
    call(&mut service, command("GET", "timeout", 0))
        .await
        .unwrap_err();
    call(&mut service, command("GET", "server", 0))
        .await
        .unwrap_err();
    call(&mut service, command("GET", "fail", 0))
        .await
        .unwrap_err();
    let spans = capture.spans();
    let field = |i: usize, name: &str| spans[i].fields.get(name).cloned();
    assert_eq!(field(0, "error.type").as_deref(), Some("timeout"));
    assert_eq!(field(0, "otel.status_code").as_deref(), Some("ERROR"));
    assert_eq!(field(1, "error.type").as_deref(), Some("server_error"));
    assert_eq!(
        field(1, "db.response.status_code").as_deref(),
        Some("WRONGTYPE")
    );
    assert_eq!(field(2, "error.type").as_deref(), Some("unavailable"));
    assert_eq!(field(2, "db.response.status_code"), None);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_is_recorded_as_cancelled() {
    let capture = Capture::default();
    let _guard = capture.install();
    let mut service = TraceLayer::new().layer(Leaf::default());
    let future = service
        .ready()
        .await
        .unwrap()
        .call(command("GET", "hang", 0));
    assert!(
        tokio::time::timeout(Duration::from_millis(10), future)
            .await
            .is_err()
    );
    assert_eq!(capture.spans()[0].fields["error.type"], "cancelled");
}

#[tokio::test(start_paused = true)]
async fn arguments_are_recorded_only_when_asked_truncated_and_never_for_credentials() {
    let capture = Capture::default();
    let _guard = capture.install();
    let mut service = TraceLayer::new()
        .record_arguments(12)
        .layer(Leaf::default());
    call(&mut service, command("SET", "ok", 0)).await.unwrap();
    let long = Request::from(redis::cmd("GET").arg("ok").arg("0").arg("é".repeat(20)));
    call(&mut service, long).await.unwrap();
    let auth = Request::from(redis::cmd("AUTH").arg("ok").arg(0).arg("hunter2"));
    call(&mut service, auth).await.unwrap();
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg("ok").arg(0).cmd("GET").arg("b");
    call(&mut service, Request::from(&pipe)).await.unwrap();

    let texts: Vec<_> = capture
        .spans()
        .iter()
        .map(|span| span.fields["db.query.text"].clone())
        .collect();
    assert_eq!(
        texts,
        ["SET ok 0", "GET ok 0 é…", "AUTH [redact…", "GET ok 0; GE…"]
    );
    assert!(!capture.text().contains("hunter2"));
    assert_eq!(capture.spans()[3].fields["db.operation.batch.size"], "2");
}

#[tokio::test(start_paused = true)]
async fn slow_calls_warn_inside_their_span_and_blocking_ones_do_not() {
    let capture = Capture::default();
    let _guard = capture.install();
    let mut service = TraceLayer::new()
        .slow_call(Duration::from_millis(50))
        .layer(Leaf::default());
    call(&mut service, command("GET", "ok", 49)).await.unwrap();
    call(&mut service, command("GET", "ok", 50)).await.unwrap();
    call(&mut service, command("BLPOP", "ok", 5000))
        .await
        .unwrap();
    let warnings: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|e| e.level == tracing::Level::WARN)
        .collect();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].fields["took_ms"], "50.0");
    assert_eq!(warnings[0].fields["command"], "GET");
}

#[tokio::test(start_paused = true)]
async fn the_level_is_configurable() {
    let capture = Capture::default();
    let _guard = capture.install();
    let mut service = TraceLayer::new()
        .level(tracing::Level::INFO)
        .layer(Leaf::default());
    call(&mut service, command("GET", "ok", 0)).await.unwrap();
    assert_eq!(capture.spans()[0].level, tracing::Level::INFO);
}

#[tokio::test(start_paused = true)]
async fn a_layer_switched_off_makes_no_span() {
    let capture = Capture::default();
    let _guard = capture.install();
    let mut on = TraceLayer::new().layer(Leaf::default());
    call(&mut on, command("GET", "ok", 5)).await.unwrap();
    assert_eq!(capture.spans().len(), 1, "the same call, traced");
    let mut off = TraceLayer::off().layer(Leaf::default());
    call(&mut off, command("GET", "ok", 5)).await.unwrap();
    assert_eq!(
        capture.spans().len(),
        1,
        "no span from the layer switched off"
    );
}

#[test]
fn a_large_argument_is_cut_before_it_is_copied() {
    let value = "é".repeat(4 << 20);
    let set = Request::from(redis::cmd("SET").arg("k").arg(&value));
    let text = layer::query_text(&set, 12);
    assert_eq!(text, "SET k ééé…");
    assert!(
        text.capacity() < 1024,
        "an 8 MiB value was copied to show 12 bytes: {} bytes held",
        text.capacity()
    );
    let binary = Request::from(redis::cmd("SET").arg("k").arg(vec![0xff_u8; 1 << 20]));
    let text = layer::query_text(&binary, 12);
    assert!(
        text.starts_with("SET k \u{fffd}") && text.ends_with('…'),
        "{text}"
    );
    assert!(text.capacity() < 1024, "{} bytes held", text.capacity());
}
