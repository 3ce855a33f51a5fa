//! Pub/Sub that survives restarts: a [`Subscriber`] keeps its subscriptions across lost
//! connections and tells the application when it may have missed messages.
//!
//! Redis Pub/Sub delivers a message to the subscribers connected when it is published, and
//! to no one else: a subscriber whose connection dropped misses what was published until
//! it has subscribed again, and Redis keeps no record of it. redis-rs's Pub/Sub connection
//! ends when its socket does, and its subscriptions with it. A [`Subscriber`] runs one
//! Pub/Sub connection in a task of its own that
//!
//! - reconnects with backoff (the schedule [`ReconnectConfig`](crate::reconnect::ReconnectConfig)
//!   uses by default: every ~25 ms for the first 2 s, then exponential to 1 s) and
//!   subscribes again to every channel and pattern it holds;
//! - finds a connection that went silent (a stalled server, a half-open TCP connection,
//!   which would otherwise look like a quiet channel for ever) with a `PING` every
//!   [`ping_interval`](SubscriberConfig::ping_interval);
//! - says so in the stream of [`Event`]s: [`Disconnected`](Event::Disconnected) when the
//!   connection is lost, [`Resubscribed`](Event::Resubscribed) when the subscriptions are
//!   back (what was published in between is lost: reload the state the messages keep
//!   current), and [`Lagged`](Event::Lagged) with a count when the application fell
//!   behind and messages were dropped, so nothing is missed silently.
//!
//! Through a [Sentinel connector](crate::Connector::sentinel) it connects to the master
//! Sentinel names, and follows it as the command connections do: when Sentinel names
//! another master (announced, or found by asking), the subscriber reconnects there at its
//! next `PING` tick and reports the move as `Disconnected` then `Resubscribed`. Left on an
//! old master that is still up, it would not hear what is published on the new one.
//!
//! The shared connection of [`RedisService`](crate::RedisService) refuses `SUBSCRIBE`: on
//! a connection every caller shares, Redis would refuse their commands from then on.
//!
//! ```no_run
//! use tower_redis_resilience::{Connector, pubsub::{Event, Subscriber, SubscriberConfig}};
//!
//! # async fn run() -> Result<(), tower_redis_resilience::Error> {
//! let connector = Connector::from_url("redis://127.0.0.1:6379")?;
//! let (subscriber, mut events) = Subscriber::connect(connector, SubscriberConfig::new()).await?;
//! subscriber.subscribe("invalidations").await?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::Message(message) => println!("{:?}", message.get_payload::<String>()),
//!         // Messages were missed: drop what they keep current.
//!         Event::Resubscribed { .. } | Event::Lagged { .. } => println!("clear the cache"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```

use std::{
    collections::{BTreeSet, VecDeque},
    fmt,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use redis::{Msg, ToRedisArgs, Value, aio::PubSubSink};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use std::sync::Arc;

use crate::{
    Connector, Error,
    backoff::{Delays, ExponentialBackoff},
    reconnect::{ConnectionState, Young},
    service::Driver,
};

/// A Pub/Sub connection, and through Sentinel the handle retired when Sentinel names
/// another master.
type Opened = (redis::aio::PubSub, Option<Arc<Driver>>);

/// How many events wait for the application before messages are dropped (and counted in
/// a [`Lagged`](Event::Lagged) event), unless [`SubscriberConfig::buffer`] says otherwise.
pub const DEFAULT_EVENT_BUFFER: usize = 1024;

/// How a [`Subscriber`] keeps its connection.
#[derive(Debug, Clone)]
#[must_use]
pub struct SubscriberConfig {
    backoff: ExponentialBackoff,
    ping_interval: Duration,
    reply_timeout: Duration,
    buffer: usize,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        SubscriberConfig {
            backoff: crate::reconnect::default_backoff(),
            ping_interval: Duration::from_secs(1),
            reply_timeout: crate::reconnect::DEFAULT_STUCK_PING_TIMEOUT,
            buffer: DEFAULT_EVENT_BUFFER,
        }
    }
}

impl SubscriberConfig {
    /// The defaults: the reconnect schedule of [`ReconnectConfig`](crate::reconnect::ReconnectConfig),
    /// a `PING` every second answered within 1 s, 1024 events buffered.
    pub fn new() -> Self {
        SubscriberConfig::default()
    }

