use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use pin_project::pin_project;
use redis::{Arg, Cmd, Pipeline, Value};

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
    /// A pipeline of reads, or under [`FallbackPolicy::ReadsAndWrites`] any pipeline: each
    /// command answered as it would be alone (an `MGET` one `Nil` per key), decided with
    /// the pipeline in hand (shared with the request: a reference count).
    Pipeline(Arc<Pipeline>),
    /// Any request under a custom policy: decided with the request in hand (boxed: the
    /// common plans keep the future small).
    Request(Box<Request>),
}

impl Plan {
    /// `None` when the policy never answers for this request.
    #[inline(always)]
    pub(super) fn for_request(policy: &FallbackPolicy, request: &Request) -> Option<Plan> {
        let info = request.info();
        match policy {
            FallbackPolicy::Custom(_) => Some(Plan::Request(Box::new(request.clone()))),
            FallbackPolicy::ReadsOnly if !info.is_read_only() => None,
            _ => match request.shared_pipeline() {
                Some(pipeline) => Some(Plan::Pipeline(Arc::clone(pipeline))),
                None if info.is_read_only() => Some(Plan::Miss {
                    command: info.name_ref(),
                    nils: request
                        .cmd()
                        .and_then(|cmd| nils_for(info, cmd))
                        .map_or(ONE_NIL, |n| {
                            u32::try_from(n).unwrap_or(u32::MAX).min(ONE_NIL - 1)
                        }),
                }),
                None => Some(Plan::Write {
                    command: info.name_ref(),
                }),
            },
        }
    }

    fn command(&self) -> &'static str {
        match self {
            Plan::Miss { command, .. } | Plan::Write { command } => command,
            Plan::Pipeline(pipeline) if pipeline.is_transaction() => crate::TRANSACTION,
            Plan::Pipeline(_) => crate::PIPELINE,
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
            (Plan::Pipeline(pipeline), _) => pipeline
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
