use std::{fmt, sync::Arc, time::Duration};

use redis::{Arg, Cmd, ConnectionAddr};
use tower::Layer;
use tracing::{Level, Span, field::Empty};

use super::Trace;
use crate::{Connector, Request};

/// Opens a `tracing` span for every call, with OpenTelemetry's database attributes, and
/// records how it ended.
///
/// | field | value |
/// |-------|-------|
/// | span name `redis`, `otel.name` | the command name (`GET`, `CONFIG GET`, `PIPELINE`, `MULTI`) |
/// | `otel.kind` | `client` |
/// | `db.system.name` | `redis` |
/// | `db.operation.name` | the command name |
/// | `db.namespace` | the database index, when known |
/// | `server.address`, `server.port` | where Redis is, when known ([`for_connector`](Self::for_connector)) |
/// | `db.operation.batch.size` | the number of commands, for pipelines |
/// | `error.type` | on failure: `timeout`, `unavailable`, `circuit_open`, `server_error`, `config_error`, `cancelled` |
/// | `db.response.status_code` | on a server error: its code (`WRONGTYPE`) |
/// | `otel.status_code` | `ERROR` on failure |
/// | `db.query.text` | only with [`record_arguments`](Self::record_arguments): the command and its arguments, truncated |
///
/// Keys and values are never recorded unless you opt in, and even then the arguments of
/// commands that carry credentials (`AUTH`, `HELLO`, `MIGRATE`, `ACL SETUSER`,
/// `CONFIG SET`) are not. Spans are at `DEBUG` level by default (as tower-http's are):
/// free when that level is off. With [`slow_call`](Self::slow_call), a call that takes
/// longer logs a `warn` event inside its span.
///
/// The `tracing-opentelemetry` crate turns these spans into OpenTelemetry spans
/// (`otel.*` fields set their name, kind and status).
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_redis_resilience::{Connector, trace::TraceLayer};
///
/// # fn main() -> Result<(), tower_redis_resilience::Error> {
/// let connector = Connector::from_url("redis://127.0.0.1:6379/2")?;
/// let trace = TraceLayer::for_connector(&connector)
///     .level(tracing::Level::INFO)
///     .slow_call(Duration::from_millis(50));
/// # let _ = trace; Ok(()) }
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct TraceLayer {
    settings: Arc<Settings>,
}

#[derive(Clone)]
pub(crate) struct Settings {
    level: Level,
    address: Option<Arc<str>>,
    port: Option<u16>,
    db: Option<i64>,
    /// `Some(n)`: record at most n bytes of arguments.
    arguments: Option<usize>,
    pub(super) slow_call: Option<Duration>,
    /// False for a layer that stands in for a removed one: it makes no span.
    on: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            level: Level::DEBUG,
            address: None,
            port: None,
            db: None,
            arguments: None,
            slow_call: None,
            on: true,
        }
    }
}

/// Commands whose arguments may hold a password: never recorded.
const SECRET_ARGUMENTS: &[&str] = &["AUTH", "HELLO", "MIGRATE", "ACL SETUSER", "CONFIG SET"];

macro_rules! span_at {
    ($level:expr, $name:expr, $db:expr, $address:expr, $port:expr, $batch:expr) => {
        tracing::span!(
            $level,
            "redis",
            otel.name = $name,
            otel.kind = "client",
            otel.status_code = Empty,
            db.system.name = "redis",
            db.operation.name = $name,
            db.namespace = $db,
            server.address = $address,
            server.port = $port,
            db.operation.batch.size = $batch,
            db.query.text = Empty,
            db.response.status_code = Empty,
            error.type = Empty,
        )
    };
}

impl Settings {
    /// Whether a call may need a span or a clock: a subscriber listens at our level
    /// (one atomic load, as `tracing`'s own macros check first), or slow calls are
    /// reported.
    #[inline]
    pub(super) fn may_trace(&self) -> bool {
        self.on
            && (self.slow_call.is_some()
                || (self.level <= tracing::level_filters::STATIC_MAX_LEVEL
                    && self.level <= tracing::level_filters::LevelFilter::current()))
    }

    #[inline]
    pub(super) fn span(&self, request: &Request) -> Span {
        let name = request.info().name();
        let db = self.db;
        let address = self.address.as_deref();
        let port = self.port;
        let batch = request.pipeline().map(|pipeline| pipeline.len());
        let span = match self.level {
            Level::ERROR => span_at!(Level::ERROR, name, db, address, port, batch),
            Level::WARN => span_at!(Level::WARN, name, db, address, port, batch),
            Level::INFO => span_at!(Level::INFO, name, db, address, port, batch),
            Level::DEBUG => span_at!(Level::DEBUG, name, db, address, port, batch),
            _ => span_at!(Level::TRACE, name, db, address, port, batch),
        };
        if let Some(limit) = self.arguments
            && !span.is_disabled()
        {
            span.record("db.query.text", query_text(request, limit));
        }
        span
    }
}