    /// The delays between connection attempts. When the schedule ends
    /// (`max_attempts`, `max_elapsed`), attempts go on at its longest delay: a
    /// subscriber has no caller to report to, and gives up only when dropped. A
    /// connection lost within a second of opening, before it delivered a message or
    /// answered a `PING`, is followed by the schedule's next step, not by an attempt at
    /// once, as for [`ReconnectConfig::backoff`](crate::reconnect::ReconnectConfig::backoff).
    pub fn backoff(mut self, backoff: ExponentialBackoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How often the connection is checked with a `PING` (default 1 s). A connection to
    /// a stalled server or a half-open TCP connection is otherwise indistinguishable from
    /// quiet channels.
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// How long Redis has to answer a `PING` or confirm a subscription before the
    /// connection is taken for lost (default 1 s, the
    /// [`DEFAULT_STUCK_PING_TIMEOUT`](crate::reconnect::DEFAULT_STUCK_PING_TIMEOUT) of
    /// command connections). A slow Redis still delivers its messages, late; a reconnect
    /// would lose those published meanwhile, and could not subscribe again either while
    /// Redis takes longer than this to confirm.
    pub fn reply_timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout;
        self
    }

    /// How many events may wait for the application (default 1024, at least 1). Beyond
    /// that, messages are dropped and counted: the next event delivered is a
    /// [`Lagged`](Event::Lagged) with the count. `Disconnected` and `Resubscribed` are
    /// never dropped: they wait for room while the subscriber goes on (reconnects), and
    /// messages that come meanwhile are counted as missed, so the order holds.
    pub fn buffer(mut self, events: usize) -> Self {
        self.buffer = events.max(1);
        self
    }
}

/// What a [`Subscriber`] has to tell the application, in the order it happened.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A message published to a channel subscribed to (or matching a pattern).
    Message(Msg),
    /// The connection was lost: messages published from now until
    /// [`Resubscribed`](Event::Resubscribed) are not delivered.
    Disconnected {
        /// Why: the connection closed, a `PING` went unanswered, or Sentinel named
        /// another master.
        error: Error,
    },
    /// A new connection holds every subscription again. Messages published while there
    /// was none were missed.
    Resubscribed {
        /// How long there was no connection.
        down_for: Duration,
    },
    /// The application fell behind: this many messages were dropped (after the events
    /// delivered before this one).
    Lagged {
        /// Messages dropped.
        missed: u64,
    },
}

/// Subscribes and unsubscribes; the subscriptions outlive lost connections. Cheap to
/// clone: every clone controls the same connection. See the [module docs](self).
#[derive(Clone)]
pub struct Subscriber {
    control: mpsc::UnboundedSender<Control>,
    state: watch::Receiver<ConnectionState>,
}

