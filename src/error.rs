//! The one error type of the crate, and how redis-rs's errors map onto it.

use std::{fmt, io, sync::Arc, time::Duration};

use redis::{ErrorKind, RedisError, ServerError, ServerErrorKind, Value};

/// The error every service of this crate returns.
///
/// Callers ask questions instead of matching on internals: [`is_unavailable`] (Redis could
/// not serve; transient), [`is_timeout`] (the deadline passed; the command may have run),
/// [`is_circuit_open`] (rejected without touching Redis), [`is_server`] (Redis answered
/// with an error such as `WRONGTYPE`: the application's problem, not an outage) and
/// [`is_config`] (bad URL, wrong credentials, TLS mismatch: retrying will not help).
/// Exactly one of the five is true. [`may_have_run`] says whether Redis may have executed
/// the command, which is what decides if it can be sent again.
///
/// Errors that come out through redis-rs's API (a [`Client`](crate::Client) used with
/// `AsyncCommands`) are [`RedisError`]s; `Error::from(redis_error)` gives this error back
/// with its classification, command name and details intact. Server errors come out as
/// exactly the `RedisError` plain redis-rs would give (`code()`, `kind()` and `detail()`
/// work as usual).
///
/// ```
/// use tower_redis_resilience::Error;
///
/// fn should_page_someone(err: &redis::RedisError) -> bool {
///     let err = Error::from(err.clone());
///     err.is_unavailable() || err.is_timeout() || err.is_circuit_open()
/// }
/// # let _ = should_page_someone;
/// ```
///
/// [`is_unavailable`]: Error::is_unavailable
/// [`is_timeout`]: Error::is_timeout
/// [`is_circuit_open`]: Error::is_circuit_open
/// [`is_server`]: Error::is_server
/// [`is_config`]: Error::is_config
/// [`may_have_run`]: Error::may_have_run
#[derive(Clone)]
#[non_exhaustive]
pub struct Error {
    kind: Kind,
    command: Option<&'static str>,
    detail: Detail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unavailable {
        may_have_run: bool,
    },
    Timeout {
        after: Duration,
    },
    CircuitOpen {
        probe: Probe,
    },
    Server,
    /// `may_have_run` only for a request already on its way when it could not go on (no
    /// runtime to time it).
    Config {
        may_have_run: bool,
    },
}

impl Kind {
    /// Wrong configuration, found before the request was sent, if there was one.
    const CONFIG: Kind = Kind::Config {
        may_have_run: false,
    };
}

/// When an open circuit lets a probe through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    In(Duration),
    /// Kept as an instant so rejecting a call does not read the clock; `retry_in` does.
    At(tokio::time::Instant),
    /// Forced open by hand: no probe until someone resets it.
    Never,
}

#[derive(Clone)]
enum Detail {
    None,
    Message(&'static str),
    /// A timeout on the request's own deadline ([`Request::with_deadline`](crate::Request::with_deadline)).
    /// (Here, not in the kind, which would grow every `Result` the layers pass up by a
    /// word.)
    OwnDeadline,
    /// The connection is out of use while a `PING` asks whether it is stuck
    /// ([`ReconnectConfig::stuck_ping_timeout`](crate::reconnect::ReconnectConfig::stuck_ping_timeout)).
    Suspect,
    /// [`Suspect`](Self::Suspect), and Redis answers on another connection, where reads
    /// go ([`ReconnectConfig::side_reads`](crate::reconnect::ReconnectConfig::side_reads)):
    /// the connection is held up, not Redis down.
    Held,
    /// Formatted when shown, so rejecting calls during an outage does not allocate.
    Reconnecting {
        attempt: u32,
        next_try_in: Option<Duration>,
    },
    Text(Arc<str>),
    /// A request the client refused to send, as it would break the connection for
    /// others: says nothing about Redis.
    Refused(Arc<str>),
    /// No connection of its own could be opened for a request that needs one (a blocking
    /// command) while the shared connection works: a limit was reached (Redis's
    /// `maxclients`, most likely), which says nothing about the calls the shared
    /// connection serves.
    NoConnectionOfItsOwn(Arc<str>),
    /// A cluster's request not sent, as the master of its slot cannot be reached (see
    /// [`master_gone`](Error::master_gone)).
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    MasterGone(Arc<str>),
    Redis(RedisError),
}

/// Server error codes that mean "Redis cannot serve right now", not "your command is
/// wrong": the command was refused without running, and a later attempt may succeed.
/// READONLY is the failover signal (a write reached a demoted master); MISCONF and
/// NOREPLICAS refuse writes until the server's persistence or replicas recover.
const UNAVAILABLE_CODES: &[&str] = &[
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "READONLY",
    "MISCONF",
    "NOREPLICAS",
    // A cluster's redirects: the slot is served by another node (for good, or while it
    // migrates). The cluster client refreshes its map of the slots; sent again, the
    // command goes to the node that now serves it.
    "MOVED",
    "ASK",
    // A blocking command (`BLPOP`...) Redis gave up on without serving it: its server
    // turned replica in a failover, or someone sent `CLIENT UNBLOCK .. ERROR`. Nothing
    // was popped; sent again, it waits where the address now leads.
    "UNBLOCKED",
];

/// Server error codes that mean the credentials are wrong.
const AUTH_CODES: &[&str] = &["WRONGPASS", "NOAUTH"];

impl Error {
    /// Redis could not serve the request: connection refused, reset or closed, not
    /// connected, reconnecting, or the server refused it as `LOADING`, `BUSY`,
    /// `MASTERDOWN`, `TRYAGAIN`, `CLUSTERDOWN`, `READONLY`, `MISCONF` or `NOREPLICAS`, a
    /// cluster node redirected it (`MOVED`, `ASK`), the cluster's master for its key
    /// cannot be reached (not sent), or Redis gave up on a blocking command without
    /// serving it (`UNBLOCKED`: its server turned replica, or `CLIENT UNBLOCK`).
    /// Transient: the same request may succeed later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self.kind, Kind::Unavailable { .. })
    }

