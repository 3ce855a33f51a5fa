//! What the cluster says its nodes are (`CLUSTER NODES`), and following a failover that
//! redis-rs's cluster client would not see.
//!
//! redis-rs reads its map of the slots again when a node answers `MOVED` (or a request
//! finds no connection), never because requests go unanswered. A master that stalls (a
//! paused or hung process, a network that drops its packets) answers nothing, so after
//! the cluster has failed it over (after `cluster-node-timeout`), the client went on
//! sending its slots' requests to it, and every one of them timed out, for as long as it
//! stalled (measured: 5.5 s after the failover, not one served; for good, were it never
//! to answer again). Here, a request that goes unanswered (dropped at its deadline) has
//! the cluster asked, at most one check at a time and one every [`CHECK_EVERY`], which
//! master serves the slot of the request's key, and redis-rs where it routes that slot.
//! If there no node answers, or another node than the master, while the master answers
//! by its address, redis-rs's map is out of date: a read of a key of that master's
//! slots sent to another node gets a `MOVED`, which makes redis-rs read its map again.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use redis::{
    Cmd, Pipeline, Value,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr},
};
use tokio::time::Instant;

use super::replicas::{key_of, slot_of, slot_of_pipeline};

/// A node's host (as `CLUSTER NODES` gives it) and port.
pub(super) type Address = (String, u16);

/// How long one node is given to answer a question of this module's (a millisecond or two
/// when it is well), so that asking a stalled one holds up little.
pub(super) const QUESTION_TIMEOUT: Duration = Duration::from_millis(30);

/// How many nodes are asked for `CLUSTER NODES` at most, when one does not answer.
pub(super) const SOURCES: usize = 3;

/// How long after a check the next may begin: while a master stalls, before the cluster
/// has failed it over, each check finds nothing to do.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// One line of `CLUSTER NODES`: `<id> <ip:port@bus[,hostname]> <flags> <master id> <ping>
/// <pong> <epoch> <link> <slot ranges...>`.
pub(super) struct Node {
    pub(super) id: String,
    /// `None` for a node Redis has no address for (`:0@0`).
    pub(super) address: Option<Address>,
    /// Its master's id, for a replica.
    pub(super) master: Option<String>,
    /// Neither flagged failed nor without an address.
    pub(super) usable: bool,
    /// The ranges of slots it serves, first and last.
    pub(super) ranges: Vec<(u16, u16)>,
}

/// The nodes in a `CLUSTER NODES` reply; `None` if it is not one.
pub(super) fn parse(reply: &Value) -> Option<Vec<Node>> {
    let text = match reply {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?,
        Value::VerbatimString { text, .. } => text.as_str(),
        Value::SimpleString(text) => text.as_str(),
        _ => return None,
    };
    let nodes = text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = *fields.get(2)?;
        let ranges = fields
            .iter()
            .skip(8)
            // `[slot->-id]`: a slot migrating.
            .filter(|range| !range.starts_with('['))
            .filter_map(|range| match range.split_once('-') {
                Some((first, last)) => Some((first.parse().ok()?, last.parse().ok()?)),
                None => range.parse().ok().map(|slot| (slot, slot)),
            })
            .collect();
        Some(Node {
            id: (*fields.first()?).to_owned(),
            address: address(fields.get(1)?),
            master: flags
                .contains("slave")
                .then(|| fields.get(3).map(|id| (*id).to_owned()))
                .flatten(),
            usable: !flags.contains("fail") && !flags.contains("noaddr"),
            ranges,
        })
    });
    Some(nodes.collect())
}

/// A node's address in `CLUSTER NODES` (`127.0.0.1:7001@17001,hostname`); `None` for one
/// Redis has none for (`:0@0`, or no host).
pub(super) fn address(field: &str) -> Option<Address> {
    let (host, port) = field.split(['@', ',']).next()?.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    (!host.is_empty() && port != 0).then(|| (host.to_owned(), port))
}

/// `CLUSTER NODES` from a node picked at random, if it answers within
/// [`QUESTION_TIMEOUT`].
pub(super) async fn ask_a_node(connection: &mut ClusterConnection) -> Option<Vec<Node>> {
    let asked = connection.route_command(
        redis::cmd("CLUSTER").arg("NODES").clone(),
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
    );
    let reply = tokio::time::timeout(QUESTION_TIMEOUT, asked)
        .await
        .ok()?
        .ok()?;
    parse(&reply)
}

/// `CLUSTER NODES` from a node, or from another if it does not answer (up to
/// [`SOURCES`]).
async fn ask_nodes(connection: &mut ClusterConnection) -> Option<Vec<Node>> {
    for _ in 0..SOURCES {
        if let Some(nodes) = ask_a_node(connection).await {
            return Some(nodes);
        }
    }
    None
}

/// One cluster connection's checks that redis-rs routes a slot to the master the cluster
/// names for it, made when a request for the slot goes unanswered.
pub(crate) struct Topology {
    connection: ClusterConnection,
    /// Set while a check runs.
    checking: AtomicBool,
    /// When the last check ended.
    checked: Mutex<Option<Instant>>,
}

impl Topology {
    pub(crate) fn new(connection: ClusterConnection) -> Arc<Self> {
        Arc::new(Topology {
            connection,
            checking: AtomicBool::new(false),
            checked: Mutex::new(None),
        })
    }