/// The events of a [`Subscriber`], in order. Dropping it stops the subscriber and closes
/// its connection.
pub struct Events {
    events: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the subscriber has stopped (it stops only when this is
    /// dropped, so in practice never).
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl futures_core::Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Subscriber {
    /// Connects now and returns the error if that fails (wrong password: a
    /// [config](Error::is_config) error; Redis down: [unavailable](Error::is_unavailable)).
    /// Needs a tokio runtime.
    pub async fn connect(
        connector: Connector,
        config: SubscriberConfig,
    ) -> Result<(Subscriber, Events), Error> {
        require_runtime()?;
        let pubsub = connector.open_pubsub().await?;
        Ok(Subscriber::start(connector, config, Some(pubsub)))
    }

    /// Returns at once and connects in the background: subscriptions made meanwhile are
    /// made as soon as it is connected. Needs a tokio runtime.
    pub fn lazy(
        connector: Connector,
        config: SubscriberConfig,
    ) -> Result<(Subscriber, Events), Error> {
        require_runtime()?;
        Ok(Subscriber::start(connector, config, None))
    }

    fn start(
        connector: Connector,
        config: SubscriberConfig,
        pubsub: Option<Opened>,
    ) -> (Subscriber, Events) {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::channel(config.buffer);
        let initial = match pubsub {
            Some(_) => ConnectionState::Connected,
            None => ConnectionState::Reconnecting { attempt: 0 },
        };
        let (state_tx, state) = watch::channel(initial);
        let task = Task {
            connector,
            config,
            control: Some(control_rx),
            events: events_tx,
            state: state_tx,
            channels: BTreeSet::new(),
            patterns: BTreeSet::new(),
            missed: 0,
            pending: VecDeque::new(),
            young: None,
        };
        tokio::spawn(task.run(pubsub));
        (Subscriber { control, state }, Events { events })
    }

    /// Subscribes to one channel or more (anything redis-rs takes as arguments: `"news"`,
    /// `&["a", "b"]`). Returns once Redis confirmed it; while there is no connection, once
    /// it is recorded: it is made when the connection is back (see
    /// [`state`](Self::state)). Either way it is made again after every reconnect. An error
    /// only if Redis refused it (`NOPERM`: the user may not read that channel) or the
    /// subscriber has stopped.
    pub async fn subscribe(&self, channels: impl ToRedisArgs) -> Result<(), Error> {
        self.send(Kind::Subscribe, channels).await
    }

    /// Subscribes to one pattern or more (`"user:*"`), as [`subscribe`](Self::subscribe).
    pub async fn psubscribe(&self, patterns: impl ToRedisArgs) -> Result<(), Error> {
        self.send(Kind::Psubscribe, patterns).await
    }

    /// Unsubscribes from channels; they are not subscribed to again after a reconnect.
    pub async fn unsubscribe(&self, channels: impl ToRedisArgs) -> Result<(), Error> {
        self.send(Kind::Unsubscribe, channels).await
    }

    /// Unsubscribes from patterns, as [`unsubscribe`](Self::unsubscribe).
    pub async fn punsubscribe(&self, patterns: impl ToRedisArgs) -> Result<(), Error> {
        self.send(Kind::Punsubscribe, patterns).await
    }

    /// The connection state, now and as it changes.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    async fn send(&self, kind: Kind, names: impl ToRedisArgs) -> Result<(), Error> {
        let names = names.to_redis_args();
        if names.is_empty() {
            return Err(Error::config(
                "subscribing to nothing: give at least one name",
            ));
        }
        let (reply, answer) = oneshot::channel();
        let stopped = || Error::unavailable("the subscriber has stopped: its events were dropped");
        self.control
            .send(Control { kind, names, reply })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("state", &*self.state.borrow())
            .finish()
    }
}

fn require_runtime() -> Result<(), Error> {
    tokio::runtime::Handle::try_current()
        .map(|_| ())
        .map_err(|_| Error::config("a Subscriber needs to be created inside a tokio runtime"))
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Subscribe,
    Psubscribe,
    Unsubscribe,
    Punsubscribe,
}

struct Control {
    kind: Kind,
    names: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<(), Error>>,
}

/// The task that owns the connection.
struct Task {
    connector: Connector,
    config: SubscriberConfig,
    /// `None` once every `Subscriber` is gone: the subscriptions stay as they are.
    control: Option<mpsc::UnboundedReceiver<Control>>,
    events: mpsc::Sender<Event>,
    state: watch::Sender<ConnectionState>,
    channels: BTreeSet<Vec<u8>>,
    patterns: BTreeSet<Vec<u8>>,
    /// Messages dropped since the last `Lagged` event.
    missed: u64,
    /// Events that must not be dropped, waiting for room in the application's buffer: the
    /// task goes on (reconnects) meanwhile, and messages behind them are counted as
    /// missed, so the order holds.
    pending: VecDeque<Event>,
    /// The schedule the connection in use was opened on, while it is young and has
    /// delivered nothing: lost before it settled, the next connection waits the schedule's
    /// next step.
    young: Option<Young>,
}

/// Why the task stops: nobody reads its events any more.
struct Stop;

impl Task {
    async fn run(mut self, mut pubsub: Option<Opened>) {
        let mut down_since = None;
        loop {
            if let Some(connection) = pubsub.take() {
                self.state.send_replace(ConnectionState::Connected);
                if let Some(since) = down_since.take() {
                    let down_for = Instant::now().saturating_duration_since(since);
                    tracing::info!(
                        address = self.connector.address(),
                        ?down_for,
                        "redis subscriber resubscribed"
                    );
                    if self.announce(Event::Resubscribed { down_for }).is_err() {
                        return;
                    }
                }
                let Ok(error) = self.serve(connection).await else {
                    return;
                };
                down_since = Some(Instant::now());
                self.state
                    .send_replace(ConnectionState::Reconnecting { attempt: 0 });
                tracing::warn!(address = self.connector.address(), %error, "redis subscriber lost its connection; reconnecting");
                if self.announce(Event::Disconnected { error }).is_err() {
                    return;
                }
            }
            // The schedule was forgotten if the connection delivered or answered anything.
            let unsettled = self.young.take().and_then(|young| young.lost(false));
            match self.reconnect(unsettled.map(|(delays, _)| delays)).await {
                Ok(connection) => pubsub = Some(connection),
                Err(Stop) => return,
            }
        }
    }

