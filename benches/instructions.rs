//! Instructions per call of each layer and of the default stack, counted by valgrind:
//! deterministic where the `layers` bench's nanoseconds move by ±40 ns between runs on a
//! shared VM, so it shows what a change to a layer really saved.
//!
//! `cargo bench --bench instructions` (needs `valgrind`: `apt-get install -y valgrind`;
//! without it, it says so and exits). Pass a word to run only the variants whose name
//! contains it: `cargo bench --bench instructions -- Metrics`.
//!
//! Each variant runs twice under `valgrind --tool=cachegrind`, as a child process of this
//! bench: a task on a `current_thread` runtime makes `N` GETs through it, over a leaf that
//! waits once as a network call does (as `layers`' "in runtime" group). The difference
//! between N = 12,000 and N = 2,000, over 10,000, is the cost of one call, with the
//! start-up and the runtime's set-up cancelled out.

mod stacks;

use std::process::Command;

use redis::Value;
use stacks::{LeafConnector, Waiting, built_stack, call_n, full_stack, reconnect_over};
use tower::{Layer, Service};
use tower_redis_resilience::{
    Error, Request, circuit_breaker::CircuitBreakerLayer, fallback::FallbackLayer,
    metrics::MetricsLayer, retry::RetryLayer, timeout::TimeoutLayer, trace::TraceLayer,
};

const VARIANTS: &[&str] = &[
    "leaf alone",
    "Reconnect",
    "Retry",
    "Timeout",
    "CircuitBreaker",
    "Metrics",
    "Fallback",
    "Trace (span disabled)",
    "full stack",
    "full stack, option_layer, boxed",
    "leaf through AsyncCommands",
    "full stack through AsyncCommands",
];

const FEW: u64 = 2_000;
const MANY: u64 = 12_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, variant, calls] = args.as_slice()
        && flag == "--child"
    {
        return child(variant, calls.parse().expect("a number of calls"));
    }
    // `cargo bench` passes `--bench`; any other word filters the variants.
    let filter = args.iter().find(|arg| !arg.starts_with("--"));
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("valgrind not found: install it (apt-get install -y valgrind) to count");
        return;
    }
    let leaf = per_call("leaf alone");
    println!("instructions per call, in a runtime task, over a leaf that waits once");
    for variant in VARIANTS {
        if filter.is_some_and(|word| !variant.contains(word.as_str())) {
            continue;
        }
        let count = if *variant == "leaf alone" {
            leaf
        } else {
            per_call(variant)
        };
        println!(
            "  {variant:<36} {count:>6}   over the leaf {:>+6}",
            count - leaf
        );
    }
}

/// Instructions per call of `variant`: the difference between two runs.
fn per_call(variant: &str) -> i64 {
    (instructions(variant, MANY) - instructions(variant, FEW)) / (MANY - FEW) as i64
}

/// Instructions a child process making `calls` calls through `variant` executes.
fn instructions(variant: &str, calls: u64) -> i64 {
    let exe = std::env::current_exe().expect("the bench's own path");
    let output = Command::new("valgrind")
        .args([
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
        ])
        .arg(exe)
        .args(["--child", variant, &calls.to_string()])
        .output()
        .expect("valgrind runs");
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{variant}: {report}");
    // "==123== I   refs:      18,394,350"
    report
        .lines()
        .find_map(|line| line.split_once("I   refs:"))
        .and_then(|(_, count)| count.trim().replace(',', "").parse().ok())
        .unwrap_or_else(|| panic!("no instruction count in valgrind's report: {report}"))
}

fn child(variant: &str, calls: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let variant = variant.to_owned();
    rt.block_on(async move {
        tokio::spawn(async move {
            let reconnect = reconnect_over(LeafConnector(Waiting)).await;
            match variant.as_str() {
                "leaf alone" => run(Waiting, calls).await,
                "Reconnect" => run(reconnect, calls).await,
                "Retry" => run(RetryLayer::default().layer(Waiting), calls).await,
                "Timeout" => run(TimeoutLayer::default().layer(Waiting), calls).await,
                "CircuitBreaker" => run(CircuitBreakerLayer::default().layer(Waiting), calls).await,
                "Metrics" => run(MetricsLayer::new().layer(Waiting), calls).await,
                "Fallback" => run(FallbackLayer::default().layer(Waiting), calls).await,
                "Trace (span disabled)" => run(TraceLayer::new().layer(Waiting), calls).await,
                "full stack" => {
                    run(full_stack(reconnect, CircuitBreakerLayer::default()), calls).await
                }
                "full stack, option_layer, boxed" => run(built_stack(reconnect), calls).await,
                "leaf through AsyncCommands" => run_commands(Waiting, calls).await,
                "full stack through AsyncCommands" => {
                    run_commands(full_stack(reconnect, CircuitBreakerLayer::default()), calls).await
                }
                other => panic!("no variant {other:?}"),
            }
        })
        .await
        .unwrap()
    });
}

async fn run<S>(mut service: S, calls: u64)
where
    S: Service<Request, Response = Value, Error = Error>,
{
    call_n(&mut service, calls).await;
}

/// `calls` GETs through redis-rs's `AsyncCommands` over `service` (`Client`): each builds
/// its command, and `Client` makes it a `Request` and boxes the future, as apps call it.
async fn run_commands<S>(service: S, calls: u64)
where
    S: Service<Request, Response = Value, Error = Error> + Send + Sync,
    S::Future: Send,
{
    use redis::AsyncCommands;
    let mut client = tower_redis_resilience::Client::new(service);
    for _ in 0..calls {
        let reply: redis::RedisResult<Value> = client.get(std::hint::black_box("k")).await;
        assert!(std::hint::black_box(reply).is_ok());
    }
}
