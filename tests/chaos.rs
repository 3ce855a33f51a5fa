//! Concurrent INCRs through Retry and Reconnect while Redis is killed and restarted with
//! every write fsynced: nothing acknowledged is lost, nothing failed is counted, and no
//! INCR that may have run is sent again. And the default client through a seeded random
//! sequence of every fault the harness makes, one after another.

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

/// What the callers saw through the fault sequence.
#[derive(Default)]
struct Seen {
    incr_acked: AtomicU64,
    incr_maybe_run: AtomicU64,
    transactions_acked: AtomicU64,
    transactions_maybe_run: AtomicU64,
    reads: AtomicU64,
    misses: AtomicU64,
    /// Calls that failed or missed after the faults had long ended.
    failed_after: AtomicU64,
    /// Calls that answered after their deadline plus a grace, and what they were.
    late: Mutex<Vec<(&'static str, Duration)>>,
    /// Replies that were neither the value nor a miss.
    wrong: Mutex<Vec<String>>,
    /// The fault in force (its index in the sequence; the calm after the last, one more),
    /// and (served, not served) calls per fault, for the log.
    phase: std::sync::atomic::AtomicUsize,
    per_phase: Mutex<Vec<(u64, u64)>>,
}

/// Set once the faults have long ended: every call must be served from then on.
static SETTLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A fault, with how long it lasts.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL the master, restart it (its data in an fsynced AOF) after the time.
    Kill,
    /// SIGSTOP the master, SIGCONT after the time.
    Pause,
    /// Every reply held 300 ms (past the 250 ms deadline) for the time.
    Slow,
    /// The open connections forward nothing more, for good (new ones do): a middle box
    /// that forgot them.
    Silence,
    /// Every connection closed after a few hundred bytes more, for the time.
    Cut,
    /// The open connections closed, and for the time every new one reset at its first
    /// request (it passes the handshake's bytes): a middlebox whose backend flaps.
    Reset,
    /// `FAILOVER`: the replica takes over (Redis pauses writes until it has caught up),
    /// the master turns replica, and the address moves to the new master.
    Failover,
    /// `CLIENT PAUSE WRITE` for the time: writes held, reads served, as a maintenance
    /// window or a migration tool's cut-over has it.
    HoldWrites,
}

/// Each fault once, in a shuffled order: `seed` makes the order and the times.
fn fault_sequence(seed: u64) -> Vec<(Fault, Duration, Duration)> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move |below: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    };
    let mut faults = vec![
        Fault::Kill,
        Fault::Pause,
        Fault::Slow,
        Fault::Silence,
        Fault::Cut,
        Fault::Reset,
        Fault::Failover,
        Fault::HoldWrites,
    ];
    for i in (1..faults.len()).rev() {
        faults.swap(i, next(i as u64 + 1) as usize);
    }
    faults
        .into_iter()
        .map(|fault| {
            let lasts = Duration::from_millis(200 + next(1000));
            // Sometimes none: the next fault starts while the client recovers.
            let then_calm = Duration::from_millis(next(500));
            (fault, lasts, then_calm)
        })
        .collect()
}

/// The default client, through the address apps know (a proxy standing in for a DNS
/// name), to a master with a replica, both fsyncing every write, while 8 callers `INCR`,
/// run transactions and read, and the master is killed, paused, slowed, silenced, cut,
/// reset at every connection's first request, made to hold writes and failed over. Every call answers within its deadline (and a grace for a debug build
/// on 2 cores), every reply is the value or a miss, the counts add up, and a second
/// after the last fault ended every call is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_client_keeps_its_promises_through_every_fault_in_turn() {
    for seed in support::chaos_seeds(6) {
        through_the_faults(seed).await;
    }
}