    /// The request's deadline passed before Redis answered. It may or may not have run.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, Kind::Timeout { .. })
    }

    /// A [timeout](Self::is_timeout) on a deadline the request carried itself
    /// ([`Request::with_deadline`](crate::Request::with_deadline)), not one a timeout
    /// layer chose for it: the caller's budget ran out, which says nothing sure about
    /// Redis, so the circuit breaker's default classifier ignores it.
    pub fn is_own_deadline(&self) -> bool {
        matches!(
            (&self.kind, &self.detail),
            (Kind::Timeout { .. }, Detail::OwnDeadline)
        )
    }

    /// A circuit breaker rejected the request without sending it.
    pub fn is_circuit_open(&self) -> bool {
        matches!(self.kind, Kind::CircuitOpen { .. })
    }

    /// Redis answered with an error about the command itself (`WRONGTYPE`, `ERR syntax`,
    /// `NOSCRIPT`, `OOM`, `EXECABORT`, `NOPERM`...). Not an outage.
    pub fn is_server(&self) -> bool {
        matches!(self.kind, Kind::Server)
    }

    /// The configuration or the credentials are wrong (malformed URL, `WRONGPASS`,
    /// `NOAUTH`, TLS mismatch, bad database index), the request cannot be sent (an empty
    /// command), or the stack is used where it cannot work (a call outside any Tokio
    /// runtime, with none running its deadlines). Retrying soon will not help.
    pub fn is_config(&self) -> bool {
        matches!(self.kind, Kind::Config { .. })
    }

    /// Whether Redis may have executed the command. `false` only when it provably did not:
    /// the request never left the client (not connected, circuit open, bad configuration)
    /// or Redis refused it without running it (`LOADING`, `BUSY`, `READONLY`...). Timeouts,
    /// dropped connections and server errors answer `true` (a script may fail half-way),
    /// as does a configuration error found once the request was on its way (a call that
    /// could not be timed, made outside any Tokio runtime).
    /// A command for which this is `true` and that is not idempotent must not be resent.
    pub fn may_have_run(&self) -> bool {
        match self.kind {
            Kind::Unavailable { may_have_run } => may_have_run,
            Kind::Timeout { .. } | Kind::Server => true,
            Kind::Config { may_have_run } => may_have_run,
            Kind::CircuitOpen { .. } => false,
        }
    }

    /// The canonical name of the command that failed (`"GET"`, `"PIPELINE"`), when the
    /// error belongs to a command rather than to connecting.
    pub fn command(&self) -> Option<&'static str> {
        self.command
    }

    /// For a timeout, the deadline that passed.
    pub fn timeout(&self) -> Option<Duration> {
        match self.kind {
            Kind::Timeout { after, .. } => Some(after),
            _ => None,
        }
    }

    /// For a circuit-open rejection, how long until the breaker lets a probe through
    /// (zero while it is probing); `None` for other errors and for a breaker forced open
    /// by hand, which lets nothing through until it is reset.
    pub fn retry_in(&self) -> Option<Duration> {
        match self.kind {
            Kind::CircuitOpen {
                probe: Probe::In(retry_in),
            } => Some(retry_in),
            Kind::CircuitOpen {
                probe: Probe::At(at),
            } => Some(at.saturating_duration_since(tokio::time::Instant::now())),
            _ => None,
        }
    }

    /// The error code Redis answered with (`"WRONGTYPE"`, `"LOADING"`, `"WRONGPASS"`).
    pub fn server_code(&self) -> Option<&str> {
        match &self.detail {
            Detail::Redis(err) => err.code(),
            _ => None,
        }
    }

    /// The redis-rs error this one was made from, if any.
    pub fn redis_error(&self) -> Option<&RedisError> {
        match &self.detail {
            Detail::Redis(err) => Some(err),
            _ => None,
        }
    }

    /// Names the command this error belongs to.
    pub fn with_command(mut self, command: &'static str) -> Self {
        self.command = Some(command);
        self
    }

    /// Part of a pipeline may have run before Redis refused the rest.
    pub(crate) fn ran_partially(mut self) -> Self {
        if let Kind::Unavailable { .. } = self.kind {
            self.kind = Kind::Unavailable { may_have_run: true };
        }
        self
    }

    /// An [unavailable](Error::is_unavailable) error for a request that never left the
    /// client (no connection to send it on), for layers and test services of your own.
    ///
    /// ```
    /// let err = tower_redis_resilience::Error::unavailable("not connected");
    /// assert!(err.is_unavailable() && !err.may_have_run());
    /// ```
    pub fn unavailable(message: &'static str) -> Self {
        Error::new(
            Kind::Unavailable {
                may_have_run: false,
            },
            Detail::Message(message),
        )
    }

    /// The connection is out of use while a `PING` asks whether it is stuck; the
    /// request was not sent.
    pub(crate) fn suspect() -> Self {
        Error::new(
            Kind::Unavailable {
                may_have_run: false,
            },
            Detail::Suspect,
        )
    }

    /// Refused unsent while the connection is [suspect](Self::suspect): Redis did not
    /// answer the last calls within their deadlines, so a resend a few milliseconds
    /// later, before the `PING` has its answer, would only be refused again.
    pub(crate) fn is_suspect(&self) -> bool {
        matches!(self.detail, Detail::Suspect | Detail::Held)
    }

    /// The connection is suspect, but Redis answers on another, where reads go: what the
    /// connection's calls wait for is held up by Redis (a write pause, a `WAIT`). The
    /// request (not a read) was not sent.
    pub(crate) fn held() -> Self {
        Error::new(
            Kind::Unavailable {
                may_have_run: false,
            },
            Detail::Held,
        )
    }

    /// Made by [`held`](Self::held): refused unsent while Redis serves reads on another
    /// connection. The timeouts that made the connection suspect were counted; counting
    /// these too would have a burst of fast-failing writes open a breaker over the reads
    /// served meanwhile.
    pub(crate) fn is_held(&self) -> bool {
        matches!(self.detail, Detail::Held)
    }

    /// The connection is being re-established; the request was not sent.
    pub(crate) fn reconnecting(attempt: u32, next_try_in: Option<Duration>) -> Self {
        Error::new(
            Kind::Unavailable {
                may_have_run: false,
            },
            Detail::Reconnecting {
                attempt,
                next_try_in,
            },
        )
    }

    /// The connection this error came from is unusable: I/O failed or the replies went
    /// out of step. Server refusals such as `LOADING` leave the connection fine.
    pub(crate) fn breaks_connection(&self) -> bool {
        self.is_unavailable()
            && self
                .redis_error()
                .is_some_and(|err| matches!(err.kind(), ErrorKind::Io | ErrorKind::Parse))
    }

    /// The same error, from one node of a cluster: it does not
    /// [break](Self::breaks_connection) the cluster's connection, which reconnects to that
    /// node by itself while the others serve on.
    #[cfg(feature = "cluster")]
    pub(crate) fn of_one_node(self) -> Self {
        if !self.breaks_connection() {
            return self;
        }
        let Some(err) = self.redis_error() else {
            return self;
        };
        let text = format!("a cluster node's connection: {err}");
        Error {
            detail: Detail::Text(text.into()),
            ..self
        }
    }

    /// Why Redis refused: the error's own code, or for a transaction Redis discarded
    /// (`EXECABORT`), the first of its commands' refusals that says Redis could not serve
    /// them (`READONLY`: a demoted master; `MOVED`: the slot moved; `LOADING`...), as
    /// that is what refused the whole. The predicates below read this, so a transaction
    /// refused by a replica is the failover signal as a lone write is.
    fn cause_code(&self) -> Option<&str> {
        let Detail::Redis(err) = &self.detail else {
            return None;
        };
        if err.kind() != ErrorKind::Server(ServerErrorKind::ExecAbort) {
            return err.code();
        }
        let refusals = err.clone().into_server_errors();
        refusals
            .iter()
            .flat_map(|refusals| refusals.iter())
            .find_map(|(_, refusal)| {
                UNAVAILABLE_CODES
                    .iter()
                    .copied()
                    .find(|&code| code == refusal.code())
            })
            .or_else(|| err.code())
    }

    /// A cluster node redirected the command (`MOVED`, `ASK`): the slot is served
    /// elsewhere. Not an outage.
    pub(crate) fn is_redirect(&self) -> bool {
        matches!(self.cause_code(), Some("MOVED" | "ASK"))
    }

    /// Redis is up and refused the command at once, as it refuses every command for now:
    /// loading its data (`LOADING`), running a script (`BUSY`), a replica cut off from
    /// its master (`MASTERDOWN`), a cluster that cannot serve (`CLUSTERDOWN`,
    /// `TRYAGAIN`). The command did not run.
    pub(crate) fn is_refusal_of_a_live_server(&self) -> bool {
        self.is_lasting_refusal() || self.cause_code() == Some("TRYAGAIN")
    }

    /// Such a refusal that lasts seconds, as loading a dataset, a script past its time
    /// limit, a lost master link or a failover do: sending the command again a few
    /// milliseconds later only gets it again. (`TRYAGAIN`, a multi-key command while its
    /// slot moves, is meant to be retried soon.)
    /// A cluster's master that cannot be reached ([`is_master_gone`](Self::is_master_gone))
    /// is counted as one: the client tries it again on a schedule of its own.
    pub(crate) fn is_lasting_refusal(&self) -> bool {
        matches!(
            self.cause_code(),
            Some("LOADING" | "BUSY" | "MASTERDOWN" | "CLUSTERDOWN")
        ) || self.is_master_gone()
    }

    /// Made by [`master_gone`](Self::master_gone).
    pub(crate) fn is_master_gone(&self) -> bool {
        matches!(self.detail, Detail::MasterGone(_))
    }

    /// A replica refused a write (`READONLY`): the server is up and serves reads, but
    /// this connection does not lead to the master (after a failover, say).
    pub(crate) fn is_replica_refusal(&self) -> bool {
        self.cause_code() == Some("READONLY")
    }

    /// An up server refused a write and would serve reads: a replica (`READONLY`), a
    /// master short of the replicas `min-replicas-to-write` asks for (`NOREPLICAS`, as
    /// an old master is once a failover took its replica), one that cannot persist
    /// (`MISCONF`), or one that gave up on a blocking pop when it turned replica
    /// (`UNBLOCKED`). The write did not run.
    pub(crate) fn is_write_refusal(&self) -> bool {
        matches!(
            self.cause_code(),
            Some("READONLY" | "NOREPLICAS" | "MISCONF" | "UNBLOCKED")
        )
    }

    /// An [unavailable](Error::is_unavailable) error described in words (which must not
    /// contain secrets), for a request that was not sent.
    pub(crate) fn unavailable_because(message: impl Into<Arc<str>>) -> Self {
        Error::new(
            Kind::Unavailable {
                may_have_run: false,
            },
            Detail::Text(message.into()),
        )
    }

    /// A [configuration](Error::is_config) error for a request refused before it was
    /// sent, for what it would do to the connection (which must not contain secrets):
    /// the app's mistake, which says nothing about Redis.
    pub(crate) fn refused(message: impl Into<Arc<str>>) -> Self {
        Error::new(Kind::CONFIG, Detail::Refused(message.into()))
    }

    /// Refused before it was sent, by [`refused`](Error::refused).
    pub(crate) fn is_refused(&self) -> bool {
        matches!(self.detail, Detail::Refused(_))
    }

    /// `cause`, which kept a connection of its own from opening for a request that needs
    /// one, while the shared connection works: unavailable, not sent, and no sign that
    /// Redis is down (see [`is_no_connection_of_its_own`](Self::is_no_connection_of_its_own)).
    pub(crate) fn no_connection_of_its_own(cause: &Error) -> Self {
        Error::no_connection_of_its_own_until(cause, None)
    }

    /// [`no_connection_of_its_own`](Self::no_connection_of_its_own), with the time left
    /// before the next try to open one, when tries are paced after failures.
    pub(crate) fn no_connection_of_its_own_until(
        cause: &Error,
        next_try_in: Option<Duration>,
    ) -> Self {
        let text = match next_try_in {
            Some(next) => format!(
                "could not open a connection of its own (the shared connection works; next \
                 try in {next:?}): {cause}"
            ),
            None => format!(
                "could not open a connection of its own (the shared connection works): {cause}"
            ),
        };
        Error::new(
            Kind::Unavailable {
                may_have_run: false,
            },
            Detail::NoConnectionOfItsOwn(text.into()),
        )
    }

    /// Made by [`no_connection_of_its_own`](Self::no_connection_of_its_own).
    pub(crate) fn is_no_connection_of_its_own(&self) -> bool {
        matches!(self.detail, Detail::NoConnectionOfItsOwn(_))
    }

    /// A request for `slot` of a cluster, not sent: its master, `node`, could not be
    /// reached, and is tried again in `next_try`. Unavailable, and not for a resend a few
    /// milliseconds later, or for the breaker every node's calls share: the other nodes
    /// serve on.
    #[cfg(feature = "cluster")]
    pub(crate) fn master_gone(slot: u16, node: &str, stalled: bool, next_try: Duration) -> Self {
        let why = if stalled {
            "does not answer"
        } else {
            "cannot be reached"
        };
        let text = format!(
            "not sent: the cluster's master for slot {slot}, {node}, {why} (tried again in \
             {} ms)",
            next_try.as_millis()
        );
        Error::new(
            Kind::Unavailable {
                may_have_run: false,
            },
            Detail::MasterGone(text.into()),
        )
    }

    /// A configuration problem described in words (which must not contain secrets).
    pub(crate) fn config(message: impl Into<Arc<str>>) -> Self {
        Error::new(Kind::CONFIG, Detail::Text(message.into()))
    }

    /// A configuration problem found once the request was on its way to Redis, which may
    /// have run it: a call that could not be timed, for want of a runtime.
    pub(crate) fn config_after_sending(message: impl Into<Arc<str>>) -> Self {
        Error::new(
            Kind::Config { may_have_run: true },
            Detail::Text(message.into()),
        )
    }

    /// A [timeout](Error::is_timeout): a deadline of `after` passed.
    ///
    /// ```
    /// use std::time::Duration;
    /// let err = tower_redis_resilience::Error::timed_out(Duration::from_millis(250));
    /// assert!(err.is_timeout() && err.may_have_run());
    /// ```
    pub fn timed_out(after: Duration) -> Self {
        Error::new(Kind::Timeout { after }, Detail::None)
    }

    /// A timeout on the request's own deadline ([`is_own_deadline`](Self::is_own_deadline)).
    pub(crate) fn timed_out_on_own_deadline(after: Duration) -> Self {
        Error::new(Kind::Timeout { after }, Detail::OwnDeadline)
    }

    /// A [circuit-open](Error::is_circuit_open) rejection; a probe is allowed in
    /// `retry_in`. Does not allocate.
    ///
    /// ```
    /// use std::time::Duration;
    /// let err = tower_redis_resilience::Error::circuit_open(Duration::from_secs(1));
    /// assert_eq!(err.retry_in(), Some(Duration::from_secs(1)));
    /// ```
    pub fn circuit_open(retry_in: Duration) -> Self {
        Error::new(
            Kind::CircuitOpen {
                probe: Probe::In(retry_in),
            },
            Detail::None,
        )
    }

    /// A circuit-open rejection whose next probe is due at `at`.
    pub(crate) fn circuit_open_until(at: tokio::time::Instant) -> Self {
        Error::new(
            Kind::CircuitOpen {
                probe: Probe::At(at),
            },
            Detail::None,
        )
    }

    /// A request not sent, as its connection had closed (or was retired, Sentinel having
    /// named another master) before: Redis never saw it, and the connection is broken.
    pub(crate) fn not_sent() -> Self {
        Error::classify(
            RedisError::from(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection had closed or was retired before the request was sent",
            )),
            false,
        )
    }

    /// What a response future answers if polled again after it answered.
    pub(crate) fn polled_after_completion() -> Self {
        Error::unavailable("response future polled after completion")
    }

    /// A rejection by a breaker forced open by hand.
    pub(crate) fn circuit_forced_open() -> Self {
        Error::new(
            Kind::CircuitOpen {
                probe: Probe::Never,
            },
            Detail::Message("forced open"),
        )
    }

    /// An error from a request that was handed to the connection: an I/O failure may have
    /// happened after Redis received it.
    pub(crate) fn from_request(err: RedisError) -> Self {
        Error::classify(err, true)
    }

    /// An error from establishing a connection: nothing of the user's was sent. A server
    /// error during the handshake (`SELECT` of a missing database, `HELLO`) is a
    /// configuration problem unless it is one of the transient codes, and so is a TLS
    /// handshake the TLS layer rejects (untrusted certificate, not TLS on the other end),
    /// which reaches us as `InvalidData`, and a reply that is not Redis's protocol at all
    /// (the address is another service's).
    pub(crate) fn from_connect(err: RedisError) -> Self {
        let tls_rejected = io_error(&err).is_some_and(|io| io.kind() == io::ErrorKind::InvalidData);
        // Closed as soon as it opened: a server at `maxclients` writes its error and
        // closes, and the handshake's first write or read usually finds the close first.
        let closed_at_once = io_error(&err).is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::UnexpectedEof
            )
        });
        let cause = closed_at_once.then(|| err.to_string());
        // The handshake's reply does not parse: whatever listens there is not Redis (an
        // HTTP server, another database: a wrong port), and trying again soon will not
        // change that.
        let not_redis = (err.kind() == ErrorKind::Parse)
            .then(|| err.to_string().trim_end().replace('\n', "; "));
        let mut error = Error::classify(err, false);
        if let Some(cause) = not_redis {
            error.kind = Kind::CONFIG;
            error.detail = Detail::Text(
                format!(
                    "the server did not answer in Redis's protocol (RESP): is the address a \
                     Redis port, not another service's (an HTTP server, another database)? \
                     {cause}"
                )
                .into(),
            );
        }
        if let Some(cause) = cause
            && error.is_unavailable()
        {
            error.detail = Detail::Text(
                format!(
                    "the server closed the connection as it opened (is it at `maxclients`, a \
                     TLS port spoken to without TLS, or a proxy with no server behind it?): \
                     {cause}"
                )
                .into(),
            );
        }
        if tls_rejected {
            error.kind = Kind::CONFIG;
        }
        if error.is_server() {
            let full = error.server_code() == Some("ERR")
                && error
                    .redis_error()
                    .and_then(RedisError::detail)
                    .is_some_and(|d| d.contains("max number of clients"));
            error.kind = if full {
                Kind::Unavailable {
                    may_have_run: false,
                }
            } else {
                Kind::CONFIG
            };
        }
        error
    }

    /// A server error found in a reply (`Value::ServerError`).
    pub(crate) fn from_server_error(err: ServerError) -> Self {
        Error::classify(RedisError::from(err), true)
    }

    /// Whether a reply value is a server error that means "unavailable".
    pub(crate) fn is_unavailable_reply(value: &Value) -> bool {
        matches!(value, Value::ServerError(err) if UNAVAILABLE_CODES.contains(&err.code()))
    }

    fn new(kind: Kind, detail: Detail) -> Self {
        Error {
            kind,
            command: None,
            detail,
        }
    }

    fn classify(err: RedisError, io_may_have_run: bool) -> Self {
        if let Some(ours) = Error::unwrap_from(&err) {
            return ours;
        }
        let kind = match err.kind() {
            ErrorKind::Io => Kind::Unavailable {
                may_have_run: io_may_have_run,
            },
            // A reply that does not parse leaves the connection out of step with Redis.
            ErrorKind::Parse => Kind::Unavailable {
                may_have_run: io_may_have_run,
            },
            ErrorKind::AuthenticationFailed
            | ErrorKind::InvalidClientConfig
            | ErrorKind::Client
            | ErrorKind::RESP3NotSupported
            | ErrorKind::UnexpectedReturnType => Kind::CONFIG,
            ErrorKind::Server(ServerErrorKind::ExecAbort) => classify_transaction(&err),
            ErrorKind::Server(_) | ErrorKind::Extension => classify_code(err.code()),
            _ => Kind::Unavailable {
                may_have_run: io_may_have_run,
            },
        };
        Error::new(kind, Detail::Redis(err))
    }

    /// Finds an `Error` of ours carried inside a `RedisError` by [`From<Error>`].
    fn unwrap_from(err: &RedisError) -> Option<Error> {
        io_error(err)?.get_ref()?.downcast_ref::<Error>().cloned()
    }

    /// The `io::ErrorKind` our error travels under through redis-rs, chosen so redis-rs's
    /// own predicates agree with ours (`is_timeout()` for timeouts, `is_connection_refusal()`
    /// for open circuits, `is_connection_dropped()` for unavailability).
    fn io_kind(&self) -> io::ErrorKind {
        if let Detail::Redis(err) = &self.detail
            && let Some(io) = io_error(err)
        {
            return io.kind();
        }
        match self.kind {
            Kind::Unavailable { .. } => io::ErrorKind::NotConnected,
            Kind::Timeout { .. } => io::ErrorKind::TimedOut,
            Kind::CircuitOpen { .. } => io::ErrorKind::ConnectionRefused,
            Kind::Config { .. } => io::ErrorKind::PermissionDenied,
            Kind::Server => io::ErrorKind::Other,
        }
    }
}

