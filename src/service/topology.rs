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
//!
//! A master that is gone (its process dead, or its host) is the other way round:
//! redis-rs has no connection to it, so it sends its slots' requests to another node,
//! whose `MOVED` names the master, and reads its map again, trying to connect to the
//! master meanwhile while every other request waits: one refresh and one connect per
//! request. Here, the master a `MOVED` names is tried (a TCP connect, in a task of its
//! own, given the time redis-rs's client gives a node): if it cannot be reached, the
//! requests for its slots are answered at once, unsent (those of the slots the `MOVED`s
//! named at once, then all the cluster's view gives it, asked meanwhile), until it can
//! be (tried at a pace) or the cluster names another master for them (asked every
//! [`CHECK_EVERY`]). See [`Topology::gone`].
//!
//! A master that stalls (paused, hung) accepts connections and answers nothing: redis-rs
//! sends its slots' requests to it, and each waited out its deadline. When one goes
//! unanswered, the check above asks the master itself, past redis-rs's client (which may
//! hold requests up while it reads its map), with an inline `PING` on a TCP connection
//! of our own: one that does not react within [`STALL_PATIENCE`] is taken for stalled,
//! and its slots' requests are answered at once the same way until it reacts again or
//! the cluster names another master for them. See [`Topology::stalled`].

use std::{
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use redis::{
    Cmd, Pipeline, RedisError, Value,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr},
};
use tokio::time::Instant;

use super::{
    ClusterConnection,
    redirect::{self, FIRST_PAUSE, LONGEST_PAUSE, Redirect, Unlisted},
    replicas::{key_of, slot_of, slot_of_pipeline},
};

/// A node's host (as `CLUSTER NODES` gives it) and port.
pub(super) type Address = (String, u16);

/// How long one node is given to answer a question of this module's (a millisecond or two
/// when it is well), so that asking a stalled one holds up little.
pub(super) const QUESTION_TIMEOUT: Duration = Duration::from_millis(30);

/// How many nodes are asked for `CLUSTER NODES` at most, when one does not answer.
pub(super) const SOURCES: usize = 3;

/// How many nodes a health check asks at once for `CLUSTER NODES`: the masters of slots
/// spread evenly, so each of a cluster's first few masters is asked.
const HEALTH_SOURCES: usize = 8;

/// How long after a check the next may begin: while a master stalls, before the cluster
/// has failed it over, each check finds nothing to do.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// How long a master whose slot's request went unanswered, and which did not answer a
/// question at once, is given to answer before it is taken for stalled: far beyond a
/// healthy node's answer, and long enough that a slow one (a long command, a fork) is
/// not.
const STALL_PATIENCE: Duration = Duration::from_millis(250);

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
    ask(connection, SingleNodeRoutingInfo::Random, QUESTION_TIMEOUT).await
}

/// `CLUSTER NODES` from the node `to` leads to, if it answers within `limit`.
async fn ask(
    connection: &mut ClusterConnection,
    to: SingleNodeRoutingInfo,
    limit: Duration,
) -> Option<Vec<Node>> {
    let asked = connection.route_command(
        redis::cmd("CLUSTER").arg("NODES").clone(),
        RoutingInfo::SingleNode(to),
    );
    let reply = tokio::time::timeout(limit, asked).await.ok()?.ok()?;
    parse(&reply)
}

/// `CLUSTER NODES` from a node picked at random, or from another if it does not answer
/// within `limit` (up to [`SOURCES`]).
async fn ask_nodes_within(
    connection: &mut ClusterConnection,
    limit: Duration,
) -> Option<Vec<Node>> {
    for _ in 0..SOURCES {
        if let Some(nodes) = ask(connection, SingleNodeRoutingInfo::Random, limit).await {
            return Some(nodes);
        }
    }
    None
}

