//! An in-memory Redis stand-in for the layers' unit tests: each command's first argument
//! says how it answers and its second after how many milliseconds
//! (`GET fail 20`, `SET ok 0`, `BLPOP hang 5`).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use redis::Value;
use tower::{Service, ServiceExt};

use crate::{Error, Request};

/// What the leaf does with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behaviour {
    /// Answers `OK`.
    Ok,
    /// Unavailable (a lost connection).
    Fail,
    /// The connection broke under the call (an I/O error): it is replaced.
    Broken,
    /// A timeout error from below.
    Timeout,
    /// A timeout on the request's own deadline.
    OwnTimeout,
    /// `WRONGTYPE`.
    Server,
    /// `READONLY`: a write that reached a replica.
    ReadOnly,
    /// `LOADING`: a server loading its data.
    Loading,
    /// `BUSY`: a server running a script.
    Busy,
    /// `NOREPLICAS`: a master refusing writes it cannot pass to enough replicas.
    NoReplicas,
    /// `MISCONF`: a master refusing writes it cannot persist.
    Misconf,
    /// A request the leaf refused to send (a `SELECT` on the shared connection).
    Refused,
    /// No connection of its own for a blocking command (Redis at `maxclients`).
    NoConnectionOfItsOwn,
    /// `MOVED`: a cluster node redirects to the one that serves the slot now.
    Moved,
    /// Never answers.
    Hang,
}

/// Answers as each command says, after the delay it says, and counts the calls that
/// reached it.
#[derive(Clone, Default)]
pub(crate) struct Leaf {
    calls: Arc<AtomicUsize>,
}

impl Leaf {
    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request> for Leaf {
    type Response = Value;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Value, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (behaviour, delay) = match request.cmd() {
            Some(cmd) => script(cmd),
            // A pipeline answers as its first command says, one `OK` per command.
            None => {
                let pipeline = request.pipeline().expect("a command or a pipeline");
                let first = pipeline.cmd_iter().next().expect("a non-empty pipeline");
                let (behaviour, delay) = script(first);
                let n = pipeline.len();
                return Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    answer(behaviour)
                        .await
                        .map(|_| Value::Array(vec![Value::Okay; n]))
                });
            }
        };
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            answer(behaviour).await
        })
    }
}

fn script(cmd: &redis::Cmd) -> (Behaviour, Duration) {
    let mut args = cmd.args_iter().skip(1).map(|arg| match arg {
        redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        _ => String::new(),
    });
    let behaviour = match args.next().as_deref() {
        Some("ok") => Behaviour::Ok,
        Some("fail") => Behaviour::Fail,
        Some("broken") => Behaviour::Broken,
        Some("timeout") => Behaviour::Timeout,
        Some("own-timeout") => Behaviour::OwnTimeout,
        Some("server") => Behaviour::Server,
        Some("readonly") => Behaviour::ReadOnly,
        Some("loading") => Behaviour::Loading,
        Some("busy") => Behaviour::Busy,
        Some("noreplicas") => Behaviour::NoReplicas,
        Some("misconf") => Behaviour::Misconf,
        Some("refused") => Behaviour::Refused,
        Some("no-connection-of-its-own") => Behaviour::NoConnectionOfItsOwn,
        Some("moved") => Behaviour::Moved,
        Some("hang") => Behaviour::Hang,
        other => panic!("unknown behaviour {other:?}"),
    };
    let delay = Duration::from_millis(args.next().map_or(0, |ms| ms.parse().unwrap()));
    (behaviour, delay)
}

async fn answer(behaviour: Behaviour) -> Result<Value, Error> {
    match behaviour {
        Behaviour::Ok => Ok(Value::Okay),
        Behaviour::Fail => Err(Error::unavailable("connection lost")),
        Behaviour::Broken => Err(Error::from_request(redis::RedisError::from(
            std::io::Error::from(std::io::ErrorKind::BrokenPipe),
        ))),
        Behaviour::Timeout => Err(Error::timed_out(Duration::from_millis(250))),
        Behaviour::OwnTimeout => Err(Error::timed_out_on_own_deadline(Duration::from_millis(10))),
        Behaviour::Server => Err(crate::error::server(b"-WRONGTYPE x\r\n")),
        Behaviour::ReadOnly => Err(crate::error::server(
            b"-READONLY You can't write against a read only replica.\r\n",
        )),
        Behaviour::Loading => Err(crate::error::server(
            b"-LOADING Redis is loading the dataset in memory\r\n",
        )),
        Behaviour::Busy => Err(crate::error::server(
            b"-BUSY Redis is busy running a script.\r\n",
        )),
        Behaviour::NoReplicas => Err(crate::error::server(
            b"-NOREPLICAS Not enough good replicas to write.\r\n",
        )),
        Behaviour::Misconf => Err(crate::error::server(
            b"-MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.\r\n",
        )),
        Behaviour::Refused => Err(Error::refused("SELECT refused")),
        Behaviour::NoConnectionOfItsOwn => Err(Error::no_connection_of_its_own(
            &Error::unavailable("broken pipe"),
        )),
        Behaviour::Moved => Err(crate::error::server(b"-MOVED 3999 127.0.0.1:6381\r\n")),
        Behaviour::Hang => std::future::pending().await,
    }
}

