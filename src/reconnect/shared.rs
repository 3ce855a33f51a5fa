//! The state every clone of one `Reconnect` shares, and its one reconnect loop.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    sync::{Semaphore, SemaphorePermit, watch},
    time::Instant,
};
use tower::Service;

use super::{
    ConnectionState, ReconnectConfig, ReconnectStats,
    config::{Young, delay_after},
};
use crate::{Error, MakeConnection, Request, backoff::Delays, sync::Leased};

type Connection<M> = <M as MakeConnection>::Connection;

/// How many times its `PING` timeout a suspect connection is waited for at most while the
/// server says it holds the connection's command up
/// ([`side_reads`](ReconnectConfig::side_reads)): a write pause lasts up to seconds (a
/// cluster's manual failover gives up after 5 s), a `WAIT` as long as it asks.
const HELD_AT_MOST: u32 = 10;

/// What the server, asked on another connection, says of a suspect one.
#[derive(Debug)]
enum Beside {
    /// It holds up the connection's command (flagged `b`, blocked: a write a `CLIENT
    /// PAUSE WRITE` holds, a `WAIT`).
    Held,
    /// It answered, and holds nothing up (it sees the connection idle: what was sent
    /// never arrived), or cannot tell (an ACL user that may not ask, Redis before 6.2, a
    /// connection it no longer knows).
    NotHeld,
    /// It did not answer within the timeout, or the connection beside broke: reads
    /// cannot go there either.
    Silent,
}

/// What the server, asked on `connection` (`CLIENT LIST ID`), says of the connection it
/// knows as `id`.
async fn held_by_the_server<C>(connection: C, id: u64, timeout: Duration) -> Beside
where
    C: Service<Request, Response = redis::Value, Error = Error>,
{
    let list = Request::from(
        redis::cmd("CLIENT")
            .arg("LIST")
            .arg("ID")
            .arg(id)
            .to_owned(),
    );
    let reply = match ask(connection, list, timeout).await {
        Some(Ok(reply)) => reply,
        Some(Err(error)) if error.is_server() || error.is_config() => return Beside::NotHeld,
        Some(Err(_)) | None => return Beside::Silent,
    };
    let Ok(text) = redis::from_redis_value::<String>(reply) else {
        return Beside::NotHeld;
    };
    let held = text
        .split_whitespace()
        .find_map(|field| field.strip_prefix("flags="))
        .is_some_and(|flags| flags.contains('b'));
    if held { Beside::Held } else { Beside::NotHeld }
}

/// `request`'s reply on `connection`, or `None` if none came within `timeout`.
async fn ask<C>(
    mut connection: C,
    request: Request,
    timeout: Duration,
) -> Option<Result<redis::Value, Error>>
where
    C: Service<Request, Response = redis::Value, Error = Error>,
{
    let asked = async {
        std::future::poll_fn(|cx| connection.poll_ready(cx)).await?;
        connection.call(request).await
    };
    tokio::time::timeout(timeout, asked).await.ok()
}

/// `readonly_reconnected_at` before a `READONLY` reply ever replaced the connection.
const NEVER: u64 = u64::MAX;

/// In `stuck`, beside the count: no call has had a reply on the connection the loop
/// opened last. Cleared by the first reply at no cost to the others, which only read
/// `stuck` (it is not 0 until then).
const UNANSWERED: u32 = 1 << 31;

pub(super) struct Shared<M: MakeConnection> {
    pub connector: M,
    pub config: ReconnectConfig<Connection<M>>,
    /// Bumped (under the slot lock) whenever the connection is lost or replaced, so a
    /// handle refreshes its cached connection with one atomic load per call.
    pub generation: AtomicU64,
    /// Calls cancelled in a row with no reply in between, and [`UNANSWERED`].
    stuck: AtomicU32,
    /// When a `READONLY` reply last replaced the connection: nanoseconds after `origin`,
    /// [`NEVER`] before the first time.
    readonly_reconnected_at: AtomicU64,
    origin: Instant,
    slot: Mutex<Slot<Connection<M>>>,
    state: watch::Sender<ConnectionState>,
    attempts: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    /// Connections for blocking commands, between calls, the most recently used last.
    blocking_idle: Mutex<Vec<Idle<M>>>,
    /// Opening connections for blocking commands after one failed.
    blocking_pace: Mutex<BlockingPace>,
    blocking_opened: AtomicU64,
    replica_reads: AtomicU64,
    side_reads: AtomicU64,
    /// Whether `aside` in the slot holds a connection: calls that find no connection read
    /// this, not the lock, to learn there is none.
    has_aside: AtomicBool,
    /// One permit per blocking call that may run at once.
    blocking_turns: Semaphore,
    /// The owner the handles hold, for the reconnect loop: none is started once they are
    /// gone.
    this: Weak<Leased<Shared<M>>>,
    /// Whether a health-check task runs. It runs on the runtime that started it, and ends
    /// with it: a client made on one runtime and used on another (a static client shared
    /// by `#[tokio::test]`s, each with a runtime of its own) gets one started again by
    /// the next connection made on the runtime in use.
    health_checking: AtomicBool,
    /// The run of the reconnect loop under way, 0 if none. Set (under the slot lock) when
    /// one starts and cleared when it ends, or by its task if that is dropped unfinished,
    /// with the runtime it ran on: then the next call that finds no connection, on
    /// whatever runtime it comes from, starts another
    /// ([`keep_reconnecting`](Self::keep_reconnecting)). Otherwise a client whose runtime
    /// shut down while it reconnected (a static client shared by `#[tokio::test]`s, a
    /// runtime per job) said "reconnecting" for ever on the next.
    looping: AtomicU64,
}