/// One cluster connection's checks that redis-rs routes a slot to the master the cluster
/// names for it, made when a request for the slot goes unanswered; and the masters it
/// cannot reach, whose slots' requests are answered at once.
pub(crate) struct Topology {
    connection: ClusterConnection,
    /// Connections of our own to nodes, to ask the cluster's view past redis-rs's client.
    unlisted: Arc<Unlisted>,
    /// Masters to ask it of that way: the connector's nodes, then the masters of the last
    /// view read.
    seen: Mutex<Vec<Address>>,
    /// Set while a check runs.
    checking: AtomicBool,
    /// When the last check ended.
    checked: Mutex<Option<Instant>>,
    /// The connect timeout: a master named by a `MOVED` is given a quarter of it to
    /// accept a connection ([`node_timeout`](crate::connect::node_timeout)).
    connect_timeout: Duration,
    /// The masters `MOVED`s named: at most one entry per node, and none unless a master
    /// went or the client's map was out of date.
    named: Mutex<Vec<Named>>,
    /// Whether one of `named` is [gone](Named::gone): all a request reads otherwise.
    any_gone: AtomicBool,
    /// Counts the masters found gone or stalled (fenced off: their slots' requests
    /// answered at once, unsent), for `Reconnect` to tell the breaker: the calls that
    /// failed on such a master before it was fenced off say nothing of the others.
    fenced: tokio::sync::watch::Sender<u64>,
}

/// What a health check found of a cluster's masters: [`Topology::health`].
pub(crate) struct MastersHealth {
    /// How long the slowest master that answered took; `None` if none did.
    pub(crate) slowest: Option<Duration>,
    /// The masters (`host:port`) that did not answer in time, or that redis-rs's
    /// routing of their slots does not reach (it has no connection to them, or its map
    /// is out of date).
    pub(crate) silent: Vec<String>,
}

/// A master a `MOVED` named (the cluster's master for a request's slot), while it is
/// tried.
struct Named {
    node: Address,
    /// Its slots: those of the `MOVED`s that named it, and those the cluster gives it.
    ranges: Vec<(u16, u16)>,
    /// It could not be reached: the requests for its slots are answered at once, unsent,
    /// until it can be or the cluster names another master for them.
    gone: bool,
    /// It was found stalled (it does not answer), rather than unreachable.
    stalled: bool,
    /// A task tries it.
    watched: bool,
    /// When it is tried again.
    next_try: Instant,
}

impl Topology {
    pub(crate) fn new(
        connection: ClusterConnection,
        connect_timeout: Duration,
        unlisted: Arc<Unlisted>,
        seeds: Vec<Address>,
    ) -> Arc<Self> {
        Arc::new(Topology {
            connection,
            unlisted,
            seen: Mutex::new(seeds),
            checking: AtomicBool::new(false),
            checked: Mutex::new(None),
            connect_timeout,
            named: Mutex::new(Vec::new()),
            any_gone: AtomicBool::new(false),
            fenced: tokio::sync::watch::Sender::new(0),
        })
    }

    /// `CLUSTER NODES` from a node, asked through redis-rs's client, each node within
    /// `patience`; and, if it has not answered within [`QUESTION_TIMEOUT`], of the
    /// masters last seen but `except` too, one after another, on connections of our own:
    /// the first answer. redis-rs's client sends no request while it reads its map of
    /// the slots, and a `MOVED` for a slot of a master it cannot reach has it read the
    /// map again, trying the master for a while: while such requests go out, it rarely
    /// answers in time. Remembers the masters of the view read.
    async fn ask_nodes_surely(
        &self,
        except: Option<&Address>,
        patience: Duration,
    ) -> Option<Vec<Node>> {
        let mut connection = self.connection.clone();
        let through = ask_nodes_within(&mut connection, patience);
        tokio::pin!(through);
        let nodes = tokio::select! {
            biased;
            nodes = &mut through => nodes,
            () = tokio::time::sleep(QUESTION_TIMEOUT) => {
                let past = self.ask_past_redis_rs(except, patience);
                tokio::pin!(past);
                tokio::select! {
                    Some(nodes) = &mut through => Some(nodes),
                    Some(nodes) = &mut past => Some(nodes),
                    else => None,
                }
            }
        };
        if let Some(nodes) = &nodes {
            let masters = nodes
                .iter()
                .filter(|node| node.usable && node.master.is_none() && !node.ranges.is_empty())
                .filter_map(|node| node.address.clone());
            *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = masters.collect();
        }
        nodes
    }

