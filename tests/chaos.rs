//! Concurrent INCRs through Retry and Reconnect while Redis is killed and restarted with
//! every write fsynced: nothing acknowledged is lost, nothing failed is counted, and no
//! INCR that may have run is sent again.

mod support;

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use redis::Value;
use support::RedisServer;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_redis_resilience::{
    Connector, Error, Request,
    reconnect::{Reconnect, ReconnectConfig},
    retry::RetryLayer,
};

/// Watches every send that reaches the connection (below Retry).
#[derive(Default)]
struct Record {
    sends: AtomicU64,
    ok: AtomicU64,
    /// Requests that may have run (error saying so, or dropped in flight), kept alive so
    /// their command's address cannot be reused by another request.
    tainted: Mutex<(HashSet<usize>, Vec<Request>)>,
    resent_after_may_have_run: AtomicU64,
}

impl Record {
    fn taint(&self, request: Request) {
        let mut tainted = self.tainted.lock().unwrap();
        tainted.0.insert(key(&request));
        tainted.1.push(request);
    }
}

fn key(request: &Request) -> usize {
    request.cmd().expect("a command") as *const redis::Cmd as usize
}

#[derive(Clone)]
struct Spy<S> {
    inner: S,
    record: Arc<Record>,
}

struct SpyLayer(Arc<Record>);

impl<S> Layer<S> for SpyLayer {
    type Service = Spy<S>;
    fn layer(&self, inner: S) -> Spy<S> {
        Spy {
            inner,
            record: self.0.clone(),
        }
    }
}

impl<S> Service<Request> for Spy<S>
where
    S: Service<Request, Response = Value, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = Value;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Value, Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let record = self.record.clone();
        record.sends.fetch_add(1, Ordering::SeqCst);
        if record.tainted.lock().unwrap().0.contains(&key(&request)) {
            record
                .resent_after_may_have_run
                .fetch_add(1, Ordering::SeqCst);
        }
        let future = self.inner.call(request.clone());
        Box::pin(async move {
            // Taints the request if this future is dropped before the reply.
            struct InFlight(Option<(Arc<Record>, Request)>);
            impl Drop for InFlight {
                fn drop(&mut self) {
                    if let Some((record, request)) = self.0.take() {
                        record.taint(request);
                    }
                }
            }
            let mut in_flight = InFlight(Some((record, request)));
            let result = future.await;
            let (record, request) = in_flight.0.take().unwrap();
            match &result {
                Ok(_) => {
                    record.ok.fetch_add(1, Ordering::SeqCst);
                }
                Err(error) if error.may_have_run() => record.taint(request),
                Err(_) => {}
            }
            result
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_counts_add_up_through_a_kill_and_restart() {
    let server = RedisServer::config()
        .arg("appendonly", "yes")
        .arg("appendfsync", "always")
        .start();
    let connector = Connector::from_url(&server.url()).unwrap();
    incr_counts_add_up(server, connector).await;
}

/// The same over TLS, on the connections the leaf opens and runs itself.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_incr_counts_add_up_through_a_kill_and_restart() {
    let certificates = support::certificates();
    let server = RedisServer::config()
        .tls_beside_plain(certificates.path())
        .arg("appendonly", "yes")
        .arg("appendfsync", "always")
        .start();
    let connector = Connector::from_url(&server.url())
        .unwrap()
        .tls_certificates(support::trust(server.ca_certificate()))
        .unwrap();
    incr_counts_add_up(server, connector).await;
}

/// 16 tasks sending `INCR`s for 3 s through Retry and Reconnect to `server`, killed after
/// 0.8 s and restarted 0.7 s later: the counts must add up.
async fn incr_counts_add_up(mut server: RedisServer, connector: Connector) {
    let connector = connector.connect_timeout(Duration::from_millis(200));
    let reconnect = Reconnect::connect(connector, ReconnectConfig::new())
        .await
        .unwrap();
    let record = Arc::new(Record::default());
    let stack = ServiceBuilder::new()
        .layer(RetryLayer::default())
        .layer(SpyLayer(record.clone()))
        .service(reconnect);

    let acked = Arc::new(AtomicU64::new(0));
    let possibly_run = Arc::new(AtomicU64::new(0));
    let not_run = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_millis(3000);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let mut stack = stack.clone();
            let (acked, possibly_run, not_run) =
                (acked.clone(), possibly_run.clone(), not_run.clone());
            tokio::spawn(async move {
                while Instant::now() < stop {
                    let incr = Request::from(redis::cmd("INCR").arg("counter").to_owned());
                    let call = async { stack.ready().await?.call(incr).await };
                    match tokio::time::timeout(Duration::from_millis(300), call).await {
                        Ok(Ok(_)) => acked.fetch_add(1, Ordering::SeqCst),
                        Ok(Err(error)) if !error.may_have_run() => {
                            // An application backs off a little when Redis is away.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            not_run.fetch_add(1, Ordering::SeqCst)
                        }
                        // An error that may have run, or our own deadline gave up on it.
                        Ok(Err(_)) | Err(_) => possibly_run.fetch_add(1, Ordering::SeqCst),
                    };
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(800)).await;
    server = tokio::task::spawn_blocking(move || {
        server.kill();
        std::thread::sleep(Duration::from_millis(700));
        server.restart();
        server
    })
    .await
    .unwrap();
    for task in tasks {
        task.await.expect("no task panicked");
    }

    let final_value: u64 = server.raw_command(&["GET", "counter"]).parse().unwrap();
    let (acked, possibly_run, not_run) = (
        acked.load(Ordering::SeqCst),
        possibly_run.load(Ordering::SeqCst),
        not_run.load(Ordering::SeqCst),
    );
    eprintln!(
        "acked {acked}, possibly run {possibly_run}, not run {not_run}, final {final_value}, sends {}",
        record.sends.load(Ordering::SeqCst)
    );
    assert!(
        acked > 100 && not_run > 0,
        "the outage was hit: acked {acked}, not run {not_run}"
    );
    assert!(
        acked <= final_value,
        "acknowledged INCRs were lost: {acked} > {final_value}"
    );
    assert!(
        final_value <= acked + possibly_run,
        "INCRs reported failed were counted: {final_value} > {acked} + {possibly_run}"
    );
    assert_eq!(
        record.resent_after_may_have_run.load(Ordering::SeqCst),
        0,
        "an INCR that may have run was sent again"
    );
    assert_eq!(
        record.ok.load(Ordering::SeqCst),
        acked,
        "every success below Retry reached the caller"
    );
    assert!(
        record.sends.load(Ordering::SeqCst) > acked + possibly_run + not_run,
        "Retry resent the INCRs that provably never left the client"
    );
}