    /// Delivers messages and applies subscription changes until the connection is lost;
    /// answers why.
    async fn serve(&mut self, (connection, followed): Opened) -> Result<Error, Stop> {
        let (mut sink, mut stream) = connection.split();
        let mut ping = tokio::time::interval(self.config.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                () = self.events.closed() => return Err(Stop),
                room = room_in(&self.events), if self.is_owed() => self.hand_over(room)?,
                message = next_message(&mut stream) => match message {
                    Some(message) => {
                        self.young = None;
                        self.deliver(message);
                    }
                    None => return Ok(Error::unavailable("the connection closed")),
                },
                control = recv(&mut self.control) => match control {
                    Some(control) => {
                        if let Err(error) = self.apply(&mut sink, control).await {
                            return Ok(error);
                        }
                    }
                    None => self.control = None,
                },
                _ = ping.tick() => {
                    if followed.as_deref().is_some_and(Driver::has_ended) {
                        return Ok(Error::unavailable("Sentinel named another master"));
                    }
                    let reply = self.config.reply_timeout;
                    match tokio::time::timeout(reply, sink.ping::<Value>()).await {
                        Ok(Ok(_)) => self.young = None,
                        Ok(Err(error)) => return Ok(Error::from_request(error)),
                        Err(_) => return Ok(Error::timed_out(reply).with_command("PING")),
                    }
                }
            }
        }
    }