    /// `CLUSTER NODES` from a master last seen but `except`, or from another if it does
    /// not answer within `patience` (up to [`SOURCES`]), on connections of our own.
    async fn ask_past_redis_rs(
        &self,
        except: Option<&Address>,
        patience: Duration,
    ) -> Option<Vec<Node>> {
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let cmd = redis::cmd("CLUSTER").arg("NODES").clone();
        let others = seen.into_iter().filter(|seen| Some(seen) != except);
        for (host, port) in others.take(SOURCES) {
            let to = redirect::Node::new(host, port);
            let asked = self.unlisted.ask(&to, &cmd, patience).await;
            if let Some(nodes) = asked.as_ref().and_then(parse) {
                return Some(nodes);
            }
        }
        None
    }

    /// How long a node is given to answer a question asked in the background, where
    /// waiting holds up no request: redis-rs's client holds requests up while it reads
    /// its map of the slots, trying a node that cannot be reached for a while.
    fn patience(&self) -> Duration {
        (self.connect_timeout / SOURCES as u32).max(QUESTION_TIMEOUT)
    }

    /// Counts the masters found gone or stalled, as they are.
    pub(crate) fn fences(&self) -> tokio::sync::watch::Receiver<u64> {
        self.fenced.subscribe()
    }

    /// A master was just found gone or stalled.
    fn fence(&self) {
        self.fenced
            .send_modify(|fences| *fences = fences.wrapping_add(1));
    }

    /// The answer, at once and unsent, for a request of `slot` (asked for only while a
    /// master is gone) if its master could not be reached: unavailable, not run, not
    /// resent, and not counted by the breaker.
    ///
    /// redis-rs's client has no connection to such a master, so it sends the request to
    /// another node, whose `MOVED` makes it read its map of the slots again and connect to
    /// every node in it, the gone master too, while every other request waits (its lock).
    /// One request in, one `CLUSTER SLOTS` and one connect out: ~1,400 a second of each
    /// for 4 callers of a dead master's keys (measured), to the same answer; and where the
    /// master's host is gone, not refusing, every request of every node waited out the
    /// connect timeout.
    pub(super) fn gone(&self, slot: impl FnOnce() -> Option<u16>) -> Option<RedisError> {
        if !self.any_gone.load(Relaxed) {
            return None;
        }
        let slot = slot()?;
        let named = self.named();
        let master = named
            .iter()
            .find(|named| named.gone && covers(&named.ranges, slot))?;
        let (host, port) = &master.node;
        let node = format!("{host}:{port}");
        let next_try = master.next_try.saturating_duration_since(Instant::now());
        Some(crate::Error::master_gone(slot, &node, master.stalled, next_try).into())
    }

    /// A request met `moved`, a `MOVED` from the node redis-rs's client sent it to: the
    /// node named is tried, in a task of its own, unless it is already, or answered less
    /// than [`FIRST_PAUSE`] ago (a `MOVED` after a failover names a master that answers;
    /// one whose master is gone is sent by redis-rs's client to another node because it
    /// has no connection to that master).
    pub(super) fn moved(self: &Arc<Self>, moved: &Redirect) {
        let (node, slot) = moved.to();
        let mut named = self.named();
        let known = entry(&mut named, &node);
        if !covers(&known.ranges, slot) {
            known.ranges.push((slot, slot));
        }
        if known.watched || known.next_try > Instant::now() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        known.watched = true;
        drop(named);
        runtime.spawn(watch(Arc::downgrade(self), node, Try::Connect));
    }

