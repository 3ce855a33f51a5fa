//! With the `metrics` feature, calls reach the `metrics` facade under OpenTelemetry's
//! names, and a Prometheus exporter renders them.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use redis::Value;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_redis_resilience::{
    Error, Request,
    fallback::FallbackLayer,
    metrics::{MetricsLayer, Outcome},
};

#[tokio::test]
async fn calls_are_recorded_under_opentelemetry_names_with_bounded_labels() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();

    // A stand-in whose answer depends on the key: ok, a timeout, or WRONGTYPE.
    let leaf = service_fn(|request: Request| async move {
        let key = match request.cmd().and_then(|cmd| cmd.args_iter().nth(1)) {
            Some(redis::Arg::Simple(key)) => String::from_utf8_lossy(key).into_owned(),
            _ => String::new(),
        };
        match key.as_str() {
            "slow" => Err(Error::timed_out(Duration::from_millis(100))),
            "list" => {
                let reply =
                    b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n";
                match redis::parse_redis_value(reply) {
                    Ok(Value::ServerError(err)) => Err(Error::from(redis::RedisError::from(err))),
                    other => panic!("{other:?}"),
                }
            }
            _ => Ok(Value::Okay),
        }
    });
    let metrics = MetricsLayer::new();
    let fallback = FallbackLayer::default().record_to(metrics.registry().clone());
    let mut service = fallback.layer(metrics.layer(leaf));
    for key in ["a", "b", "slow", "list", "secret-key-123"] {
        let request = Request::from(redis::cmd("GET").arg(key));
        let _ = service.ready().await.unwrap().call(request).await;
    }

    let text = prometheus.render();
    let series: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("db_client_operation_duration_count"))
        .collect();
    assert_eq!(series.len(), 3, "{text}");
    assert!(series.contains(
        &r#"db_client_operation_duration_count{db_system_name="redis",db_operation_name="GET"} 3"#
    ));
    assert!(series.contains(
        &r#"db_client_operation_duration_count{db_system_name="redis",db_operation_name="GET",error_type="timeout"} 1"#
    ));
    assert!(series.contains(
        &r#"db_client_operation_duration_count{db_system_name="redis",db_operation_name="GET",error_type="server_error"} 1"#
    ));
    assert!(
        text.contains(
            r#"redis_client_fallbacks{db_system_name="redis",db_operation_name="GET"} 1"#
        ),
        "{text}"
    );
    assert!(!text.contains("secret-key"), "keys are never labels");
    assert_eq!(
        metrics
            .snapshot()
            .command("GET")
            .unwrap()
            .count(Outcome::Fallback),
        1
    );
}