/// The `io::Error` inside a redis-rs I/O error.
fn io_error(err: &RedisError) -> Option<&io::Error> {
    if err.kind() != ErrorKind::Io {
        return None;
    }
    let source = std::error::Error::source(err)?;
    // redis-rs keeps the io::Error behind an Arc and hands out the Arc as the source.
    match source.downcast_ref::<io::Error>() {
        Some(io) => Some(io),
        None => source
            .downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>()?
            .downcast_ref::<io::Error>(),
    }
}

fn classify_code(code: Option<&str>) -> Kind {
    match code {
        Some(code) if UNAVAILABLE_CODES.contains(&code) => Kind::Unavailable {
            may_have_run: false,
        },
        Some(code) if AUTH_CODES.contains(&code) => Kind::CONFIG,
        _ => Kind::Server,
    }
}

/// An aborted transaction is the application's problem unless Redis refused the queued
/// commands because it could not serve (`LOADING` answered to every command, say).
fn classify_transaction(err: &RedisError) -> Kind {
    let unavailable = err.clone().into_server_errors().is_some_and(|errors| {
        errors
            .iter()
            .any(|(_, e)| UNAVAILABLE_CODES.contains(&e.code()))
    });
    if unavailable {
        Kind::Unavailable {
            may_have_run: false,
        }
    } else {
        Kind::Server
    }
}