/// A connection kept for blocking commands between calls.
struct Idle<M: MakeConnection> {
    /// The shared connection's generation when it was opened.
    generation: u64,
    /// When it was put back.
    since: Instant,
    connection: Connection<M>,
}

/// Tries to open connections for blocking commands, paced by the backoff schedule once
/// one failed, until a new one opens and answers. Otherwise a worker's `BLPOP` loop on a
/// server at `maxclients`, which closes new connections at once, opened one per call
/// (measured: ~720 a second, each refused), as did a middlebox that drops connections as
/// soon as they open.
#[derive(Default)]
struct BlockingPace {
    /// The schedule since the first failure; `None` while opening works.
    delays: Option<Delays>,
    /// No try before then.
    next_try_at: Option<Instant>,
    /// What the last try met, for the calls refused until the next.
    error: Option<Error>,
}

struct Slot<C> {
    connection: Option<C>,
    /// The connection taken out of use while a `PING` asks whether it is stuck: put back
    /// if it answers, dropped if not. Calls meanwhile find no connection.
    suspect: Option<C>,
    /// While the suspect connection is out of use, and if it is replaced until its
    /// successor is in place: [`side`](Self::side), which answered a `PING` the suspect
    /// one had not, for reads ([`side_reads`](ReconnectConfig::side_reads)).
    aside: Option<C>,
    /// A connection to the same server, opened the first time one was suspect to ask
    /// whether Redis answers beside it, and kept for the next time: opened each time,
    /// against a Redis that is slow rather than held up, it would be one handshake more
    /// every few timeouts. Dropped with the shared connection, and when it goes silent.
    side: Option<C>,
    /// Whether a side connection could not be opened, or went silent, since the shared
    /// connection was opened: no other is tried until it is replaced. Against a server too
    /// slow to finish a handshake within the connect timeout, each try would be one more
    /// connection for it to accept and drop, every few timeouts.
    side_failed: bool,
    /// Counts the shared connection's losses and replacements: a side connection opened
    /// across one may lead to the server the shared connection has left.
    replaced: u64,
    /// Runs of the reconnect loop started, which numbers them.
    loop_runs: u64,
    failed: bool,
    attempt: u32,
    next_try_at: Option<Instant>,
    /// The last attempt's error when it was about configuration or credentials: calls
    /// get it instead of a bare "reconnecting", since it says what to fix.
    config_error: Option<Error>,
    /// The schedule the reconnect loop opened the connection in use on, while it is
    /// young: lost before it [settled](super::config::SETTLED) with no call answered,
    /// the next loop goes on with it.
    young: Option<Young>,
}

impl<M: MakeConnection> Shared<M> {
    pub fn new(
        connector: M,
        config: ReconnectConfig<Connection<M>>,
        connection: Option<Connection<M>>,
    ) -> Arc<Leased<Self>> {
        let state = match connection {
            Some(_) => ConnectionState::Connected,
            None => ConnectionState::Reconnecting { attempt: 0 },
        };
        let blocking_max = config.blocking_max.min(Semaphore::MAX_PERMITS);
        let watched = connection.clone();
        let shared = Arc::new_cyclic(|this| {
            Leased::new(Shared {
                connector,
                config,
                generation: AtomicU64::new(1),
                stuck: AtomicU32::new(0),
                readonly_reconnected_at: AtomicU64::new(NEVER),
                origin: Instant::now(),
                slot: Mutex::new(Slot {
                    connection,
                    suspect: None,
                    aside: None,
                    side: None,
                    side_failed: false,
                    replaced: 0,
                    loop_runs: 0,
                    failed: false,
                    attempt: 0,
                    next_try_at: None,
                    config_error: None,
                    young: None,
                }),
                state: watch::Sender::new(state),
                attempts: AtomicU64::new(0),
                successes: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                blocking_idle: Mutex::new(Vec::new()),
                blocking_pace: Mutex::new(BlockingPace::default()),
                blocking_opened: AtomicU64::new(0),
                replica_reads: AtomicU64::new(0),
                side_reads: AtomicU64::new(0),
                has_aside: AtomicBool::new(false),
                blocking_turns: Semaphore::new(blocking_max),
                this: this.clone(),
                health_checking: AtomicBool::new(false),
                looping: AtomicU64::new(0),
            })
        });
        if let Some(connection) = &watched {
            shared.watch(connection);
        }
        shared
    }

    /// Has the connection just put in use watched: once it closes (the server closed it,
    /// idle or killed, restarted, or something between reset it; Sentinel retired it),
    /// the reconnect loop opens another at once, where the next call or health check
    /// would otherwise find it closed, and wait for its successor. The watch holds
    /// nothing of the connection, and ends when it closes.
    fn watch(&self, connection: &Connection<M>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if let Some(mut fences) = self.connector.fences(connection) {
            let this = self.this.clone();
            runtime.spawn(async move {
                while fences.changed().await.is_ok() {
                    let Some(shared) = this.upgrade() else {
                        return;
                    };
                    shared.fenced_in_use(&fences);
                }
            });
        }
        let Some(closed) = self.connector.closed(connection) else {
            return;
        };
        let this = self.this.clone();
        runtime.spawn(async move {
            closed.await;
            if let Some(shared) = this.upgrade() {
                shared.closed_in_use();
            }
        });
    }

