mod support;

use std::time::{Duration, Instant};

use redis::{AsyncCommands, IntoConnectionInfo, io::tcp::TcpSettings};
use support::{FaultProxy, RedisServer};

async fn run(url: &str, nodelay: bool, tasks: usize, value: usize) -> (f64, Duration) {
    let info = url
        .into_connection_info()
        .unwrap()
        .set_tcp_settings(TcpSettings::default().set_nodelay(nodelay));
    let client = redis::Client::open(info).unwrap();
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let payload = "x".repeat(value);
    let mut c = conn.clone();
    let () = c.set("k", &payload).await.unwrap();
    let stop = Instant::now() + Duration::from_secs(2);
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let mut c = conn.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < stop {
                    let t = Instant::now();
                    if value > 0 {
                        let () = c.set("k", &payload).await.unwrap();
                    } else {
                        let _: Option<String> = c.get("k").await.unwrap();
                    }
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort();
    (all.len() as f64 / 2.0, all[all.len() / 2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_nagle() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port()).await;
    proxy.delay_replies(Duration::from_millis(1));
    for (tasks, value) in [(1, 0), (8, 0), (32, 0), (32, 2000), (32, 20000)] {
        for nodelay in [false, true] {
            let (rate, p50) = run(&proxy.url(), nodelay, tasks, value).await;
            println!(
                "tasks {tasks:>2} value {value:>5} nodelay {nodelay:<5}: {rate:>8.0}/s p50 {p50:?}"
            );
        }
    }
    println!("direct (loopback, no proxy):");
    for (tasks, value) in [(32, 0), (32, 2000)] {
        for nodelay in [false, true] {
            let (rate, p50) = run(&server.url(), nodelay, tasks, value).await;
            println!(
                "tasks {tasks:>2} value {value:>5} nodelay {nodelay:<5}: {rate:>8.0}/s p50 {p50:?}"
            );
        }
    }
}
