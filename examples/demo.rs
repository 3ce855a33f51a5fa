//! What the crate is for, made visible: steady traffic through the default stack while
//! Redis is killed, restarted, paused (SIGSTOP), resumed, slowed down, made to hold
//! writes (`CLIENT PAUSE WRITE`) and failed over,
//! with a line every half second and a summary proving that no call outlived its
//! deadline.
//!
//! `cargo run --example demo` starts throwaway `redis-server`s on free loopback ports (it
//! must be installed) and injects the faults itself. The client knows one address, a
//! forwarding proxy standing in for a DNS name: it holds every reply 300 ms while Redis
//! is "slow" (an overloaded server, a bad network), and the failover makes the first
//! server a replica of a standby and points the address at the standby, as a cloud
//! failover does.
//! With `REDIS_URL` set it drives traffic at that server for a few seconds but injects no
//! faults: it cannot kill a server it does not own.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redis::AsyncCommands;
use tower_redis_resilience::{
    Error, ResilientClient,
    metrics::{Outcome, Registry, Snapshot},
};

const WORKERS: usize = 16;
const KEYS: u32 = 100;
const INTERVAL: Duration = Duration::from_millis(500);
/// How long a call may take beyond its deadline before the demo calls it a failure: the
/// time a busy 2-core machine may take to wake the task up.
const GRACE: Duration = Duration::from_millis(50);

/// What the app saw in one interval.
#[derive(Default)]
struct Seen {
    latencies: Vec<Duration>,
    write_errors: u64,
}

/// One phase of the run, for the summary.
struct Phase {
    name: &'static str,
    calls: u64,
    outcomes: [u64; Outcome::ALL.len()],
    write_errors: u64,
    /// Connections opened.
    connections: u64,
    max: Duration,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (url, server) = support::redis_url_or_throwaway_server();
    // With servers of its own: a standby to fail over to, and the address clients know.
    let (url, lab) = match server {
        Some(server) => {
            let proxy = support::FaultProxy::start(server.port()).await;
            let lab = Lab {
                server: Mutex::new(server),
                standby: tokio::task::spawn_blocking(support::RedisServer::start).await?,
                proxy,
            };
            (lab.proxy.url(), Some(Arc::new(lab)))
        }
        None => (url, None),
    };
    let client = ResilientClient::builder(&url).connect().await?;
    let deadline = client
        .timeout()
        .and_then(|t| t.deadline_for(&redis::cmd("GET").arg("k").into()))
        .unwrap_or(Duration::MAX);
    println!(
        "redis at {}; default stack, deadline {deadline:?}; {WORKERS} workers, 90 % GET / 10 % SET",
        client.address()
    );
    let mut seed = client.clone();
    for key in 0..KEYS {
        let () = seed.set(format!("demo:{key}"), "cached").await?;
    }

    let seen = Arc::new(Mutex::new(Seen::default()));
    for seed in 0..WORKERS as u64 {
        tokio::spawn(worker(client.clone(), seen.clone(), seed));
    }

    // (when, what to do, the phase it starts)
    let schedule: Vec<(Duration, Option<Fault>, &str)> = match lab {
        Some(_) => vec![
            (Duration::ZERO, None, "steady"),
            (Duration::from_secs(2), Some(Fault::Kill), "killed"),
            (Duration::from_secs(4), Some(Fault::Restart), "restarted"),
            (Duration::from_secs(6), Some(Fault::Pause), "paused"),
            (Duration::from_secs(8), Some(Fault::Resume), "resumed"),
            (Duration::from_secs(10), Some(Fault::Slow), "slow"),
            (Duration::from_secs(12), Some(Fault::Fast), "fast"),
            (Duration::from_secs(14), Some(Fault::HoldWrites), "held"),
            (Duration::from_secs(16), Some(Fault::FailOver), "failover"),
            (Duration::from_secs(18), None, "end"),
        ],
        None => {
            println!(
                "REDIS_URL is set: no faults are injected into a server the demo does not own"
            );
            vec![
                (Duration::ZERO, None, "steady"),
                (Duration::from_secs(4), None, "end"),
            ]
        }
    };