    /// A part of the servers behind a connection was fenced off
    /// ([`MakeConnection::fences`]): if it is the connection in use, and calls go to it,
    /// the state's watchers are told (its value unchanged), as of a new connection.
    fn fenced_in_use(&self, fences: &watch::Receiver<u64>) {
        let in_use = {
            let slot = self.slot();
            slot.connection
                .as_ref()
                .and_then(|connection| self.connector.fences(connection))
        };
        if in_use.is_some_and(|in_use| in_use.same_channel(fences))
            && *self.state.borrow() == ConnectionState::Connected
        {
            self.state.send_modify(|_| {});
        }
    }

    /// A connection closed: the one in use, if it is the one (a suspect one's `PING`
    /// finds out, one replaced meanwhile no longer matters), is lost.
    fn closed_in_use(&self) {
        let generation = {
            let slot = self.slot();
            match &slot.connection {
                Some(connection) if self.connector.is_closed(connection) => {
                    self.generation.load(Ordering::Acquire)
                }
                _ => return,
            }
        };
        self.connection_lost(generation, "the connection closed");
    }

    /// Starts the health-check task on the runtime in use, if one is configured and none
    /// runs (never started, or ended with the runtime that started it).
    pub fn keep_health_checked(&self) {
        let Some((interval, timeout)) = self.config.health_check else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.health_checking.swap(true, Ordering::AcqRel) {
            return;
        }
        let running = HealthChecking(self.this.clone());
        runtime.spawn(health_check(running, interval, timeout));
    }

    fn slot(&self) -> MutexGuard<'_, Slot<Connection<M>>> {
        // The slot holds plain data that every writer leaves consistent; a panic elsewhere
        // while holding the lock does not make it unusable.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current generation and connection.
    pub fn current(&self) -> (u64, Option<Connection<M>>) {
        let slot = self.slot();
        (
            self.generation.load(Ordering::Acquire),
            slot.connection.clone(),
        )
    }

    /// The error for a call that finds no connection.
    pub fn rejection(&self) -> Error {
        let slot = self.slot();
        if let Some(error) = &slot.config_error {
            return error.clone();
        }
        if slot.suspect.is_some() {
            return match slot.aside {
                Some(_) => Error::held(),
                None => Error::suspect(),
            };
        }
        if slot.failed {
            return Error::unavailable("reconnecting gave up; call Reconnect::reconnect to retry");
        }
        if self.looping.load(Ordering::Acquire) == 0 {
            // A call that finds no connection starts the loop if it can.
            return Error::unavailable(
                "not connected, and no reconnect can start outside a Tokio runtime: the \
                 next call made inside one starts it",
            );
        }
        let next = slot
            .next_try_at
            .map(|at| at.saturating_duration_since(Instant::now()));
        Error::reconnecting(slot.attempt, next)
    }

    pub fn subscribe(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }

    pub fn stats(&self) -> ReconnectStats {
        ReconnectStats {
            attempts: self.attempts.load(Ordering::Relaxed),
            successes: self.successes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            blocking_connections: self.blocking_opened.load(Ordering::Relaxed),
            replica_reads: self.replica_reads.load(Ordering::Relaxed)
                + self.connector.replica_reads(),
            side_reads: self.side_reads.load(Ordering::Relaxed),
        }
    }

    fn blocking_idle(&self) -> MutexGuard<'_, Vec<Idle<M>>> {
        self.blocking_idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection for a blocking command, opened while the shared connection of
    /// `generation` was current. Older ones lead where the shared connection no longer
    /// does (a restart, a failover) and are closed, and so are those idle longer than
    /// the configuration allows (something between may have dropped them unannounced).
    pub fn idle_blocking(&self, generation: u64) -> Option<Connection<M>> {
        let stale_before = Instant::now().checked_sub(self.config.blocking_idle_timeout);
        let mut idle = self.blocking_idle();
        while let Some(kept) = idle.pop() {
            if stale_before.is_some_and(|stale_before| kept.since < stale_before) {
                // The others were put back earlier still: close them all, outside the lock.
                let stale = std::mem::take(&mut *idle);
                drop(idle);
                drop(stale);
                return None;
            }
            if kept.generation == generation {
                return Some(kept.connection);
            }
        }
        None
    }

    fn blocking_pace(&self) -> MutexGuard<'_, BlockingPace> {
        self.blocking_pace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The error for a blocking call that must not try to open a connection yet, a try
    /// having failed lately; `None` when it may.
    pub fn blocking_paced(&self) -> Option<Error> {
        let pace = self.blocking_pace();
        let left = pace.next_try_at?.checked_duration_since(Instant::now())?;
        let error = pace.error.as_ref()?;
        Some(if error.is_config() {
            error.clone()
        } else {
            Error::no_connection_of_its_own_until(error, Some(left))
        })
    }

    /// A try to open a connection for blocking commands failed with `error`, or opened
    /// one that broke before it answered: the next waits the schedule's next step (the
    /// longest for a configuration error). Tries that failed together count once.
    pub fn blocking_open_failed(&self, error: &Error) {
        let mut pace = self.blocking_pace();
        let now = Instant::now();
        if pace.next_try_at.is_some_and(|at| at > now) {
            return;
        }
        let backoff = &self.config.backoff;
        let delays = pace.delays.get_or_insert_with(|| backoff.iter());
        // Past the end of the schedule: on at its longest delay.
        let delay = delay_after(delays, backoff, error).unwrap_or(backoff.max());
        pace.next_try_at = Some(now + delay);
        pace.error = Some(error.clone());
    }