async fn through_the_faults(seed: u64) {
    use redis::AsyncCommands;
    use support::FaultProxy;
    use tower_redis_resilience::ResilientClient;

    const DEADLINE: Duration = Duration::from_millis(250);
    const GRACE: Duration = Duration::from_millis(150);

    let durable = || {
        RedisServer::config()
            .arg("appendonly", "yes")
            .arg("appendfsync", "always")
            .start()
    };
    let servers = [durable(), durable()];
    let proxy = Arc::new(FaultProxy::start(servers[0].port()).await);
    // The handshake's bytes, from a first connection.
    drop(
        Connector::from_url(&proxy.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let handshake = proxy.first_connection_bytes();
    let mut servers = tokio::task::spawn_blocking(move || {
        servers[1].replicate(&servers[0]);
        servers
    })
    .await
    .unwrap();
    let mut client = ResilientClient::builder(&proxy.url())
        .connect()
        .await
        .unwrap();
    let () = client.set("k", "v").await.unwrap();

    SETTLED.store(false, Ordering::SeqCst);
    let faults = fault_sequence(seed);
    let seen = Arc::new(Seen {
        per_phase: Mutex::new(vec![(0, 0); faults.len() + 1]),
        ..Seen::default()
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..8u64)
        .map(|caller| {
            let (mut client, seen, stop) = (client.clone(), seen.clone(), stop.clone());
            tokio::spawn(async move {
                for turn in caller.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let started = Instant::now();
                    let (what, served) = match turn % 4 {
                        0 => {
                            let reply: redis::RedisResult<u64> = client.incr("counter", 1).await;
                            match &reply {
                                Ok(_) => seen.incr_acked.fetch_add(1, Ordering::SeqCst),
                                Err(err) if Error::from(err.clone()).may_have_run() => {
                                    seen.incr_maybe_run.fetch_add(1, Ordering::SeqCst)
                                }
                                Err(_) => 0,
                            };
                            ("INCR", reply.is_ok())
                        }
                        1 => {
                            let reply: redis::RedisResult<(u64,)> = redis::pipe()
                                .atomic()
                                .incr("transactions", 1)
                                .query_async(&mut client)
                                .await;
                            match &reply {
                                Ok(_) => seen.transactions_acked.fetch_add(1, Ordering::SeqCst),
                                Err(err) if Error::from(err.clone()).may_have_run() => {
                                    seen.transactions_maybe_run.fetch_add(1, Ordering::SeqCst)
                                }
                                Err(_) => 0,
                            };
                            ("MULTI", reply.is_ok())
                        }
                        _ => {
                            seen.reads.fetch_add(1, Ordering::SeqCst);
                            let reply: redis::RedisResult<Option<String>> = client.get("k").await;
                            match &reply {
                                Ok(Some(value)) if value == "v" => {}
                                Ok(None) => {
                                    seen.misses.fetch_add(1, Ordering::SeqCst);
                                }
                                other => seen.wrong.lock().unwrap().push(format!("{other:?}")),
                            }
                            ("GET", matches!(reply, Ok(Some(_))))
                        }
                    };
                    let took = started.elapsed();
                    {
                        let mut per_phase = seen.per_phase.lock().unwrap();
                        let counts = &mut per_phase[seen.phase.load(Ordering::SeqCst)];
                        if served { counts.0 += 1 } else { counts.1 += 1 }
                    }
                    if took > DEADLINE + GRACE {
                        seen.late.lock().unwrap().push((what, took));
                    }
                    if !served {
                        if SETTLED.load(Ordering::SeqCst) {
                            seen.failed_after.fetch_add(1, Ordering::SeqCst);
                        }
                        // An application backs off a little when Redis is away.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            })
        })
        .collect();

    let mut master = 0;
    let mut done = Vec::new();
    for (index, (fault, lasts, then_calm)) in faults.into_iter().enumerate() {
        seen.phase.store(index, Ordering::SeqCst);
        let proxy = proxy.clone();
        let applied;
        (servers, master, applied) = tokio::task::spawn_blocking(move || {
            let replica = 1 - master;
            let mut now_master = master;
            let applied = match fault {
                Fault::Kill => {
                    servers[master].kill();
                    std::thread::sleep(lasts);
                    servers[master].restart();
                    format!("kill {lasts:?}")
                }
                Fault::Pause => {
                    servers[master].pause();
                    std::thread::sleep(lasts);
                    servers[master].resume();
                    format!("pause {lasts:?}")
                }
                Fault::Slow => {
                    proxy.delay_replies(Duration::from_millis(300));
                    std::thread::sleep(lasts);
                    proxy.delay_replies(Duration::ZERO);
                    format!("slow {lasts:?}")
                }
                Fault::Silence => {
                    proxy.silence_open_connections();
                    std::thread::sleep(lasts);
                    "silence".to_owned()
                }
                Fault::Cut => {
                    let bytes = lasts.as_millis() as u64 % 300;
                    proxy.cut_replies_after(bytes);
                    std::thread::sleep(lasts);
                    proxy.cut_replies_after(u64::MAX);
                    format!("cut after {bytes} bytes for {lasts:?}")
                }
                Fault::Reset => {
                    let before = proxy.connections();
                    proxy.cut_each_connection_after(handshake);
                    // The open connections close at their next reply (new ones too,
                    // for this moment).
                    proxy.cut_replies_after(0);
                    std::thread::sleep(Duration::from_millis(20));
                    proxy.cut_replies_after(u64::MAX);
                    std::thread::sleep(lasts);
                    proxy.cut_each_connection_after(u64::MAX);
                    let opened = proxy.connections() - before;
                    format!("reset at the first request for {lasts:?} ({opened} connections)")
                }
                Fault::HoldWrites => {
                    let millis = lasts.as_millis().to_string();
                    servers[master].raw_command(&["CLIENT", "PAUSE", &millis, "WRITE"]);
                    std::thread::sleep(lasts);
                    format!("writes held {lasts:?}")
                }
                Fault::Failover => {
                    let started = Instant::now();
                    // After a kill the replica syncs again first.
                    while servers[replica].info_field("master_link_status") != "up" {
                        assert!(started.elapsed() < Duration::from_secs(10), "no replica");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    assert_eq!(servers[master].raw_command(&["FAILOVER"]), "OK");
                    while servers[master].info_field("role") != "slave"
                        || servers[replica].info_field("role") != "master"
                    {
                        assert!(started.elapsed() < Duration::from_secs(10), "no failover");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    proxy.retarget(servers[replica].port());
                    now_master = replica;
                    format!("failover in {:?}", started.elapsed())
                }
            };
            std::thread::sleep(then_calm);
            (servers, now_master, applied)
        })
        .await
        .unwrap();
        done.push(applied);
    }
    seen.phase.store(done.len(), Ordering::SeqCst);
    // A silenced connection is found within ~1.3 s of the silence: then every call must be
    // served.
    tokio::time::sleep(Duration::from_secs(2)).await;
    SETTLED.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for caller in callers {
        caller.await.expect("no caller panicked");
    }

    let health = client.health().await;
    let (counter, transactions) = tokio::task::spawn_blocking(move || {
        let read = |key| {
            servers[master]
                .raw_command(&["GET", key])
                .parse()
                .unwrap_or(0u64)
        };
        (read("counter"), read("transactions"))
    })
    .await
    .unwrap();
    let load = |n: &AtomicU64| n.load(Ordering::SeqCst);
    let (acked, maybe_run) = (load(&seen.incr_acked), load(&seen.incr_maybe_run));
    let (tx_acked, tx_maybe_run) = (
        load(&seen.transactions_acked),
        load(&seen.transactions_maybe_run),
    );
    done.push("calm".to_owned());
    let per_phase = seen.per_phase.lock().unwrap().clone();
    let phases: Vec<String> = done
        .iter()
        .zip(&per_phase)
        .map(|(fault, (served, not))| format!("{fault}: {served} served, {not} not"))
        .collect();
    eprintln!(
        "seed {seed}: {phases:#?}\n  INCR {counter} (acked {acked}, maybe run {maybe_run}), \
         transactions {transactions} (acked {tx_acked}, maybe run {tx_maybe_run}), \
         {} of {} reads missed",
        load(&seen.misses),
        load(&seen.reads),
    );
    assert!(
        seen.late.lock().unwrap().is_empty(),
        "seed {seed}: calls outlived their deadline: {:?}",
        seen.late.lock().unwrap()
    );
    assert!(
        seen.wrong.lock().unwrap().is_empty(),
        "seed {seed}: {:?}",
        seen.wrong.lock().unwrap()
    );
    assert!(
        acked <= counter && counter <= acked + maybe_run,
        "seed {seed}: INCR count {counter}, acked {acked}, maybe run {maybe_run}"
    );
    assert!(
        tx_acked <= transactions && transactions <= tx_acked + tx_maybe_run,
        "seed {seed}: transactions {transactions}, acked {tx_acked}, maybe run {tx_maybe_run}"
    );
    assert!(
        acked > 100 && tx_acked > 100,
        "seed {seed}: too little served"
    );
    assert_eq!(
        load(&seen.failed_after),
        0,
        "seed {seed}: calls failed 2 s after the last fault"
    );
    let breaker = health.breaker.unwrap();
    assert_eq!(
        breaker.state,
        tower_redis_resilience::circuit_breaker::BreakerState::Closed,
        "seed {seed}: {breaker:?}"
    );
}