    println!(
        "\n{:>5}  {:<9} {:>6} {:>8} {:>8} {:>7} {:>7} {:>10} {:>8} {:>8}  {:<9} connection",
        "t",
        "phase",
        "ok",
        "fallback",
        "rejected",
        "timeout",
        "unavail",
        "write-errs",
        "p99",
        "max",
        "breaker"
    );
    let started = Instant::now();
    let mut phases: Vec<Phase> = Vec::new();
    let mut last = client.metrics().unwrap_or_else(empty);
    // Every connection the client opened: the shared one's, and those beside it (for
    // blocking commands, and to ask whether Redis answers while the shared one is suspect).
    let opened = |stats: tower_redis_resilience::reconnect::ReconnectStats| {
        stats.successes + stats.blocking_connections
    };
    let mut last_connections = opened(client.reconnect_stats());
    let mut next = 0;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now(), INTERVAL);
    'run: loop {
        tick.tick().await;
        let now = started.elapsed();
        if let Some(phase) = phases.last_mut() {
            let snapshot = client.metrics().unwrap_or_else(empty);
            let interval = std::mem::take(&mut *seen.lock().unwrap());
            let mut latencies = interval.latencies;
            latencies.sort_unstable();
            let p99 = latencies
                .get(latencies.len().saturating_sub(1) * 99 / 100)
                .copied()
                .unwrap_or_default();
            let max = latencies.last().copied().unwrap_or_default();
            let delta = |outcome| snapshot.overall.count(outcome) - last.overall.count(outcome);
            // From the same snapshot as the outcomes, so they add up to it.
            phase.calls += snapshot.overall.calls() - last.overall.calls();
            for outcome in Outcome::ALL {
                phase.outcomes[outcome as usize] += delta(outcome);
            }
            phase.write_errors += interval.write_errors;
            let connections = opened(client.reconnect_stats());
            phase.connections += connections - last_connections;
            last_connections = connections;
            phase.max = phase.max.max(max);
            println!(
                "{:>4.1}s  {:<9} {:>6} {:>8} {:>8} {:>7} {:>7} {:>10} {:>8} {:>8}  {:<9} {:?}",
                now.as_secs_f64(),
                phase.name,
                delta(Outcome::Ok),
                delta(Outcome::Fallback),
                delta(Outcome::CircuitOpen),
                delta(Outcome::Timeout),
                delta(Outcome::Unavailable),
                interval.write_errors,
                format!("{p99:.1?}"),
                format!("{max:.1?}"),
                client
                    .circuit_breaker()
                    .map_or("none".to_owned(), |breaker| format!(
                        "{:?}",
                        breaker.state()
                    )),
                client.connection_state(),
            );
            last = snapshot;
        }
        // Start the phases that are due.
        while next < schedule.len() && schedule[next].0 <= now + Duration::from_millis(1) {
            let (_, fault, name) = &schedule[next];
            if let (Some(fault), Some(lab)) = (fault, &lab) {
                let lab = lab.clone();
                let fault = *fault;
                // The harness blocks while it waits for the server; keep it off the runtime.
                tokio::task::spawn_blocking(move || fault.apply(&lab)).await?;
            }
            if next == schedule.len() - 1 {
                break 'run; // "end" is not a phase
            }
            phases.push(Phase {
                name,
                calls: 0,
                outcomes: [0; Outcome::ALL.len()],
                write_errors: 0,
                connections: 0,
                max: Duration::ZERO,
            });
            next += 1;
        }
    }

    println!(
        "\n{:<9} {:>7} {:>7} {:>8} {:>8} {:>7} {:>7} {:>10} {:>9} {:>9}  within deadline + {GRACE:?}?",
        "phase",
        "calls",
        "ok",
        "fallback",
        "rejected",
        "timeout",
        "unavail",
        "write-errs",
        "new conns",
        "slowest"
    );
    let mut all_within = true;
    for phase in &phases {
        let within = phase.max <= deadline + GRACE;
        all_within &= within;
        println!(
            "{:<9} {:>7} {:>7} {:>8} {:>8} {:>7} {:>7} {:>10} {:>9} {:>9}  {}",
            phase.name,
            phase.calls,
            phase.outcomes[Outcome::Ok as usize],
            phase.outcomes[Outcome::Fallback as usize],
            phase.outcomes[Outcome::CircuitOpen as usize],
            phase.outcomes[Outcome::Timeout as usize],
            phase.outcomes[Outcome::Unavailable as usize],
            phase.write_errors,
            phase.connections,
            format!("{:.1?}", phase.max),
            if within { "yes" } else { "NO" },
        );
    }
    let health = client.health().await;
    println!(
        "\nhealth now: {:?}, {:?}, ping {:?}; {} reconnect attempts, {} fallbacks in all",
        health.status,
        health.connection,
        health.ping,
        health.reconnects.attempts,
        client.fallback().map_or(0, |fallback| fallback.fallbacks()),
    );
    if !all_within {
        return Err("a call outlived its deadline".into());
    }
    println!("no call outlived its deadline; reads kept answering (misses) through every fault");
    Ok(())
}