    /// A connection opened for a blocking command answered: opening works.
    pub fn blocking_opened(&self) {
        let mut pace = self.blocking_pace();
        if pace.delays.is_some() {
            *pace = BlockingPace::default();
        }
    }

    /// A turn to run a blocking call, waited for while as many run as the configuration
    /// allows. (The semaphore is never closed.)
    pub async fn blocking_turn(&self) -> Option<SemaphorePermit<'_>> {
        self.blocking_turns.acquire().await.ok()
    }

    /// Opens a connection for a blocking command, with the user's hook run on it.
    pub async fn open_blocking(&self) -> Result<Connection<M>, Error> {
        let connection = open_with(|| self.connector.connect_blocking(), &self.config).await?;
        self.blocking_opened.fetch_add(1, Ordering::Relaxed);
        Ok(connection)
    }

    /// Keeps a connection a blocking command is done with for the next one, unless as
    /// many are idle as the configuration allows or the shared connection was lost or
    /// replaced since it was opened.
    pub fn put_back_blocking(&self, generation: u64, connection: Connection<M>) {
        let limit = self.config.blocking_idle.unwrap_or(0);
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        let mut idle = self.blocking_idle();
        if idle.len() < limit {
            idle.push(Idle {
                generation,
                since: Instant::now(),
                connection,
            });
        }
    }

    pub fn count_initial_connect(&self) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        self.successes.fetch_add(1, Ordering::Relaxed);
    }

    /// A reply came back on the connection: it is not stuck, and it answered.
    pub fn alive(&self) {
        if self.stuck.load(Ordering::Relaxed) != 0 {
            self.stuck.store(0, Ordering::Relaxed);
        }
    }

    /// The replica answered a read while there was no connection.
    pub fn read_from_replica(&self) {
        self.replica_reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether reads may go aside: one atomic load, so that calls refused while there is
    /// no connection do not take the lock to learn that they may not.
    pub fn has_aside(&self) -> bool {
        self.has_aside.load(Ordering::Acquire)
    }

    /// The connection reads go on while the suspect one is out of use (and, if that is
    /// replaced, until its successor is in place), with the generation it serves, if the
    /// server answered on it.
    pub fn aside(&self) -> Option<(u64, Connection<M>)> {
        let slot = self.slot();
        let aside = slot.aside.clone()?;
        Some((self.generation.load(Ordering::Acquire), aside))
    }

    /// A read was served on the connection aside.
    pub fn read_aside(&self) {
        self.side_reads.fetch_add(1, Ordering::Relaxed);
    }

    /// The connection aside, serving `generation`, broke: reads no longer go there.
    pub fn aside_lost(&self, generation: u64) {
        let mut slot = self.slot();
        if self.generation.load(Ordering::Acquire) == generation {
            self.clear_aside(&mut slot);
        }
    }

    /// Has reads go on `connection` while the suspect connection of `suspect_generation`
    /// is out of use; answers whether it is still.
    fn set_aside(&self, suspect_generation: u64, connection: Connection<M>) -> bool {
        let mut slot = self.slot();
        if self.generation.load(Ordering::Acquire) != suspect_generation || slot.suspect.is_none() {
            return false;
        }
        slot.aside = Some(connection);
        self.has_aside.store(true, Ordering::Release);
        true
    }

    /// Ends reads aside; the caller holds the slot, and changes the generation.
    fn clear_aside(&self, slot: &mut Slot<Connection<M>>) {
        if slot.aside.take().is_some() {
            self.has_aside.store(false, Ordering::Release);
        }
    }

    /// The side connection, asked a `PING` within `timeout`, if it answers: the one kept,
    /// or one opened now (and kept) if there is none or it closed. `None` if reads aside
    /// are off, if none can be opened, or if it stays silent too (the server stalls); a
    /// silent or broken one is dropped.
    async fn answering_side_connection(&self, timeout: Duration) -> Option<Connection<M>> {
        if !self.config.side_reads {
            return None;
        }
        let (kept, failed_before, replaced) = {
            let slot = self.slot();
            (slot.side.clone(), slot.side_failed, slot.replaced)
        };
        let failed = |this: &Self| {
            let mut slot = this.slot();
            if slot.replaced == replaced {
                slot.side = None;
                slot.side_failed = true;
            }
        };
        let connection = match kept {
            Some(kept) if !self.connector.is_closed(&kept) => kept,
            // Not opened when Redis had no room for one (`maxclients`, as a blocking
            // command's last try found).
            _ if failed_before || self.blocking_paced().is_some() => return None,
            _ => match self.open_blocking().await {
                Ok(opened) => {
                    let mut slot = self.slot();
                    if slot.replaced != replaced {
                        return None;
                    }
                    slot.side = Some(opened.clone());
                    opened
                }
                Err(_) => {
                    failed(self);
                    return None;
                }
            },
        };
        match self.ping(connection.clone(), timeout).await {
            Ping::Answered => Some(connection),
            Ping::Unknown => None,
            Ping::Failed | Ping::Silent => {
                failed(self);
                None
            }
        }
    }

    /// The shared connection was lost or replaced: the side connection goes with it.
    fn replaced(slot: &mut Slot<Connection<M>>) {
        slot.replaced = slot.replaced.wrapping_add(1);
        slot.side = None;
        slot.side_failed = false;
    }

    /// A call on the connection of `generation` was dropped before its reply came.
    pub fn cancelled(&self, generation: u64) {
        // One sent before the connection was suspected, or replaced, says nothing of the
        // current one.
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        let threshold = self.config.stuck_after;
        if threshold == 0 {
            return;
        }
        let count = (self.stuck.fetch_add(1, Ordering::Relaxed) + 1) & !UNANSWERED;
        if count >= threshold {
            let timeout = self.config.stuck_ping_timeout;
            if timeout.is_zero() {
                self.connection_lost(generation, "calls keep timing out with no reply");
            } else {
                self.suspect(generation, timeout);
            }
        }
    }

    /// Takes the connection of `generation` out of use, so calls fail fast (or wait
    /// [`max_wait`](ReconnectConfig::max_wait)) instead of each waiting out its deadline,
    /// and sends it a `PING`: an answer within `timeout` says Redis is slow, not
    /// unreachable, and puts the connection back; silence replaces it.
    fn suspect(&self, generation: u64, timeout: Duration) {
        let (Some(shared), Ok(runtime)) =
            (self.this.upgrade(), tokio::runtime::Handle::try_current())
        else {
            return self.connection_lost(generation, "calls keep timing out with no reply");
        };
        let (suspect_generation, connection) = {
            let mut slot = self.slot();
            if self.generation.load(Ordering::Acquire) != generation {
                return;
            }
            let Some(connection) = slot.connection.take() else {
                return;
            };
            slot.suspect = Some(connection.clone());
            self.stuck.store(0, Ordering::Relaxed);
            self.set_state(ConnectionState::Suspect);
            (
                self.generation.fetch_add(1, Ordering::AcqRel) + 1,
                connection,
            )
        };
        // Not a warning: against a slow Redis this comes every few timeouts, and the
        // fallback's summary and the metrics say so already. A replacement warns.
        tracing::debug!(
            address = self.connector.address(),
            "redis calls keep timing out; asking the connection a PING before replacing it"
        );
        let unsettled = Unsettled {
            shared: self.this.clone(),
            suspect_generation,
        };
        runtime.spawn(async move {
            let _unsettled = unsettled;
            let started = Instant::now();
            let client_id = shared.connector.client_id(&connection);
            // Asked for as long as a connection the server holds up is waited for; the
            // verdict is silence after `timeout` otherwise.
            let mut ping =
                std::pin::pin!(shared.ping(connection, timeout.saturating_mul(HELD_AT_MOST)));
            let mut side = std::pin::pin!(shared.answering_side_connection(timeout));
            let verdict = tokio::select! {
                verdict = &mut ping => {
                    shared.settle_suspicion(suspect_generation, verdict, started);
                    // Not dropped half-way: a side connection being opened is kept (unless
                    // the suspect one was just replaced, which the side one goes with).
                    side.await;
                    return;
                }
                aside = &mut side => match aside {
                    Some(aside) if shared.set_aside(suspect_generation, aside.clone()) => {
                        tracing::debug!(
                            address = shared.connector.address(),
                            "the suspect redis connection is held up, but redis answers on \
                             another: reads go there meanwhile"
                        );
                        shared
                            .while_held(&mut ping, aside, client_id, suspect_generation, started, timeout)
                            .await
                    }
                    _ => tokio::time::timeout_at(started + timeout, &mut ping)
                        .await
                        .unwrap_or(Ping::Silent),
                },
                // Neither answered in the PING's time (the side connection may still be
                // opening, within the longer connect timeout): replaced, as without it.
                () = tokio::time::sleep_until(started + timeout) => Ping::Silent,
            };
            shared.settle_suspicion(suspect_generation, verdict, started);
        });
    }

    /// Waits for the suspect connection's `ping` while reads go on `aside`. At the end of
    /// the `PING`'s time, and every `timeout` after, the server is asked on `aside`
    /// whether it holds up the suspect connection's command (`CLIENT LIST ID`: flagged
    /// blocked, as a write a `CLIENT PAUSE WRITE` holds or a `WAIT` is): then it is waited
    /// for, since it answers once that ends, and a new connection would be held by the
    /// next write as well. Otherwise (the server sees it idle, as when a middlebox cut it
    /// off and the calls never arrived; or it cannot tell) it is silent, and replaced,
    /// while reads go on aside until its successor is open. A server that does not answer
    /// on `aside` either (it stalls now) ends the reads there first.
    async fn while_held(
        &self,
        mut ping: impl Future<Output = Ping> + Unpin,
        aside: Connection<M>,
        client_id: Option<u64>,
        suspect_generation: u64,
        started: Instant,
        timeout: Duration,
    ) -> Ping {
        let mut ask_at = started + timeout;
        loop {
            tokio::select! {
                verdict = &mut ping => return verdict,
                () = tokio::time::sleep_until(ask_at) => {}
            }
            let Some(id) = client_id else {
                return Ping::Silent;
            };
            let beside = tokio::select! {
                verdict = &mut ping => return verdict,
                beside = held_by_the_server(aside.clone(), id, timeout) => beside,
            };
            match beside {
                Beside::Held => {}
                Beside::NotHeld => return Ping::Silent,
                Beside::Silent => {
                    self.aside_lost(suspect_generation);
                    return Ping::Silent;
                }
            }
            tracing::debug!(
                address = self.connector.address(),
                "redis holds up the suspect connection's command (a write pause, a WAIT): \
                 waiting for it"
            );
            ask_at += timeout;
        }
    }

    /// Acts on the answer to the suspect connection's `PING`: puts it back in use, or
    /// replaces it.
    fn settle_suspicion(&self, suspect_generation: u64, verdict: Ping, started: Instant) {
        match verdict {
            Ping::Answered | Ping::Unknown => {
                if self.reinstate(suspect_generation) {
                    tracing::debug!(
                        address = self.connector.address(),
                        answered_in = ?started.elapsed(),
                        "the redis connection answered PING: redis is slow, not \
                         unreachable; keeping the connection"
                    );
                }
            }
            Ping::Failed => self.connection_lost(
                suspect_generation,
                "calls kept timing out, and a PING failed",
            ),
            Ping::Silent => self.connection_lost(
                suspect_generation,
                "calls kept timing out, and a PING got no reply either",
            ),
        }
    }

    /// Puts the suspect connection back in use, unless something else happened to it
    /// meanwhile (lost, or a reconnect asked for). Answers whether it did.
    fn reinstate(&self, suspect_generation: u64) -> bool {
        let mut slot = self.slot();
        if self.generation.load(Ordering::Acquire) != suspect_generation {
            return false;
        }
        let Some(connection) = slot.suspect.take() else {
            return false;
        };
        slot.connection = Some(connection);
        self.clear_aside(&mut slot);
        self.stuck.store(0, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::AcqRel);
        // Wakes calls waiting for a connection, and has a breaker that follows the state
        // probe at once: Redis answered, so it may serve again (a stall that ended).
        self.set_state(ConnectionState::Connected);
        true
    }

    /// Sends a `PING` on `connection` and says what came of it.
    async fn ping(&self, connection: Connection<M>, timeout: Duration) -> Ping {
        let hung_means_stuck = self.connector.hung_calls_mean_stuck(&connection);
        match ask(connection, Request::from(redis::cmd("PING")), timeout).await {
            Some(Err(error)) if error.breaks_connection() => Ping::Failed,
            // Any reply, an error one included, comes from a live server.
            Some(_) => Ping::Answered,
            // A cluster's `PING` may wait on one stalled node, which says nothing about
            // the others: the rule calls that time out follow.
            None if hung_means_stuck => Ping::Silent,
            None => Ping::Unknown,
        }
    }

    /// Redis answered `READONLY` on the connection of `generation`: it reached a replica,
    /// the old master after a failover. Replaces the connection, so its address is looked
    /// up again, unless one was replaced for this reason within the configured interval.
    /// The connection works (it only leads to the wrong server), so it serves calls until
    /// the new one is up; if the new one cannot be opened, it stays.
    pub fn read_only_reply(&self, generation: u64) {
        let Some(interval) = self.config.readonly_reconnect else {
            return;
        };
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(NEVER - 1);
        let now = nanos(self.origin.elapsed());
        let last = self.readonly_reconnected_at.load(Ordering::Relaxed);
        if last != NEVER && now.saturating_sub(last) < nanos(interval) {
            return;
        }
        // One caller per interval goes on.
        if self
            .readonly_reconnected_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.replace(generation);
        }
    }

    /// Opens a connection in the background and puts it in place of the one of
    /// `generation`, if that one is still the current connection by then.
    fn replace(&self, generation: u64) {
        let (Some(shared), Ok(runtime)) =
            (self.this.upgrade(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        tracing::warn!(
            address = self.connector.address(),
            "redis answered READONLY: the connection reached a replica (a failover?); \
             opening a new one"
        );
        runtime.spawn(async move {
            shared.attempts.fetch_add(1, Ordering::Relaxed);
            let connection = match open(&shared.connector, &shared.config).await {
                Ok(connection) => connection,
                Err(error) => {
                    shared.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        address = shared.connector.address(),
                        %error,
                        "could not open a connection to replace the one that reached a replica; keeping it"
                    );
                    return;
                }
            };
            // Unless the connection was lost or replaced meanwhile: then this one goes.
            let replaced = {
                let mut slot = shared.slot();
                // Counted before calls can see the new connection.
                shared.successes.fetch_add(1, Ordering::Relaxed);
                let current = shared.generation.load(Ordering::Acquire) == generation
                    && slot.connection.is_some();
                if current {
                    shared.watch(&connection);
                    slot.connection = Some(connection);
                    slot.young = None;
                    Self::replaced(&mut slot);
                    shared.generation.fetch_add(1, Ordering::AcqRel);
                }
                current
            };
            if replaced {
                shared.stuck.store(0, Ordering::Relaxed);
                tracing::info!(
                    address = shared.connector.address(),
                    "redis connection replaced"
                );
            }
        });
    }

    /// The connection of `generation` is unusable: drop it and start the reconnect loop,
    /// unless that connection was already replaced.
    pub fn connection_lost(&self, generation: u64, why: &'static str) {
        let mut slot = self.slot();
        if self.generation.load(Ordering::Acquire) != generation
            || (slot.connection.is_none() && slot.suspect.is_none())
        {
            return;
        }
        slot.connection = None;
        slot.suspect = None;
        // Reads aside go on until the successor is in place (a suspect connection cut
        // off, or held too long, is replaced while Redis answers beside it); one that
        // fails there ends them.
        Self::replaced(&mut slot);
        self.generation.fetch_add(1, Ordering::AcqRel);
        let answered = self.stuck.swap(0, Ordering::Relaxed) & UNANSWERED == 0;
        let unsettled = slot.young.take().and_then(|young| young.lost(answered));
        match &unsettled {
            Some((_, lived)) => tracing::warn!(
                address = self.connector.address(),
                reason = why,
                ?lived,
                "redis connection lost soon after it opened, before it answered a call; \
                 reconnecting on the backoff schedule, not at once"
            ),
            None => tracing::warn!(
                address = self.connector.address(),
                reason = why,
                "redis connection lost; reconnecting"
            ),
        }
        self.start_loop(&mut slot, unsettled.map(|(delays, _)| delays));
        drop(slot);
        // Most likely lost with it (a restart): closed now, not kept for later.
        let idle = std::mem::take(&mut *self.blocking_idle());
        drop(idle);
    }

    /// Drops the connection if there is one and starts the loop if it is not running.
    pub fn reconnect_now(&self) {
        let mut slot = self.slot();
        if slot.connection.take().is_some() | slot.suspect.take().is_some() {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.clear_aside(&mut slot);
        Self::replaced(&mut slot);
        slot.young = None;
        self.start_loop(&mut slot, None);
    }

    /// Starts the reconnect loop unless it runs: with a fresh schedule, or going on with
    /// `unsettled`, that of a connection lost before it settled. With no runtime to run it
    /// on (a call made outside one), the next call made inside one starts it.
    fn start_loop(&self, slot: &mut Slot<Connection<M>>, unsettled: Option<Delays>) {
        if self.looping.load(Ordering::Acquire) != 0 {
            return;
        }
        // Only calls in flight are left: no one will call again.
        if self.this.strong_count() == 0 {
            return;
        }
        slot.failed = false;
        slot.attempt = 0;
        slot.next_try_at = None;
        self.set_state(ConnectionState::Reconnecting { attempt: 0 });
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        slot.loop_runs += 1;
        let run = Looping {
            shared: self.this.clone(),
            run: slot.loop_runs,
        };
        self.looping.store(run.run, Ordering::Release);
        runtime.spawn(reconnect_loop(run, unsettled));
    }

    /// Starts the reconnect loop if the connection is lost and no loop runs: the one that
    /// did ended with its runtime, or none could start, for want of one. For a call that
    /// finds no connection: one relaxed load while the loop runs.
    #[inline]
    pub fn keep_reconnecting(&self) {
        if self.looping.load(Ordering::Relaxed) == 0 {
            self.restart_loop();
        }
    }

    /// The task of run `run` of the loop was dropped: the run is over, unless it had ended
    /// on its own (it cleared `looping` then, and another may run now).
    fn loop_dropped(&self, run: u64) {
        let _ = self
            .looping
            .compare_exchange(run, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    #[cold]
    #[inline(never)]
    fn restart_loop(&self) {
        let mut slot = self.slot();
        // In use, out of use while a `PING` decides, or given up on by the schedule.
        if slot.connection.is_some() || slot.suspect.is_some() || slot.failed {
            return;
        }
        self.start_loop(&mut slot, None);
    }

    /// The schedule ended without a connection: calls fail until
    /// [`reconnect_now`](Self::reconnect_now).
    fn give_up(&self, attempts: u32, error: &dyn std::fmt::Display) {
        let mut slot = self.slot();
        self.looping.store(0, Ordering::Release);
        slot.failed = true;
        drop(slot);
        self.set_state(ConnectionState::Failed);
        tracing::error!(address = self.connector.address(), attempts, %error, "gave up reconnecting to redis");
    }

    fn set_state(&self, state: ConnectionState) {
        self.state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }
}

/// Opens a connection and runs the user's hook on it. A panic in either (the hook, a
/// custom connector) fails the attempt as a configuration error: unwinding through the
/// reconnect loop would end it for good, with no one left to start another, and through a
/// blocking call would panic the caller's task.
pub(super) async fn open<M: MakeConnection>(
    connector: &M,
    config: &ReconnectConfig<Connection<M>>,
) -> Result<Connection<M>, Error> {
    open_with(|| connector.connect(), config).await
}

/// [`open`], with the connector's way of opening (`connect`) given.
async fn open_with<C: Clone, F: Future<Output = Result<C, Error>>>(
    connect: impl FnOnce() -> F,
    config: &ReconnectConfig<C>,
) -> Result<C, Error> {
    CatchPanic(async {
        let connection = connect().await?;
        if let Some(hook) = &config.on_connect {
            hook(connection.clone()).await?;
        }
        Ok(connection)
    })
    .await
}

/// Answers a panic while polling `F` as an error (and is not polled again after it).
#[pin_project::pin_project]
struct CatchPanic<F>(#[pin] F);

impl<F, T> Future for CatchPanic<F>
where
    F: Future<Output = Result<T, Error>>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let attempt = self.project().0;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attempt.poll(cx))).unwrap_or_else(
            |panic| {
                let said = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(no message)");
                Poll::Ready(Err(Error::config(format!(
                    "opening a connection panicked (in the on_connect hook, or a custom \
                     connector): {said}"
                ))))
            },
        )
    }
}

