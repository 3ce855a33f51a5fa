use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use pin_project::pin_project;
use redis::{Arg, Cmd, Value};

use super::layer::{FallbackPolicy, Shared};
use crate::{
    CommandInfo, Error, Request,
    directory::{self, Key},
};

/// The future of [`Fallback`](super::Fallback).
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<F> {
    #[pin]
    inner: F,
    /// `None` for calls the policy never answers for: they pass through untouched. The
    /// layer's state is found by key when a call fails, so a call that succeeds touches
    /// nothing shared.
    fallback: Option<(Key, Plan)>,
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, fallback: Option<(Key, Plan)>) -> Self {
        ResponseFuture { inner, fallback }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Value, Error>>,
{
    type Output = Result<Value, Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let error = match result {
            Err(error)
                if error.is_unavailable() || error.is_timeout() || error.is_circuit_open() =>
            {
                error
            }
            other => return Poll::Ready(other),
        };
        // Every service and the layer gone while the call ran (a shutdown): no policy to
        // apply any more, the error stands.
        let Some((plan, shared)) = this
            .fallback
            .take()
            .and_then(|(key, plan)| Some((plan, directory::find::<Shared>(key)?)))
        else {
            return Poll::Ready(Err(error));
        };
        match plan.answer(&shared.settings.policy, &error) {
            Some(value) => {
                shared.fell_back(plan.command(), &error);
                Poll::Ready(Ok(value))
            }
            None => Poll::Ready(Err(error)),
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("may_fall_back", &self.fallback.is_some())
            .finish_non_exhaustive()
    }
}

/// What a call answers if it fails, decided when it is made (from what is cheap to know
/// then) so a call that succeeds costs nothing more.
///
/// Kept small (16 bytes): every call's future holds one, and is moved by each layer above.
pub(super) enum Plan {
    /// A read: `Nil`, or one `Nil` per key, field, member or index asked for (`MGET`,
    /// `HMGET`, `SMISMEMBER`...; see [`nils_for`]): [`ONE_NIL`], or how many.
    Miss {
        command: &'static &'static str,
        nils: u32,
    },
    /// A write under [`FallbackPolicy::ReadsAndWrites`]: its configured reply.
    Write { command: &'static &'static str },
    /// Decided with the request in hand: any request under a custom policy, and a
    /// pipeline (each command answered as it would be alone: an `MGET` one `Nil` per
    /// key). Boxed: the common plans keep the future small. (A plan holding the
    /// pipeline's `Arc` instead, to save pipelines the allocation, cost every call that
    /// is answered at once ~20 ns more in `cargo bench --bench layers`: dropping it.)
    Request(Box<Request>),
}

impl Plan {
    /// `None` when the policy never answers for this request.
    #[inline(always)]
    pub(super) fn for_request(policy: &FallbackPolicy, request: &Request) -> Option<Plan> {
        let info = request.info();
        let command = info.name_ref();
        match (policy, request.cmd()) {
            (FallbackPolicy::ReadsOnly, _) if !info.is_read_only() => None,
            (FallbackPolicy::Custom(_), _) | (_, None) => {
                Some(Plan::Request(Box::new(request.clone())))
            }
            (_, Some(cmd)) if info.is_read_only() => Some(Plan::Miss {
                command,
                nils: nils_for(info, cmd).map_or(ONE_NIL, |n| {
                    u32::try_from(n).unwrap_or(u32::MAX).min(ONE_NIL - 1)
                }),
            }),
            (_, Some(_)) => Some(Plan::Write { command }),
        }
    }

    fn command(&self) -> &'static str {
        match self {
            Plan::Miss { command, .. } | Plan::Write { command } => command,
            Plan::Request(request) => request.info().name(),
        }
    }

    fn answer(&self, policy: &FallbackPolicy, error: &Error) -> Option<Value> {
        match (self, policy) {
            (Plan::Miss { nils, .. }, _) => {
                Some(miss((*nils != ONE_NIL).then_some(*nils as usize)))
            }
            (Plan::Write { .. }, FallbackPolicy::ReadsAndWrites(reply)) => Some(reply.clone()),
            (Plan::Request(request), FallbackPolicy::Custom(answer)) => answer(request, error),
            (Plan::Request(request), _) => request
                .pipeline()?
                .cmd_iter()
                .map(|cmd| {
                    let info = CommandInfo::of_cmd(cmd);
                    match policy {
                        _ if info.is_read_only() => Some(miss(nils_for(&info, cmd))),
                        FallbackPolicy::ReadsAndWrites(reply) => Some(reply.clone()),
                        _ => None,
                    }
                })
                .collect::<Option<Vec<_>>>()
                .map(Value::Array),
            _ => None,
        }
    }
}

/// [`Plan::Miss`]'s `nils` for a read that answers one `Nil`, not an array of them.
const ONE_NIL: u32 = u32::MAX;

/// What a read that missed answers: `Nil`, or `n` of them.
fn miss(nils: Option<usize>) -> Value {
    match nils {
        None => Value::Nil,
        Some(n) => Value::Array(vec![Value::Nil; n]),
    }
}

/// For a read whose reply has one slot per key or field asked for, how many: a miss
/// then answers that many `Nil`s, so `Vec<Option<T>>` keeps its length.
#[inline(always)]
fn nils_for(info: &CommandInfo, cmd: &Cmd) -> Option<usize> {
    let skip = match info.name() {
        "MGET" => 1,
        // Their key (JSON.MGET: its path, the last argument) is not asked for.
        "HMGET" | "ARMGET" | "JSON.MGET" | "SMISMEMBER" | "ZMSCORE" | "GEOPOS" | "GEOHASH" => 2,
        // `HTTL key FIELDS 2 a b`: a slot per field.
        "HTTL" | "HPTTL" | "HEXPIRETIME" | "HPEXPIRETIME" => 4,
        _ => return None,
    };
    let args = cmd
        .args_iter()
        .filter(|arg| matches!(arg, Arg::Simple(_)))
        .count();
    Some(args.saturating_sub(skip))
}