    /// A request for `slot` went unanswered: checks its routing in the background,
    /// unless a check runs or ended less than [`CHECK_EVERY`] ago (or there is no
    /// runtime to run one).
    fn unanswered(self: &Arc<Self>, slot: u16) {
        let recent = self
            .checked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < CHECK_EVERY);
        if recent {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.checking.swap(true, Relaxed) {
            return;
        }
        let this = Arc::clone(self);
        runtime.spawn(async move {
            this.check(slot).await;
            *this.checked.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            this.checking.store(false, Relaxed);
        });
    }

    /// Whether redis-rs routes `slot` where no node answers, or to another node than the
    /// master the cluster names for it, while that master answers: then has redis-rs
    /// read its map again.
    async fn check(&self, slot: u16) {
        let mut connection = self.connection.clone();
        let Some(nodes) = ask_nodes(&mut connection).await else {
            return;
        };
        let serves = |node: &&Node| {
            node.ranges
                .iter()
                .any(|&(first, last)| (first..=last).contains(&slot))
        };
        let Some(master) = nodes
            .iter()
            .filter(|node| node.usable && node.master.is_none())
            .find(serves)
        else {
            return;
        };
        let (Some((host, port)), Some(routed_slot)) = (&master.address, Slot::new(slot)) else {
            return;
        };
        let routed =
            SingleNodeRoutingInfo::SpecificNode(Route::with_slot(routed_slot, SlotAddr::Master));
        if answers_as(&mut connection, routed, &master.id).await {
            return;
        }
        let direct = SingleNodeRoutingInfo::ByAddress {
            host: host.clone(),
            port: *port,
        };
        if answers_as(&mut connection, direct, &master.id).await {
            tracing::warn!(
                master = %format_args!("{host}:{port}"),
                slot,
                "redis cluster: the client's map of the slots is out of date (a failover, most likely); reading it again"
            );
            moved(&mut connection, &nodes, master).await;
        }
    }
}

/// A request a [`Topology`] is told of if it is dropped unanswered.
pub(super) enum Request<'a> {
    Command(&'a Cmd),
    Pipeline(&'a Pipeline),
}

/// Tells a [`Topology`] when the request it was made for is dropped unanswered (at its
/// deadline, most likely), with the slot of its key.
pub(super) struct Unanswered<'a> {
    topology: Option<&'a Arc<Topology>>,
    request: Request<'a>,
}

impl<'a> Unanswered<'a> {
    pub(super) fn new(topology: &'a Arc<Topology>, request: Request<'a>) -> Self {
        Unanswered {
            topology: Some(topology),
            request,
        }
    }

    /// The request was answered (an error is an answer).
    pub(super) fn answered(mut self) {
        self.topology = None;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let Some(topology) = self.topology else {
            return;
        };
        let slot = match self.request {
            Request::Command(cmd) => key_of(cmd).map(slot_of),
            Request::Pipeline(pipeline) => slot_of_pipeline(pipeline),
        };
        if let Some(slot) = slot {
            topology.unanswered(slot);
        }
    }
}

/// Whether the node `to` leads to answers `CLUSTER MYID` with `id` within
/// [`QUESTION_TIMEOUT`].
async fn answers_as(
    connection: &mut ClusterConnection,
    to: SingleNodeRoutingInfo,
    id: &str,
) -> bool {
    let asked = connection.route_command(
        redis::cmd("CLUSTER").arg("MYID").clone(),
        RoutingInfo::SingleNode(to),
    );
    match tokio::time::timeout(QUESTION_TIMEOUT, asked).await {
        Ok(Ok(Value::BulkString(answer))) => answer == id.as_bytes(),
        Ok(Ok(Value::SimpleString(answer))) => answer == id,
        Ok(Ok(Value::VerbatimString { text, .. })) => text == id,
        _ => false,
    }
}

/// Sends a read of a key of a slot `master` serves to another node the cluster names: its
/// `MOVED` makes redis-rs read its map of the slots again. A read: it changes nothing,
/// whatever the node.
async fn moved(connection: &mut ClusterConnection, nodes: &[Node], master: &Node) {
    // Another master first: it serves slots of its own, and redirects the rest.
    let others = || {
        nodes
            .iter()
            .filter(|node| node.usable && node.id != master.id)
    };
    let Some((host, port)) = others()
        .filter(|node| node.master.is_none() && !node.ranges.is_empty())
        .chain(others())
        .find_map(|node| node.address.clone())
    else {
        return;
    };
    // A key of one of its slots: a few tries for a master with a share of the slots,
    // ~16,000 (a millisecond) for one with a single slot.
    let serves = |key: &String| {
        let slot = slot_of(key.as_bytes());
        master
            .ranges
            .iter()
            .any(|&(first, last)| (first..=last).contains(&slot))
    };
    let Some(key) = (0..1_000_000u32)
        .map(|n| format!("failover-check-{n}"))
        .find(serves)
    else {
        return;
    };
    let exists = redis::cmd("EXISTS").arg(key).clone();
    let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
    let _ = tokio::time::timeout(QUESTION_TIMEOUT, connection.route_command(exists, to)).await;
}