/// Held by the task that decides whether a suspect connection is stuck: if it is dropped
/// before it decides (with the runtime it ran on), the connection is taken for lost, and
/// the next call starts the reconnect loop. Otherwise it stayed out of use for ever, and
/// calls on the next runtime were refused as "suspect". Once decided, the generation has
/// moved on, and this does nothing.
struct Unsettled<M: MakeConnection> {
    shared: Weak<Leased<Shared<M>>>,
    suspect_generation: u64,
}

impl<M: MakeConnection> Drop for Unsettled<M> {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.connection_lost(
                self.suspect_generation,
                "the runtime that asked the suspect connection a PING shut down",
            );
        }
    }
}

/// A run of the reconnect loop, held by its task: if the task is dropped before the run
/// ends (with the runtime it ran on), the run is over, and the next call starts another.
struct Looping<M: MakeConnection> {
    shared: Weak<Leased<Shared<M>>>,
    run: u64,
}

impl<M: MakeConnection> Drop for Looping<M> {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.loop_dropped(self.run);
        }
    }
}

/// The one loop that re-establishes the connection: an attempt at once, then one per
/// backoff step. Configuration errors wait the longest delay, so a wrong password never
/// turns into a hot loop. After a connection lost before it settled, with no call
/// answered, it goes on with that connection's schedule (`unsettled`) and waits its next
/// step first, so connections that break as soon as they open are opened at the
/// schedule's pace, not once per call. It holds the state only while it makes an attempt:
/// once every handle is gone (a client dropped during an outage), it stops instead of
/// knocking on a server no one will use, for as long as that server stays away.
async fn reconnect_loop<M: MakeConnection>(run: Looping<M>, unsettled: Option<Delays>) {
    let this = &run.shared;
    let wait_first = unsettled.is_some();
    let Some(mut delays) =
        unsettled.or_else(|| this.upgrade().map(|shared| shared.config.backoff.iter()))
    else {
        return;
    };
    if wait_first {
        let Some(shared) = this.upgrade() else {
            return;
        };
        let Some(delay) = delays.next() else {
            return shared.give_up(0, &"connections kept breaking as soon as they opened");
        };
        shared.slot().next_try_at = Some(Instant::now() + delay);
        drop(shared);
        tokio::time::sleep(delay).await;
    }
    let mut attempt = 0u32;
    loop {
        let Some(shared) = this.upgrade() else {
            return;
        };
        attempt = attempt.saturating_add(1);
        {
            let mut slot = shared.slot();
            slot.attempt = attempt;
            slot.next_try_at = None;
        }
        shared.set_state(ConnectionState::Reconnecting { attempt });
        shared.attempts.fetch_add(1, Ordering::Relaxed);
        let error = match open(&shared.connector, &shared.config).await {
            Ok(connection) => {
                {
                    let mut slot = shared.slot();
                    // Under the lock: one that closes at once is seen once it is in use.
                    shared.watch(&connection);
                    slot.connection = Some(connection);
                    shared.clear_aside(&mut slot);
                    shared.looping.store(0, Ordering::Release);
                    slot.attempt = 0;
                    slot.config_error = None;
                    slot.young = Some(Young::new(delays));
                    // Before the generation is published: a call that sees the new
                    // connection sees the mark too, and its reply clears it.
                    shared.stuck.store(UNANSWERED, Ordering::Relaxed);
                    shared.generation.fetch_add(1, Ordering::AcqRel);
                }
                shared.successes.fetch_add(1, Ordering::Relaxed);
                shared.keep_health_checked();
                shared.set_state(ConnectionState::Connected);
                tracing::info!(
                    address = shared.connector.address(),
                    attempt,
                    "redis connection established"
                );
                return;
            }
            Err(error) => error,
        };
        shared.failures.fetch_add(1, Ordering::Relaxed);
        let Some(delay) = delay_after(&mut delays, &shared.config.backoff, &error) else {
            return shared.give_up(attempt, &error);
        };
        if error.is_config() {
            tracing::warn!(
                address = shared.connector.address(),
                attempt,
                %error,
                retry_in = ?delay,
                "redis rejected the connection settings or credentials; retrying at the slowest rate"
            );
        } else {
            tracing::debug!(address = shared.connector.address(), attempt, %error, retry_in = ?delay, "redis connection attempt failed");
        }
        {
            let mut slot = shared.slot();
            slot.next_try_at = Some(Instant::now() + delay);
            slot.config_error = error.is_config().then(|| error.clone());
        }
        drop(shared);
        tokio::time::sleep(delay).await;
    }
}