/// Calls until the process ends: a GET of a random key, or one time in ten a SET.
async fn worker(mut client: ResilientClient, seen: Arc<Mutex<Seen>>, seed: u64) {
    // xorshift: the demo needs variety, not quality.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut pause = tokio::time::interval(Duration::from_millis(2));
    pause.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        pause.tick().await;
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let key = format!("demo:{}", state % u64::from(KEYS));
        let write = (state >> 32).is_multiple_of(10);
        let started = Instant::now();
        let write_failed = if write {
            client.set::<_, _, ()>(&key, "cached").await.is_err()
        } else {
            // A miss while Redis is away is what the fallback layer is for; only a bug
            // would make a read fail here.
            if let Err(err) = client.get::<_, Option<String>>(&key).await {
                eprintln!("unexpected read error: {}", Error::from(err));
            }
            false
        };
        let took = started.elapsed();
        let mut seen = seen.lock().unwrap();
        seen.latencies.push(took);
        seen.write_errors += u64::from(write_failed);
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    Restart,
    Pause,
    Resume,
    Slow,
    Fast,
    HoldWrites,
    FailOver,
}

/// The servers the demo owns, and the address its client knows.
struct Lab {
    server: Mutex<support::RedisServer>,
    standby: support::RedisServer,
    proxy: support::FaultProxy,
}

impl Fault {
    fn apply(self, lab: &Lab) {
        let mut server = lab.server.lock().unwrap();
        match self {
            Fault::Kill => server.kill(),
            Fault::Restart => server.restart(),
            Fault::Pause => server.pause(),
            Fault::Resume => server.resume(),
            // Every reply 300 ms late: past the 250 ms deadline, so every call times out,
            // yet Redis answers. The connection is kept (it answers a PING), not reopened
            // every few timeouts.
            Fault::Slow => lab.proxy.delay_replies(Duration::from_millis(300)),
            Fault::Fast => lab.proxy.delay_replies(Duration::ZERO),
            // As Redis's `FAILOVER` and a cluster's manual failover do while the replica
            // catches up, and managed services during maintenance: writes are held (for
            // 1.8 s here), reads served. On the shared connection every read sent after a
            // held write waits with it; once the connection is suspect, reads go on a
            // second connection, where Redis answers them.
            Fault::HoldWrites => {
                server.raw_command(&["CLIENT", "PAUSE", "1800", "WRITE"]);
            }
            Fault::FailOver => {
                // The standby is the master now, the old master its replica (it answers
                // writes with READONLY at once, before it has synced), and the address
                // leads to the standby at the same moment.
                let standby = lab.standby.port().to_string();
                server.raw_command(&["REPLICAOF", "127.0.0.1", &standby]);
                lab.proxy.retarget(lab.standby.port());
            }
        }
    }
}

fn empty() -> Snapshot {
    Registry::new().snapshot()
}