/// `name behaviour millis`, e.g. `command("SET", "fail", 0)`.
pub(crate) fn command(name: &str, behaviour: &str, millis: u64) -> Request {
    Request::from(redis::cmd(name).arg(behaviour).arg(millis).to_owned())
}

/// `GET behaviour millis`.
pub(crate) fn get(behaviour: &str, millis: u64) -> Request {
    command("GET", behaviour, millis)
}

/// Sends `request` once the service is ready.
pub(crate) async fn call<S>(service: &mut S, request: Request) -> Result<Value, Error>
where
    S: Service<Request, Response = Value, Error = Error>,
{
    service.ready().await?.call(request).await
}

/// Sends `GET behaviour millis` once the service is ready.
pub(crate) async fn send<S>(service: &mut S, behaviour: &str, millis: u64) -> Result<Value, Error>
where
    S: Service<Request, Response = Value, Error = Error>,
{
    call(service, get(behaviour, millis)).await
}

/// Sends `calls` GETs through `service` one after another, each failing at once, as an
/// app's loop that retries until Redis answers; answers whether another task of the
/// runtime got its turn meanwhile (a task that never yields starves the rest, the
/// reconnect loop included).
pub(crate) async fn others_run_while_failing<S>(service: &mut S, calls: usize) -> bool
where
    S: Service<Request, Response = Value, Error = Error>,
{
    let ran = Arc::new(AtomicBool::new(false));
    let other = ran.clone();
    tokio::spawn(async move { other.store(true, Ordering::SeqCst) });
    for _ in 0..calls {
        let error = send(service, "ok", 0).await.unwrap_err();
        assert!(!error.may_have_run(), "{error}");
    }
    ran.load(Ordering::SeqCst)
}

/// A `tracing` subscriber that keeps every span's and event's fields, for tests that
/// check what is logged (and what never is).
#[derive(Clone, Default)]
pub(crate) struct Capture {
    inner: Arc<std::sync::Mutex<Captured>>,
}

#[derive(Default)]
pub(crate) struct Captured {
    pub spans: Vec<CapturedSpan>,
    pub events: Vec<CapturedEvent>,
}

#[derive(Debug, Clone)]
pub(crate) struct CapturedSpan {
    pub name: &'static str,
    pub level: tracing::Level,
    pub fields: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub(crate) struct CapturedEvent {
    pub level: tracing::Level,
    pub fields: std::collections::BTreeMap<String, String>,
}

struct Fields<'a>(&'a mut std::collections::BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl Capture {
    /// Installs it for the current thread until the guard drops.
    pub(crate) fn install(&self) -> tracing::subscriber::DefaultGuard {
        // With a single dispatcher registered in the process, tracing-core decides a new
        // callsite's interest from the default of whichever thread hits it first: a test
        // thread without a subscriber would cache "never" for this one too (as when only
        // one test that captures runs). A second dispatcher, kept for the whole run,
        // makes it ask every registered dispatcher instead.
        static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
        SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::new()));
        let guard = tracing::subscriber::set_default(self.clone());
        // A callsite another test thread registered at the same moment may have cached
        // "nobody is interested"; ask again now that this subscriber exists.
        tracing::callsite::rebuild_interest_cache();
        guard
    }

    pub(crate) fn spans(&self) -> Vec<CapturedSpan> {
        self.inner.lock().unwrap().spans.clone()
    }

    pub(crate) fn events(&self) -> Vec<CapturedEvent> {
        self.inner.lock().unwrap().events.clone()
    }

    /// Everything captured, as one text to search.
    pub(crate) fn text(&self) -> String {
        format!("{:?}{:?}", self.spans(), self.events())
    }
}

impl tracing::Subscriber for Capture {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::always()
    }

    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }

    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = std::collections::BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut captured = self.inner.lock().unwrap();
        captured.spans.push(CapturedSpan {
            name: attrs.metadata().name(),
            level: *attrs.metadata().level(),
            fields,
        });
        tracing::span::Id::from_u64(captured.spans.len() as u64)
    }

    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut captured = self.inner.lock().unwrap();
        let index = span.into_u64() as usize - 1;
        values.record(&mut Fields(&mut captured.spans[index].fields));
    }

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = std::collections::BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.inner.lock().unwrap().events.push(CapturedEvent {
            level: *event.metadata().level(),
            fields,
        });
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}