    /// Connects with backoff, recording subscription changes meanwhile, and subscribes to
    /// everything on the new connection: at once with a fresh schedule, or, going on with
    /// `unsettled` (that of a connection lost before it settled), after its next step.
    async fn reconnect(&mut self, unsettled: Option<Delays>) -> Result<Opened, Stop> {
        let wait_first = unsettled.is_some();
        let mut delays = unsettled.unwrap_or_else(|| self.config.backoff.iter());
        if wait_first {
            // Past the end of the schedule: on at its longest delay.
            let delay = delays.next().unwrap_or(self.config.backoff.max());
            self.wait(delay).await?;
        }
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            self.state
                .send_replace(ConnectionState::Reconnecting { attempt });
            let error = match self.attempt().await? {
                Ok(connection) => {
                    self.young = Some(Young::new(delays));
                    return Ok(connection);
                }
                Err(error) => error,
            };
            // Past the end of the schedule: on at its longest delay.
            let delay = crate::reconnect::delay_after(&mut delays, &self.config.backoff, &error)
                .unwrap_or(self.config.backoff.max());
            if error.is_config() {
                tracing::warn!(address = self.connector.address(), attempt, %error, retry_in = ?delay, "redis rejected the subscriber's connection settings or credentials; retrying at the slowest rate");
            } else {
                tracing::debug!(address = self.connector.address(), attempt, %error, retry_in = ?delay, "redis subscriber connection attempt failed");
            }
            self.wait(delay).await?;
        }
    }

    /// Waits `delay` before the next attempt, handing events over and recording
    /// subscription changes meanwhile.
    async fn wait(&mut self, delay: Duration) -> Result<(), Stop> {
        let wake = Instant::now() + delay;
        loop {
            tokio::select! {
                () = self.events.closed() => return Err(Stop),
                room = room_in(&self.events), if self.is_owed() => self.hand_over(room)?,
                () = tokio::time::sleep_until(wake) => return Ok(()),
                control = recv(&mut self.control) => match control {
                    Some(control) => self.record(control),
                    None => self.control = None,
                },
            }
        }
    }

    /// One connection attempt, with every subscription made on it.
    async fn attempt(&mut self) -> Result<Result<Opened, Error>, Stop> {
        let connect = async {
            let (mut connection, followed) = self.connector.open_pubsub().await?;
            let reply = self.config.reply_timeout;
            let timed_out = || Error::timed_out(reply);
            if !self.channels.is_empty() {
                let channels: Vec<&[u8]> = self.channels.iter().map(Vec::as_slice).collect();
                tokio::time::timeout(reply, connection.subscribe(channels))
                    .await
                    .map_err(|_| timed_out().with_command("SUBSCRIBE"))?
                    .map_err(Error::from_request)?;
            }
            if !self.patterns.is_empty() {
                let patterns: Vec<&[u8]> = self.patterns.iter().map(Vec::as_slice).collect();
                tokio::time::timeout(reply, connection.psubscribe(patterns))
                    .await
                    .map_err(|_| timed_out().with_command("PSUBSCRIBE"))?
                    .map_err(Error::from_request)?;
            }
            Ok((connection, followed))
        };
        tokio::select! {
            () = self.events.closed() => Err(Stop),
            result = connect => Ok(result),
        }
    }

    /// Applies a change on the connection. An error answers the caller when Redis refused
    /// it; a lost connection keeps the change (it is made on the next one) and is
    /// returned.
    async fn apply(&mut self, sink: &mut PubSubSink, control: Control) -> Result<(), Error> {
        let Control { kind, names, reply } = control;
        let timeout = self.config.reply_timeout;
        let sent = match kind {
            Kind::Subscribe => tokio::time::timeout(timeout, sink.subscribe(&names)).await,
            Kind::Psubscribe => tokio::time::timeout(timeout, sink.psubscribe(&names)).await,
            Kind::Unsubscribe => tokio::time::timeout(timeout, sink.unsubscribe(&names)).await,
            Kind::Punsubscribe => tokio::time::timeout(timeout, sink.punsubscribe(&names)).await,
        };
        let lost = match sent {
            Ok(Ok(())) => None,
            Ok(Err(error)) => {
                let error = Error::from_request(error);
                if !error.breaks_connection() {
                    // Refused (NOPERM): nothing changes.
                    let _ = reply.send(Err(error));
                    return Ok(());
                }
                Some(error)
            }
            Err(_) => Some(Error::timed_out(timeout).with_command(kind.command())),
        };
        self.record(Control { kind, names, reply });
        lost.map_or(Ok(()), Err)
    }

    /// Records a change, to be made on the next connection, and answers the caller.
    fn record(&mut self, control: Control) {
        let Control { kind, names, reply } = control;
        let (set, add) = match kind {
            Kind::Subscribe => (&mut self.channels, true),
            Kind::Psubscribe => (&mut self.patterns, true),
            Kind::Unsubscribe => (&mut self.channels, false),
            Kind::Punsubscribe => (&mut self.patterns, false),
        };
        for name in names {
            if add {
                set.insert(name);
            } else {
                set.remove(&name);
            }
        }
        let _ = reply.send(Ok(()));
    }

    /// Hands a message to the application, or counts it if the buffer is full or events
    /// that must not be dropped wait before it.
    fn deliver(&mut self, message: Msg) {
        if self.flush().is_err() || self.is_owed() {
            self.missed += 1;
            return;
        }
        if self.events.try_send(Event::Message(message)).is_err() {
            self.missed += 1;
        }
    }

    /// Queues an event that must not be dropped (after a count of the messages dropped
    /// before it) and hands over what there is room for, without waiting.
    fn announce(&mut self, event: Event) -> Result<(), Stop> {
        if self.missed > 0 {
            let missed = std::mem::take(&mut self.missed);
            self.pending.push_back(Event::Lagged { missed });
        }
        self.pending.push_back(event);
        self.flush()
    }

    /// Hands over the waiting events, then the count of dropped messages, while there is
    /// room.
    fn flush(&mut self) -> Result<(), Stop> {
        use mpsc::error::TrySendError::{Closed, Full};
        while let Some(event) = self.pending.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(Full(event)) => {
                    self.pending.push_front(event);
                    return Ok(());
                }
                Err(Closed(_)) => return Err(Stop),
            }
        }
        if self.missed > 0 {
            match self.events.try_send(Event::Lagged {
                missed: self.missed,
            }) {
                Ok(()) => self.missed = 0,
                Err(Full(_)) => {}
                Err(Closed(_)) => return Err(Stop),
            }
        }
        Ok(())
    }

    /// Something waits to be handed over.
    fn is_owed(&self) -> bool {
        !self.pending.is_empty() || self.missed > 0
    }

    /// Room came in the application's buffer (or nobody reads it any more): hands over
    /// what fits.
    fn hand_over(&mut self, room: Result<(), Stop>) -> Result<(), Stop> {
        room?;
        self.flush()
    }
}

/// Waits until the application's buffer has room; `Stop` once nobody reads it.
async fn room_in(events: &mpsc::Sender<Event>) -> Result<(), Stop> {
    // The permit is given back at once: `flush` takes the room with `try_send` (this task
    // is the only sender).
    events.reserve().await.map(drop).map_err(|_| Stop)
}

impl Kind {
    fn command(self) -> &'static str {
        match self {
            Kind::Subscribe => "SUBSCRIBE",
            Kind::Psubscribe => "PSUBSCRIBE",
            Kind::Unsubscribe => "UNSUBSCRIBE",
            Kind::Punsubscribe => "PUNSUBSCRIBE",
        }
    }
}

/// The next message on the connection; `None` once it has closed.
async fn next_message(stream: &mut redis::aio::PubSubStream) -> Option<Msg> {
    use futures_core::Stream;
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// The next change from a `Subscriber`; never, once they are all gone.
async fn recv(control: &mut Option<mpsc::UnboundedReceiver<Control>>) -> Option<Control> {
    match control {
        Some(control) => control.recv().await,
        None => std::future::pending().await,
    }
}
