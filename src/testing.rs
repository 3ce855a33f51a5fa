//! An in-memory Redis stand-in for the layers' unit tests: each command's first argument
//! says how it answers and its second after how many milliseconds
//! (`GET fail 20`, `SET ok 0`, `BLPOP hang 5`).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
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
    /// A timeout error from below.
    Timeout,
    /// `WRONGTYPE`.
    Server,
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
        Some("timeout") => Behaviour::Timeout,
        Some("server") => Behaviour::Server,
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
        Behaviour::Timeout => Err(Error::timed_out(Duration::from_millis(250))),
        Behaviour::Server => Err(crate::error::server(b"-WRONGTYPE x\r\n")),
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

/// Sends `GET behaviour millis` once the service is ready.
pub(crate) async fn send<S>(service: &mut S, behaviour: &str, millis: u64) -> Result<Value, Error>
where
    S: Service<Request, Response = Value, Error = Error>,
{
    service.ready().await?.call(get(behaviour, millis)).await
}
