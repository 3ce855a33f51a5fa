use std::{collections::BTreeMap, time::Duration};

use super::ResilientClient;
use crate::{
    Error,
    circuit_breaker::{BreakerMetrics, BreakerState},
    metrics::{Latency, Outcome},
    reconnect::{ConnectionState, ReconnectStats},
};

/// How Redis looks from a [`ResilientClient`], for a health endpoint: the answer of
/// [`ResilientClient::health`]. With feature `serde` it is `Serialize`, durations in
/// milliseconds:
///
/// ```json
/// {"status":"up","address":"127.0.0.1:6379/0","connected_to":"127.0.0.1:6379/0",
///  "connection":"connected",
///  "reconnects":{"attempts":1,"successes":1,"failures":0},
///  "breaker":{"state":"closed","calls":4,"failed_calls":0,"slow_calls":0,
///             "failure_rate":null,"slow_call_rate":null},
///  "ping_ms":0.71,"ping_error":null,"unreachable":[],
///  "calls":{"total":4,"outcomes":{"cancelled":0,"circuit_open":0,"config_error":0,"ok":4,
///                                 "server_error":0,"timeout":0,"unavailable":0},
///           "fallbacks":0,
///           "latency":{"count":4,"mean_ms":0.58,"p50_ms":0.49,"p90_ms":0.80,
///                      "p99_ms":0.80,"max_ms":0.80}}}
/// ```
///
/// Whether a `down` Redis should fail the app's own readiness is the app's call: an app
/// that uses Redis as a cache keeps serving (reads fall back), so it usually should not.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Health {
    /// The summary.
    pub status: HealthStatus,
    /// Where the client connects (no credentials).
    pub address: String,
    /// Where the connection in use leads, if there is one (no credentials): for a
    /// [Sentinel connector](crate::Connector::sentinel), the master it found.
    pub connected_to: Option<String>,
    /// The connection state.
    pub connection: ConnectionState,
    /// Connection attempt counters.
    pub reconnects: ReconnectStats,
    /// The breaker's state and window, if the client has one.
    pub breaker: Option<BreakerMetrics>,
    /// How long a `PING` took, if it was answered in time. A reply that refuses the
    /// command (`NOPERM`, for an ACL user that may not run `PING`) is an answer: the
    /// server is up. For a cluster, how long the slowest master that answered took, if
    /// one did.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "ping_ms", serialize_with = "millis::option")
    )]
    pub ping: Option<Duration>,
    /// Why the `PING` failed, if it did.
    pub ping_error: Option<String>,
    /// The servers that cannot be reached, or do not answer, while the others serve (no
    /// credentials): a cluster's masters gone or stalled, whose slots' requests are
    /// answered at once, unsent, and those that did not answer the health check in time.
    /// Any makes the status [`Degraded`](HealthStatus::Degraded).
    pub unreachable: Vec<String>,
    /// What the metrics layer recorded, all commands together, if the client has one.
    pub calls: Option<CallSummary>,
}

/// The summary of a [`Health`] report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum HealthStatus {
    /// Connected, answering pings, and the breaker lets calls through.
    Up,
    /// Connected and answering pings, but some calls are being rejected: the breaker is
    /// open, half-open or forced open, or a cluster's master cannot be reached.
    Degraded,
    /// Not connected, or the `PING` failed: reads fall back, writes fail.
    Down,
}

/// The calls the metrics layer recorded since the client was built.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct CallSummary {
    /// Calls made.
    pub total: u64,
    /// Calls per outcome (`ok`, `timeout`...; `fallback` is counted apart).
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Failed calls a fallback answered.
    pub fallbacks: u64,
    /// Latency of every call.
    pub latency: Latency,
}

impl Health {
    /// The report, with the `PING`'s answer and the servers that did not answer it
    /// (a cluster's masters asked one by one).
    pub(super) fn new(
        client: &ResilientClient,
        ping: Result<Duration, Error>,
        silent: Vec<String>,
    ) -> Health {
        let connection = client.connection_state();
        let breaker = client.circuit_breaker().map(|breaker| breaker.metrics());
        let mut unreachable = client.unreachable();
        for server in silent {
            if !unreachable.contains(&server) {
                unreachable.push(server);
            }
        }
        let status = match (connection, &ping, breaker.map(|b| b.state)) {
            (
                ConnectionState::Connected,
                Ok(_),
                None | Some(BreakerState::Closed | BreakerState::Disabled),
            ) if unreachable.is_empty() => HealthStatus::Up,
            (ConnectionState::Connected, Ok(_), _) => HealthStatus::Degraded,
            _ => HealthStatus::Down,
        };
        let calls = client.metrics().map(|snapshot| {
            let overall = snapshot.overall;
            CallSummary {
                total: overall.calls(),
                outcomes: overall
                    .counts()
                    .filter(|(outcome, _)| *outcome != Outcome::Fallback)
                    .map(|(outcome, count)| (outcome.as_str(), count))
                    .collect(),
                fallbacks: overall.count(Outcome::Fallback),
                latency: overall.latency,
            }
        });
        Health {
            status,
            address: client.address().to_owned(),
            connected_to: client.connected_to(),
            connection,
            reconnects: client.reconnect_stats(),
            breaker,
            ping_error: ping.as_ref().err().map(ToString::to_string),
            ping: ping.ok(),
            unreachable,
            calls,
        }
    }
}

/// Durations as fractional milliseconds, for reports people read.
#[cfg(feature = "serde")]
pub(crate) mod millis {
    use std::time::Duration;

    use serde::Serializer;

    pub(crate) fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(value.as_secs_f64() * 1e3)
    }

    pub(crate) fn option<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => serialize(value, s),
            None => s.serialize_none(),
        }
    }
}