impl From<RedisError> for Error {
    /// Classifies any redis-rs error, and recovers an `Error` of ours exactly (with its
    /// command name and details) when the `RedisError` came out of a [`Client`](crate::Client).
    fn from(err: RedisError) -> Self {
        Error::classify(err, true)
    }
}

impl From<Error> for RedisError {
    /// Server errors become the `RedisError` redis-rs would have given; every other error
    /// travels inside an `io::Error` whose kind matches it, so redis-rs's predicates keep
    /// working and `Error::from` recovers it.
    fn from(err: Error) -> Self {
        if err.is_server()
            && let Detail::Redis(redis) = &err.detail
        {
            return redis.clone();
        }
        RedisError::from(io::Error::new(err.io_kind(), err))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(command) = self.command {
            write!(f, "{command}: ")?;
        }
        match self.kind {
            Kind::Unavailable { .. } => f.write_str("redis unavailable")?,
            Kind::Timeout { after } => write!(f, "timed out after {after:?}")?,
            Kind::CircuitOpen {
                probe: Probe::Never,
            } => f.write_str("circuit open")?,
            Kind::CircuitOpen { .. } => match self.retry_in() {
                Some(Duration::ZERO) => f.write_str("circuit open, probing")?,
                Some(retry_in) => write!(f, "circuit open, next probe in {retry_in:?}")?,
                None => f.write_str("circuit open")?,
            },
            Kind::Server => f.write_str("redis replied with an error")?,
            Kind::Config { .. } => f.write_str("configuration error")?,
        }
        match &self.detail {
            Detail::None => Ok(()),
            Detail::OwnDeadline => f.write_str(", its own deadline"),
            Detail::Suspect => f.write_str(
                ": the last calls on the connection got no reply: a PING is asking whether \
                 it is stuck or redis is slow",
            ),
            Detail::Held => f.write_str(
                ": the last calls on the connection got no reply, but redis answers on \
                 another (a write pause?): reads go there, other calls are refused until \
                 the connection answers a PING or is replaced",
            ),
            Detail::Message(message) => write!(f, ": {message}"),
            Detail::Reconnecting {
                attempt,
                next_try_in: Some(next),
            } => write!(
                f,
                ": reconnecting, attempt {attempt} failed, next in {next:?}"
            ),
            Detail::Reconnecting { attempt, .. } => {
                write!(f, ": reconnecting, attempt {attempt} in progress")
            }
            Detail::Text(text)
            | Detail::Refused(text)
            | Detail::NoConnectionOfItsOwn(text)
            | Detail::MasterGone(text) => write!(f, ": {text}"),
            // Server errors read as Redis wrote them: `WRONGTYPE Operation against...`.
            Detail::Redis(err) => match (err.code(), err.detail()) {
                (Some(code), Some(detail)) => write!(f, ": {code} {detail}"),
                _ => write!(f, ": {err}"),
            },
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("command", &self.command)
            .field("message", &format_args!("{self}"))
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.detail {
            Detail::Redis(err) => Some(err),
            _ => None,
        }
    }
}

/// The error Redis's reply `reply` (`b"-WRONGTYPE ...\r\n"`) becomes, for unit tests.
#[cfg(test)]
pub(crate) fn server(reply: &[u8]) -> Error {
    let value = redis::parse_redis_value(reply).expect("valid RESP");
    match value {
        Value::ServerError(err) => Error::from_server_error(err),
        other => panic!("not an error reply: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_class_holds_for_every_kind() {
        let errors = [
            Error::unavailable("x"),
            Error::timed_out(Duration::from_millis(5)),
            Error::circuit_open(Duration::from_secs(1)),
            server(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
            Error::config("bad"),
        ];
        for err in errors {
            let classes = [
                err.is_unavailable(),
                err.is_timeout(),
                err.is_circuit_open(),
                err.is_server(),
                err.is_config(),
            ];
            assert_eq!(classes.iter().filter(|c| **c).count(), 1, "{err:?}");
        }
    }

    #[test]
    fn transient_server_codes_are_unavailable_and_did_not_run() {
        for reply in [
            &b"-LOADING Redis is loading the dataset in memory\r\n"[..],
            b"-BUSY Redis is busy running a script.\r\n",
            b"-MASTERDOWN Link with MASTER is down\r\n",
            b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
            b"-CLUSTERDOWN The cluster is down\r\n",
            b"-READONLY You can't write against a read only replica.\r\n",
            b"-MOVED 3999 127.0.0.1:6381\r\n",
            b"-ASK 3999 127.0.0.1:6381\r\n",
            b"-UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)\r\n",
        ] {
            let err = server(reply);
            assert!(err.is_unavailable(), "{err}");
            assert!(!err.may_have_run(), "{err}");
        }
        assert!(server(b"-MOVED 3999 127.0.0.1:6381\r\n").is_redirect());
        assert!(!server(b"-READONLY You can't write.\r\n").is_redirect());
        // A blocking pop Redis gave up on as it turned replica: a write refused by an up
        // server, not an outage.
        assert!(server(b"-UNBLOCKED client unblocked via CLIENT UNBLOCK\r\n").is_write_refusal());
    }

    #[test]
    fn auth_codes_are_config() {
        assert!(server(b"-WRONGPASS invalid username-password pair\r\n").is_config());
        assert!(server(b"-NOAUTH Authentication required.\r\n").is_config());
    }

    #[test]
    fn our_error_survives_a_trip_through_redis_error() {
        let original = Error::timed_out(Duration::from_millis(250)).with_command("GET");
        let redis = RedisError::from(original.clone());
        assert!(redis.is_timeout(), "redis-rs agrees it is a timeout");
        let back = Error::from(redis);
        assert!(back.is_timeout());
        assert_eq!(back.command(), Some("GET"));
        assert_eq!(back.timeout(), Some(Duration::from_millis(250)));
        assert_eq!(back.to_string(), original.to_string());

        let open = RedisError::from(Error::circuit_open(Duration::from_secs(2)));
        assert!(open.is_connection_refusal());
        assert_eq!(Error::from(open).retry_in(), Some(Duration::from_secs(2)));
    }

    #[test]
    fn server_errors_leave_as_the_plain_redis_error() {
        let err = server(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
        let redis = RedisError::from(err.with_command("GET"));
        assert_eq!(redis.code(), Some("WRONGTYPE"));
        assert!(Error::from(redis).is_server());
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn a_request_whose_cluster_master_cannot_be_reached_is_unavailable_unsent_and_not_resent() {
        let made = Error::master_gone(3999, "127.0.0.1:6381", false, Duration::from_millis(400));
        // As the leaf gets it back from the cluster connection.
        let arrived = Error::from_request(RedisError::from(made.clone())).of_one_node();
        for err in [made, arrived] {
            let err = err.with_command("GET");
            assert!(err.is_unavailable() && !err.may_have_run(), "{err}");
            assert!(err.is_master_gone() && err.is_lasting_refusal(), "{err}");
            assert_eq!(
                err.to_string(),
                "GET: redis unavailable: not sent: the cluster's master for slot 3999, \
                 127.0.0.1:6381, cannot be reached (tried again in 400 ms)"
            );
        }
        let stalled = Error::master_gone(3999, "127.0.0.1:6381", true, Duration::ZERO);
        assert!(stalled.is_master_gone() && !stalled.may_have_run());
        assert!(
            stalled
                .to_string()
                .contains("127.0.0.1:6381, does not answer")
        );
    }

    #[test]
    fn display_names_the_command_and_the_cause() {
        let err = Error::circuit_open(Duration::from_millis(1500)).with_command("SET");
        assert_eq!(err.to_string(), "SET: circuit open, next probe in 1.5s");
    }
}