/// `GET k`, `SET k v; GET k` for a pipeline, cut at `limit` bytes (on a character
/// boundary, marked with `…`). Arguments that are not text show as `?`.
pub(super) fn query_text(request: &Request, limit: usize) -> String {
    let mut text = String::new();
    let one = |cmd: &Cmd, name: &str, text: &mut String| {
        let secret = SECRET_ARGUMENTS.contains(&name);
        for (index, arg) in cmd.args_iter().enumerate() {
            if index > 0 {
                text.push(' ');
            }
            if secret && index > 0 {
                text.push_str("[redacted]");
                break;
            }
            match arg {
                Arg::Simple(bytes) => {
                    // Only what can show: a value of megabytes is not copied whole to be
                    // cut. Past the limit by a character's width, so the cut is marked.
                    let room = (limit + 4).saturating_sub(text.len());
                    let shown = bytes.get(..room).unwrap_or(bytes);
                    text.push_str(&String::from_utf8_lossy(shown));
                }
                _ => text.push('?'),
            }
            if text.len() > limit {
                break;
            }
        }
    };
    match (request.cmd(), request.pipeline()) {
        (Some(cmd), _) => one(cmd, request.info().name(), &mut text),
        (None, Some(pipeline)) => {
            for (index, cmd) in pipeline.cmd_iter().enumerate() {
                if index > 0 {
                    text.push_str("; ");
                }
                one(cmd, crate::CommandInfo::of_cmd(cmd).name(), &mut text);
                if text.len() > limit {
                    break;
                }
            }
        }
        (None, None) => {}
    }
    if text.len() > limit {
        let mut cut = limit;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

impl TraceLayer {
    /// Spans at `DEBUG` with no server attributes; see [`for_connector`](Self::for_connector).
    pub fn new() -> Self {
        TraceLayer::default()
    }

    /// A layer that makes no span and reports no slow call. What the builder puts in
    /// place of a removed trace layer, so the stack keeps one type.
    pub(crate) fn off() -> Self {
        TraceLayer {
            settings: Arc::new(Settings {
                on: false,
                ..Settings::default()
            }),
        }
    }

    /// Spans carrying `server.address`, `server.port` and `db.namespace` from the
    /// connector's connection details (never its credentials).
    pub fn for_connector(connector: &Connector) -> Self {
        let info = connector.connection_info();
        let (address, port) = match (connector.sentinel_master_name(), info.addr()) {
            // The master moves; its name stands for it.
            (Some(master), _) => (master.into(), None),
            (None, ConnectionAddr::Tcp(host, port)) => (host.as_str().into(), Some(*port)),
            (None, ConnectionAddr::TcpTls { host, port, .. }) => {
                (host.as_str().into(), Some(*port))
            }
            (None, ConnectionAddr::Unix(path)) => (path.to_string_lossy().into(), None),
            _ => (connector.address().into(), None),
        };
        TraceLayer::new()
            .server(address, port)
            .db(info.redis_settings().db())
    }

    /// Sets `server.address` (a host name, an IP address or a socket path) and
    /// `server.port`.
    pub fn server(mut self, address: Arc<str>, port: Option<u16>) -> Self {
        let settings = Arc::make_mut(&mut self.settings);
        settings.address = Some(address);
        settings.port = port;
        self
    }

    /// Sets `db.namespace`, the database index.
    pub fn db(mut self, db: i64) -> Self {
        Arc::make_mut(&mut self.settings).db = Some(db);
        self
    }

    /// The level of the spans (default `DEBUG`).
    pub fn level(mut self, level: Level) -> Self {
        Arc::make_mut(&mut self.settings).level = level;
        self
    }

    /// Opts in to recording the command's arguments (keys, values) as `db.query.text`,
    /// at most `max_bytes` of them. Mind what your keys and values hold.
    pub fn record_arguments(mut self, max_bytes: usize) -> Self {
        Arc::make_mut(&mut self.settings).arguments = Some(max_bytes);
        self
    }

    /// Logs a `warn` event, inside the call's span, for calls that take `threshold` or
    /// longer (blocking commands excepted: they wait on purpose).
    pub fn slow_call(mut self, threshold: Duration) -> Self {
        Arc::make_mut(&mut self.settings).slow_call = Some(threshold);
        self
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            settings: self.settings.clone(),
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceLayer")
            .field("level", &self.level)
            .field("address", &self.address)
            .field("port", &self.port)
            .field("db", &self.db)
            .field("record_arguments", &self.arguments)
            .field("slow_call", &self.slow_call)
            .finish()
    }
}

impl fmt::Debug for TraceLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.settings, f)
    }
}