/// Pings on an interval and reports a connection that does not answer in time. Holds only
/// a weak reference, so it ends when the last handle is dropped.
async fn health_check<M: MakeConnection>(
    running: HealthChecking<M>,
    interval: Duration,
    timeout: Duration,
) {
    let shared = running.0.clone();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let (generation, Some(connection)) = shared.current() else {
            continue;
        };
        match shared.ping(connection, timeout).await {
            Ping::Answered => shared.alive(),
            Ping::Failed => shared.connection_lost(generation, "health check PING failed"),
            Ping::Silent => shared.connection_lost(generation, "health check PING timed out"),
            Ping::Unknown => {}
        }
    }
}

/// Held by the health-check task's future: dropped with it however it ends (its runtime
/// shut down, even before it first ran), it says none runs, so the next connection made
/// starts another.
struct HealthChecking<M: MakeConnection>(Weak<Leased<Shared<M>>>);

impl<M: MakeConnection> Drop for HealthChecking<M> {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared.health_checking.store(false, Ordering::Release);
        }
    }
}

/// What came of a `PING` on the connection.
enum Ping {
    /// Redis answered, an error reply included: the connection works.
    Answered,
    /// The connection broke.
    Failed,
    /// No reply in time, on a connection where that means it is stuck.
    Silent,
    /// No reply in time, on a connection where that says nothing (a cluster's).
    Unknown,
}