    /// The masters that cannot be reached, as `host:port`.
    pub(crate) fn gone_masters(&self) -> Vec<String> {
        if !self.any_gone.load(Relaxed) {
            return Vec::new();
        }
        let named = self.named();
        let gone = named.iter().filter(|named| named.gone);
        gone.map(|named| format!("{}:{}", named.node.0, named.node.1))
            .collect()
    }

    /// Asks each master the cluster names for who it is (`CLUSTER MYID`, routed as
    /// redis-rs routes one of its slots, the masters known gone left out), all at once,
    /// each within `limit`: a health check. redis-rs sends a `PING` to every master and
    /// answers when all have, so one stalled master failed the whole check (a client
    /// reported down while two masters of three served), and one redis-rs has no
    /// connection to was left out unsaid. `None` when no node gives the cluster's view of
    /// its nodes within half of `limit` (asked of the masters of [`HEALTH_SOURCES`] slots
    /// spread evenly, at once: one may be the stalled one; redis-rs's client may hold
    /// them up a moment while it reads its map of the slots).
    pub(crate) async fn health(&self, limit: Duration) -> Option<MastersHealth> {
        let connection = self.connection.clone();
        let patience = QUESTION_TIMEOUT.max(limit / 2);
        let mut sources = tokio::task::JoinSet::new();
        let spread =
            (0..HEALTH_SOURCES).filter_map(|n| Slot::new((n * 16384 / HEALTH_SOURCES) as u16));
        for slot in spread {
            let mut connection = connection.clone();
            sources.spawn(async move { ask(&mut connection, master_of(slot), patience).await });
        }
        let mut nodes = None;
        while let Some(asked) = sources.join_next().await {
            if let Ok(Some(answer)) = asked {
                nodes = Some(answer);
                break;
            }
        }
        drop(sources);
        let nodes = nodes?;
        let gone = self.gone_masters();
        let mut asks = tokio::task::JoinSet::new();
        for master in nodes.into_iter().filter(|node| node.master.is_none()) {
            let (Some((host, port)), Some(slot)) = (
                &master.address,
                master
                    .ranges
                    .first()
                    .and_then(|&(first, _)| Slot::new(first)),
            ) else {
                continue;
            };
            let named = format!("{host}:{port}");
            if gone.contains(&named) {
                continue;
            }
            let mut connection = connection.clone();
            asks.spawn(async move {
                let started = Instant::now();
                let to = master_of(slot);
                let answered = answers_as(&mut connection, to, &master.id, limit).await;
                (named, answered.then(|| started.elapsed()))
            });
        }
        let mut health = MastersHealth {
            slowest: None,
            silent: Vec::new(),
        };
        while let Some(asked) = asks.join_next().await {
            match asked {
                Ok((_, Some(took))) => health.slowest = health.slowest.max(Some(took)),
                Ok((named, None)) => health.silent.push(named),
                Err(_) => {}
            }
        }
        health.silent.sort();
        Some(health)
    }

    fn named(&self) -> MutexGuard<'_, Vec<Named>> {
        self.named.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `node` accepted a connection, or another master serves its slots: requests for
    /// them go out again, and it is tried again only for a `MOVED` at least
    /// [`FIRST_PAUSE`] from now.
    fn reached(&self, node: &Address) {
        let mut named = self.named();
        let Some(known) = named.iter_mut().find(|named| named.node == *node) else {
            return;
        };
        let was_gone = known.gone;
        *known = Named::new(node.clone(), Instant::now() + FIRST_PAUSE);
        self.any_gone
            .store(named.iter().any(|named| named.gone), Relaxed);
        drop(named);
        if was_gone {
            tracing::info!(
                master = %format_args!("{}:{}", node.0, node.1),
                "redis cluster: a master that could not be reached can be, or its slots are served by another; requests for them go out again"
            );
        }
    }

    /// The task that tried `node` ended: when it ended on its own, it left the node
    /// reached (this changes nothing); when it was dropped, the node's slots' requests go
    /// out again, and the next `MOVED` that names it has it tried anew.
    fn unwatched(&self, node: &Address) {
        let mut named = self.named();
        if let Some(known) = named.iter_mut().find(|named| named.node == *node) {
            known.watched = false;
            known.gone = false;
            known.stalled = false;
        }
        self.any_gone
            .store(named.iter().any(|named| named.gone), Relaxed);
    }

    /// `node` could not be reached: unless `nodes` (the cluster's view, if a node gave
    /// it) has another master serve its slots, it is gone, with every slot the cluster
    /// gives it. Whether it is still tried.
    fn unreached(&self, node: &Address, nodes: Option<&[Node]>, next_try: Instant) -> bool {
        let mut named = self.named();
        let Some(at) = named.iter().position(|named| named.node == *node) else {
            return false;
        };
        let mut grew = false;
        if let Some(nodes) = nodes {
            let elsewhere = nodes.iter().any(|other| {
                other.usable
                    && other.master.is_none()
                    && other.address.as_ref() != Some(node)
                    && other.ranges.iter().any(|&(first, last)| {
                        named[at]
                            .ranges
                            .iter()
                            .any(|&(from, to)| first <= to && from <= last)
                    })
            });
            if elsewhere {
                drop(named);
                self.reached(node);
                return false;
            }
            if let Some(master) = nodes
                .iter()
                .find(|listed| listed.master.is_none() && listed.address.as_ref() == Some(node))
            {
                for &range in &master.ranges {
                    if !named[at].ranges.contains(&range) {
                        named[at].ranges.push(range);
                        grew = true;
                    }
                }
            }
        }
        let known = &mut named[at];
        known.next_try = next_try;
        let newly = !known.gone;
        if newly {
            known.gone = true;
            tracing::warn!(
                master = %format_args!("{}:{}", node.0, node.1),
                slots = count(&known.ranges),
                "redis cluster: a master cannot be reached; requests for its slots are answered at once, not sent, until it can be or the cluster fails it over"
            );
        }
        self.any_gone.store(true, Relaxed);
        drop(named);
        // Its slots' calls that failed so far, the newly fenced ones' too, say nothing of
        // the other masters.
        if newly || grew {
            self.fence();
        }
        true
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
    async fn check(self: &Arc<Self>, slot: u16) {
        let mut connection = self.connection.clone();
        let Some(nodes) = self.ask_nodes_surely(None, self.patience()).await else {
            return;
        };
        let serves = |node: &&Node| {
            node.ranges
                .iter()
                .any(|&(first, last)| (first..=last).contains(&slot))
        };
        // A master the nodes deem failing (`fail?`) is one that stalls too.
        let Some(master) = nodes
            .iter()
            .filter(|node| node.master.is_none())
            .filter(serves)
            .max_by_key(|node| node.usable)
        else {
            return;
        };
        let (Some((host, port)), Some(routed_slot)) = (&master.address, Slot::new(slot)) else {
            return;
        };
        if answers_as(
            &mut connection,
            master_of(routed_slot),
            &master.id,
            QUESTION_TIMEOUT,
        )
        .await
        {
            return;
        }
        let direct = SingleNodeRoutingInfo::ByAddress {
            host: host.clone(),
            port: *port,
        };
        if answers_as(&mut connection, direct, &master.id, QUESTION_TIMEOUT).await {
            tracing::warn!(
                master = %format_args!("{host}:{port}"),
                slot,
                "redis cluster: the client's map of the slots is out of date (a failover, most likely); reading it again"
            );
            moved(&mut connection, &nodes, master).await;
            return;
        }
        // Neither answered at once: the master is slow or stalled, or redis-rs's client
        // holds its requests up (while it reads its map of the slots). Asked on a
        // connection of our own, and given longer, all but a stalled one answer.
        if reacts(&(host.clone(), *port), STALL_PATIENCE).await {
            return;
        }
        self.stalled(master);
    }

    /// `master`, whose slots' request went unanswered, does not answer: its slots'
    /// requests are answered at once, unsent, until it answers again or the cluster
    /// names another master for them (it fails it over), asked every [`CHECK_EVERY`].
    /// Without it, every request to its slots waited out its deadline until the failover
    /// (`cluster-node-timeout`, 15 s by default), and a caller that reads keys of every
    /// master one after another spent most of its time waiting there (measured: 8 such
    /// callers, one master of three paused for 3 s, 189 reads of the others' keys served).
    fn stalled(self: &Arc<Self>, master: &Node) {
        let (Some(node), Ok(runtime)) = (
            master.address.clone(),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        let mut named = self.named();
        let known = entry(&mut named, &node);
        if known.watched {
            return;
        }
        known.ranges.clone_from(&master.ranges);
        known.gone = true;
        known.stalled = true;
        known.watched = true;
        known.next_try = Instant::now() + CHECK_EVERY;
        let slots = count(&known.ranges);
        self.any_gone.store(true, Relaxed);
        drop(named);
        self.fence();
        tracing::warn!(
            master = %format_args!("{}:{}", node.0, node.1),
            slots,
            "redis cluster: a master does not answer; requests for its slots are answered at once, not sent, until it answers or the cluster fails it over"
        );
        runtime.spawn(watch(Arc::downgrade(self), node, Try::Ping));
    }
}

/// How a node is tried, in [`watch`].
#[derive(Clone, Copy)]
enum Try {
    /// Named by a `MOVED`: whether it [accepts](accepts) a connection, at once, then
    /// 100 ms later, doubling to 1 s, as a node a redirect names is connected to.
    Connect,
    /// Found [stalled](Topology::stalled): whether it [reacts](reacts), 250 ms later,
    /// then at intervals doubling to 1 s. Each try leaves a connection in a stalled
    /// process's backlog until it runs again: a fleet of clients must not fill it.
    Ping,
}

/// Tries `node` in the background, `how` says: no longer tried, nor [gone](Named::gone),
/// once it answers; else gone, until it answers or the cluster, asked every
/// [`CHECK_EVERY`], names another master for its slots (a failover). Ends with the
/// connection.
async fn watch(topology: Weak<Topology>, node: Address, how: Try) {
    let _watching = Watching {
        topology: topology.clone(),
        node: node.clone(),
    };
    let (mut pause, mut next_try) = match how {
        Try::Connect => (FIRST_PAUSE, Instant::now()),
        Try::Ping => (CHECK_EVERY, Instant::now() + CHECK_EVERY),
    };
    loop {
        let Some(this) = topology.upgrade() else {
            return;
        };
        let timeout = this.connect_timeout;
        // The cluster's view, asked while the node is tried: all of its slots are then
        // fenced off soon after it is found gone, where those of the `MOVED`s alone left
        // the others' requests sent, each `MOVED` making redis-rs read its map again,
        // trying the node for a while, every other request waiting (measured under load:
        // 10 reads of the others' keys served in 3 s). Asked patiently: redis-rs's client
        // holds requests up while it reads its map, and this task holds up no one.
        let ask = this.ask_nodes_surely(Some(&node), this.patience());
        let nodes = if Instant::now() >= next_try {
            let tried = async {
                match how {
                    Try::Connect => accepts(&node, crate::connect::node_timeout(timeout)).await,
                    Try::Ping => reacts(&node, STALL_PATIENCE).await,
                }
            };
            tokio::pin!(tried, ask);
            let mut nodes = None;
            let answered = loop {
                tokio::select! {
                    answered = &mut tried => break answered,
                    asked = &mut ask, if nodes.is_none() => nodes = Some(asked),
                }
            };
            if answered {
                this.reached(&node);
                return;
            }
            next_try = Instant::now() + pause;
            pause = (pause * 2).min(LONGEST_PAUSE);
            match nodes {
                Some(nodes) => nodes,
                // Fenced off at once by the slots known so far; the view adds the rest.
                None if this.unreached(&node, None, next_try) => ask.await,
                None => return,
            }
        } else {
            ask.await
        };
        if !this.unreached(&node, nodes.as_deref(), next_try) {
            return;
        }
        drop(this);
        tokio::time::sleep_until(next_try.min(Instant::now() + CHECK_EVERY)).await;
    }
}

/// Held by the task that tries a node: however the task ends (with the runtime it ran
/// on, too), the node is no longer tried, nor taken for gone, until a `MOVED` names it
/// again. Otherwise, dropped with a runtime that shut down, it left the node's slots'
/// requests answered at once, unsent, for good.
struct Watching {
    topology: Weak<Topology>,
    node: Address,
}

impl Drop for Watching {
    fn drop(&mut self) {
        if let Some(topology) = self.topology.upgrade() {
            topology.unwatched(&self.node);
        }
    }
}

/// Whether `node` accepts a TCP connection within `timeout`: refused at once by a host
/// whose Redis is gone, unanswered by a host that is gone.
async fn accepts((host, port): &Address, timeout: Duration) -> bool {
    let connect = tokio::net::TcpStream::connect((host.as_str(), *port));
    matches!(tokio::time::timeout(timeout, connect).await, Ok(Ok(_)))
}

/// Whether the process at `node` reacts, within `patience`, to an inline `PING` sent on a
/// TCP connection of our own, past redis-rs's client, which may hold requests up: any
/// reply (`+PONG`, `-NOAUTH`, a TLS alert), the connection closed or refused. Only a
/// stalled process (paused, hung) or a host gone does not.
async fn reacts((host, port): &Address, patience: Duration) -> bool {
    let probe = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
        stream.writable().await?;
        // Six bytes into an empty socket buffer: all of them or an error.
        stream.try_write(b"PING\r\n")?;
        loop {
            stream.readable().await?;
            match stream.try_read(&mut [0_u8; 1]) {
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                read => return read.map(drop),
            }
        }
    };
    tokio::time::timeout(patience, probe).await.is_ok()
}

impl Named {
    /// Known by no slot, neither gone nor tried, to be tried again from `next_try`.
    fn new(node: Address, next_try: Instant) -> Self {
        Named {
            node,
            ranges: Vec::new(),
            gone: false,
            stalled: false,
            watched: false,
            next_try,
        }
    }
}

/// `node`'s entry in `named`, made if there is none.
fn entry<'a>(named: &'a mut Vec<Named>, node: &Address) -> &'a mut Named {
    let at = match named.iter().position(|named| named.node == *node) {
        Some(at) => at,
        None => {
            named.push(Named::new(node.clone(), Instant::now()));
            named.len() - 1
        }
    };
    &mut named[at]
}

/// How many slots `ranges` holds (for logs: ranges may overlap).
fn count(ranges: &[(u16, u16)]) -> usize {
    ranges
        .iter()
        .map(|&(first, last)| usize::from(last - first) + 1)
        .sum()
}

/// Whether `ranges` holds `slot`.
fn covers(ranges: &[(u16, u16)], slot: u16) -> bool {
    ranges
        .iter()
        .any(|&(first, last)| (first..=last).contains(&slot))
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

/// Where redis-rs routes a request for `slot` to its master.
fn master_of(slot: Slot) -> SingleNodeRoutingInfo {
    SingleNodeRoutingInfo::SpecificNode(Route::with_slot(slot, SlotAddr::Master))
}

/// Whether the node `to` leads to answers `CLUSTER MYID` with `id` within `limit`.
async fn answers_as(
    connection: &mut ClusterConnection,
    to: SingleNodeRoutingInfo,
    id: &str,
    limit: Duration,
) -> bool {
    let asked = connection.route_command(
        redis::cmd("CLUSTER").arg("MYID").clone(),
        RoutingInfo::SingleNode(to),
    );
    match tokio::time::timeout(limit, asked).await {
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
