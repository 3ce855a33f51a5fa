//! Finding the master through Redis Sentinel, and leaving it when Sentinel names another.
//!
//! Each connect asks every Sentinel at once where the master is and takes the first
//! answer, so a Sentinel that is down or stalled costs nothing while another answers; then
//! it connects there and checks with `ROLE` that the server is a master. While
//! connections are out, a small task listens for a Sentinel's `+switch-master`
//! announcement and also asks every `sentinel_check_interval`, in case one went unheard:
//! when Sentinel names another master (a failover), the connections to the old one are
//! retired. Requests they already sent get their replies; new ones are refused as not
//! sent, so `Reconnect` connects again (through Sentinel, to the new master) and `Retry`
//! sends them there. Without this, a client would go on writing to an old master that is
//! still up, until Sentinel turns it into a replica (about ten seconds later, in Redis 7),
//! and those writes would be lost.

use std::{
    future::{Future, poll_fn},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, Weak},
    task::Poll,
    time::Duration,
};

use futures_core::Stream;
use redis::{ConnectionAddr, ConnectionInfo, Value};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::{
    Error, Request,
    connect::{OwnTls, describe, open},
    service::{Driver, RedisService},
};

/// The Sentinels of one master, shared by the clones of a connector.
pub(crate) struct Sentinels {
    master_name: String,
    /// Connects to one of the master's replicas, not to the master.
    replicas: bool,
    nodes: Vec<Node>,
    /// How TLS connections to Sentinels and masters are opened.
    own_tls: OwnTls,
    /// Connections opened to a master, to retire when Sentinel names another.
    handed_out: Mutex<Vec<HandedOut>>,
    /// The task that asks where the master is while connections are out.
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Node {
    info: ConnectionInfo,
    display: Arc<str>,
    /// A connection kept between questions. Taken out while a question is asked and put
    /// back only once answered, so a stalled Sentinel's connection is not asked again.
    connection: Mutex<Option<RedisService>>,
}

struct HandedOut {
    master: (String, u16),
    driver: Weak<Driver>,
}

impl Sentinels {
    pub(crate) fn new(
        nodes: Vec<ConnectionInfo>,
        master_name: &str,
        own_tls: OwnTls,
    ) -> Result<Self, Error> {
        if nodes.is_empty() {
            return Err(Error::config(
                "a Sentinel connector needs at least one Sentinel",
            ));
        }
        Ok(Sentinels {
            master_name: master_name.to_owned(),
            replicas: false,
            own_tls,
            nodes: nodes
                .into_iter()
                .map(|info| Node {
                    display: describe(&info).into(),
                    info,
                    connection: Mutex::new(None),
                })
                .collect(),
            handed_out: Mutex::new(Vec::new()),
            watcher: Mutex::new(None),
        })
    }

    pub(crate) fn master_name(&self) -> &str {
        &self.master_name
    }

    /// The same Sentinels, asked for one of the master's replicas instead.
    pub(crate) fn for_replicas(mut self) -> Self {
        self.replicas = true;
        self
    }

    /// The same Sentinels, each one's connection details changed by `change`, opening TLS
    /// connections with `own_tls`: for a connector being configured, before it connects.
    pub(crate) fn with_nodes_changed(
        &self,
        change: impl Fn(&ConnectionInfo) -> Result<ConnectionInfo, Error>,
        own_tls: OwnTls,
    ) -> Result<Self, Error> {
        let nodes = self.nodes.iter().map(|node| change(&node.info));
        let renewed = Sentinels::new(nodes.collect::<Result<_, _>>()?, &self.master_name, own_tls)?;
        Ok(if self.replicas {
            renewed.for_replicas()
        } else {
            renewed
        })
    }

    /// The Sentinels' connection details, in the order given.
    #[cfg(feature = "tls")]
    pub(crate) fn infos(&self) -> impl Iterator<Item = &ConnectionInfo> {
        self.nodes.iter().map(|node| &node.info)
    }

    /// The Sentinels' addresses, for `Debug` and logs: `127.0.0.1:26379/0, ...`.
    pub(crate) fn addresses(&self) -> String {
        let addresses: Vec<&str> = self.nodes.iter().map(|node| &*node.display).collect();
        addresses.join(", ")
    }

    /// Connects to the master Sentinel names, speaking to it as `template` says
    /// (credentials, database, TLS). The caller bounds the time it takes.
    pub(crate) async fn connect(
        self: &Arc<Self>,
        template: &ConnectionInfo,
        check_timeout: Duration,
        check_every: Duration,
    ) -> Result<RedisService, Error> {
        if self.replicas {
            return self.connect_to_a_replica(template, check_timeout).await;
        }
        let master = self.master_address().await?;
        let info = template.clone().set_addr(at(template.addr(), &master));
        let display: Arc<str> = format!("{} at {}", self.master_name, describe(&info)).into();
        let service = open(&info, None, &self.own_tls, display).await?;
        if !role_of(&service).await?.may_be(Role::Master) {
            // Sentinel's answer is stale (a failover under way): ask again on the next try.
            return Err(Error::unavailable_because(format!(
                "Sentinel named {}:{} as master `{}`, but it is not a master",
                master.0, master.1, self.master_name
            )));
        }
        if let Some(driver) = service.driver() {
            self.hand_out(master, driver, check_timeout, check_every);
        }
        Ok(service)
    }

    /// Follows the master for a connection to `master`: retires `driver` when Sentinel
    /// names another.
    fn hand_out(
        self: &Arc<Self>,
        master: (String, u16),
        driver: &Arc<Driver>,
        check_timeout: Duration,
        check_every: Duration,
    ) {
        self.connections_out().push(HandedOut {
            master,
            driver: Arc::downgrade(driver),
        });
        self.watch(check_timeout, check_every);
    }

    /// Opens a Pub/Sub connection (redis-rs's, which it runs) to the master Sentinel
    /// names now, speaking to it as `template` says, and follows the master for it: the
    /// handle returned is retired when Sentinel names another. (No `ROLE` check: the
    /// connection takes only subscriptions.)
    pub(crate) async fn open_pubsub(
        self: &Arc<Self>,
        template: &ConnectionInfo,
        check_timeout: Duration,
        check_every: Duration,
    ) -> Result<(redis::aio::PubSub, Arc<Driver>), Error> {
        let master = self.master_address().await?;
        let info = template.clone().set_addr(at(template.addr(), &master));
        let client = redis::Client::open(info).map_err(Error::from_connect)?;
        let pubsub = client
            .get_async_pubsub()
            .await
            .map_err(Error::from_connect)?;
        let driver = Driver::without_task();
        self.hand_out(master, &driver, check_timeout, check_every);
        Ok((pubsub, driver))
    }

    /// Connects to a replica of the master, those Sentinel deems up first: the first that
    /// takes the connection and answers `ROLE` as a replica, or as a master (promoted in
    /// a failover under way). No connection is followed: a promoted replica still serves
    /// reads.
    async fn connect_to_a_replica(
        &self,
        template: &ConnectionInfo,
        connect_timeout: Duration,
    ) -> Result<RedisService, Error> {
        let replicas = self
            .first_answer(|node| Box::pin(node.ask_replicas(&self.master_name, &self.own_tls)))
            .await?;
        // A stalled one must leave time to try the next.
        let each = connect_timeout / u32::try_from(replicas.len().clamp(1, 4)).unwrap_or(4);
        let mut failure = None;
        for replica in &replicas {
            let info = template.clone().set_addr(at(template.addr(), replica));
            let display: Arc<str> =
                format!("a replica of {} at {}", self.master_name, describe(&info)).into();
            let opened = tokio::time::timeout(each, open(&info, None, &self.own_tls, display));
            let service = match opened.await {
                Ok(Ok(service)) => service,
                Ok(Err(error)) if error.is_config() => return Err(error),
                Ok(Err(error)) => {
                    failure = Some(error);
                    continue;
                }
                Err(_) => {
                    failure = Some(Error::unavailable("connect timed out"));
                    continue;
                }
            };
            let role = role_of(&service).await?;
            // A master too: a replica being promoted, which Sentinel still lists until
            // the failover ends, and whose data is the freshest there is.
            if role.may_be(Role::Replica) || role.may_be(Role::Master) {
                return Ok(service);
            }
        }
        Err(match failure {
            Some(error) => Error::unavailable_because(format!(
                "no replica of `{}` that Sentinel knows could be reached: {error}",
                self.master_name
            )),
            None => Error::unavailable_because(format!(
                "Sentinel knows no replica of `{}` that answers as one",
                self.master_name
            )),
        })
    }

    /// Asks every Sentinel at once; the first to name the master answers.
    async fn master_address(&self) -> Result<(String, u16), Error> {
        self.first_answer(|node| Box::pin(node.ask(&self.master_name, &self.own_tls)))
            .await
    }

    /// Asks every Sentinel at once; the first that knows the master answers.
    async fn first_answer<'a, T>(
        &'a self,
        ask: impl Fn(&'a Node) -> Question<'a, T>,
    ) -> Result<T, Error> {
        let mut questions: Vec<_> = self.nodes.iter().map(ask).collect();
        let mut unknown = 0;
        let mut failure: Option<Error> = None;
        poll_fn(|cx| {
            let mut index = 0;
            while index < questions.len() {
                let Poll::Ready(answer) = questions[index].as_mut().poll(cx) else {
                    index += 1;
                    continue;
                };
                drop(questions.swap_remove(index));
                match answer {
                    Ok(Some(known)) => return Poll::Ready(Ok(known)),
                    Ok(None) => unknown += 1,
                    // An unavailable Sentinel says more than a misconfigured one: keep it.
                    Err(err) if failure.as_ref().is_none_or(|kept| kept.is_config()) => {
                        failure = Some(err);
                    }
                    Err(_) => {}
                }
            }
            if !questions.is_empty() {
                return Poll::Pending;
            }
            Poll::Ready(Err(match failure.take() {
                Some(err) if err.is_config() => err,
                Some(err) => Error::unavailable_because(format!(
                    "no Sentinel answered about master `{}` (asked {}; {} did not know it): {err}",
                    self.master_name,
                    self.addresses(),
                    unknown
                )),
                None => Error::config(format!(
                    "no Sentinel knows a master named `{}` (asked {})",
                    self.master_name,
                    self.addresses()
                )),
            }))
        })
        .await
    }

    /// Starts the task that follows the master while connections are out, unless it runs.
    fn watch(self: &Arc<Self>, check_timeout: Duration, check_every: Duration) {
        let mut watcher = lock(&self.watcher);
        if watcher.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        *watcher = Some(tokio::spawn(follow(
            Arc::downgrade(self),
            check_timeout,
            check_every,
        )));
    }

    /// Whether the task following the master goes on: while connections are out. If
    /// not, it is marked gone, so the next connection starts another.
    fn keep_following(&self) -> bool {
        // Decided under the watcher's lock, which `watch` takes after a connection is
        // handed out: either this sees it, or `watch` sees the task gone and starts another.
        let mut watcher = lock(&self.watcher);
        if self.has_connections_out() {
            return true;
        }
        *watcher = None;
        false
    }

    fn has_connections_out(&self) -> bool {
        !self.connections_out().is_empty()
    }

    /// The connections handed out that are still open.
    fn connections_out(&self) -> MutexGuard<'_, Vec<HandedOut>> {
        let mut handed_out = lock(&self.handed_out);
        handed_out.retain(|out| out.driver.strong_count() > 0);
        handed_out
    }

    /// Retires every connection to a server other than `master`; answers how many.
    fn retire_all_but(&self, master: &(String, u16)) -> usize {
        let mut retired = 0;
        let mut handed_out = lock(&self.handed_out);
        handed_out.retain(|out| {
            if out.master == *master {
                return out.driver.strong_count() > 0;
            }
            if let Some(driver) = out.driver.upgrade() {
                tracing::warn!(
                    master = %self.master_name,
                    old = %format_args!("{}:{}", out.master.0, out.master.1),
                    new = %format_args!("{}:{}", master.0, master.1),
                    "Sentinel names a new master; retiring the connection to the old one"
                );
                driver.retire();
                retired += 1;
            }
            false
        });
        retired
    }
}

/// Until no connection is out: retires the connections to an old master as soon as a
/// Sentinel announces the switch (`+switch-master`), and also asks every `check_every`, in
/// case a switch went unheard (no subscription, or a silent one). Holds the Sentinels only
/// between waits, so dropping the connector ends it (its `Drop` also aborts it at once).
///
/// A subscription that ended before it [settled](crate::reconnect::SETTLED) is made again
/// only after that, asking meanwhile, so a Sentinel that drops it as soon as it is made
/// (or something in front of one) does not have it made in a loop (measured: ~65 new
/// connections a second).
async fn follow(sentinels: Weak<Sentinels>, check_timeout: Duration, check_every: Duration) {
    let mut announcements: Option<Announcements> = None;
    let mut subscribed_at: Option<Instant> = None;
    let mut next_node = 0;
    loop {
        let settled = subscribed_at.is_none_or(|at| at.elapsed() >= crate::reconnect::SETTLED);
        if announcements.is_none() && settled {
            let Some(sentinels) = sentinels.upgrade() else {
                return;
            };
            let node = &sentinels.nodes[next_node % sentinels.nodes.len()];
            next_node += 1;
            let subscribing = Announcements::subscribe(&node.info);
            announcements = tokio::time::timeout(check_timeout, subscribing)
                .await
                .ok()
                .and_then(Result::ok);
            if announcements.is_some() {
                subscribed_at = Some(Instant::now());
            }
        }
        let heard = match announcements.as_mut() {
            Some(heard) => tokio::time::timeout(check_every, heard.next())
                .await
                .unwrap_or(Heard::Nothing),
            None => {
                tokio::time::sleep(check_every).await;
                Heard::Nothing
            }
        };
        let Some(sentinels) = sentinels.upgrade() else {
            return;
        };
        if !sentinels.keep_following() {
            return;
        }
        match heard {
            Heard::Switch { name, to } if name == sentinels.master_name => {
                sentinels.retire_all_but(&to);
            }
            Heard::Switch { .. } => {}
            Heard::Ended | Heard::Nothing => {
                let asked = tokio::time::timeout(check_timeout, sentinels.master_address()).await;
                let missed = match asked {
                    Ok(Ok(master)) => sentinels.retire_all_but(&master) > 0,
                    _ => false,
                };
                // A switch found by asking went unannounced: the Sentinel listened to is
                // gone quiet. Listen to the next one.
                if missed || matches!(heard, Heard::Ended) {
                    announcements = None;
                }
            }
        }
    }
}

/// A subscription to a Sentinel's `+switch-master` announcements.
struct Announcements {
    /// Kept so the subscription stays open.
    _sink: redis::aio::PubSubSink,
    stream: redis::aio::PubSubStream,
}

enum Heard {
    /// `+switch-master <name> <old ip> <old port> <new ip> <new port>`.
    Switch { name: String, to: (String, u16) },
    /// The subscription closed.
    Ended,
    /// Nothing within the wait.
    Nothing,
}

impl Announcements {
    async fn subscribe(sentinel: &ConnectionInfo) -> Result<Self, Error> {
        let client = redis::Client::open(sentinel.clone()).map_err(Error::from_connect)?;
        let mut pubsub = client
            .get_async_pubsub()
            .await
            .map_err(Error::from_connect)?;
        pubsub
            .subscribe("+switch-master")
            .await
            .map_err(Error::from_connect)?;
        let (sink, stream) = pubsub.split();
        Ok(Announcements {
            _sink: sink,
            stream,
        })
    }

    async fn next(&mut self) -> Heard {
        let message = poll_fn(|cx| Pin::new(&mut self.stream).poll_next(cx)).await;
        let Some(message) = message else {
            return Heard::Ended;
        };
        let payload = String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
        match payload.split(' ').collect::<Vec<_>>()[..] {
            [name, _, _, host, port] => match port.parse() {
                Ok(port) => Heard::Switch {
                    name: name.to_owned(),
                    to: (host.to_owned(), port),
                },
                Err(_) => Heard::Nothing,
            },
            _ => Heard::Nothing,
        }
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.watcher).take() {
            task.abort();
        }
    }
}

impl Node {
    /// Asks this Sentinel `question`, on the connection kept for it (opened if there is
    /// none, or if it closed meanwhile: a Sentinel restarted, or something between that
    /// closes idle connections). The connection is put back once Redis answered, an error
    /// reply included, so a stalled or broken one is not asked again.
    async fn question(&self, question: redis::Cmd, own_tls: &OwnTls) -> Result<Value, Error> {
        let kept = lock(&self.connection)
            .take()
            .filter(|service| !service.is_closed());
        let service = match kept {
            Some(service) => service,
            None => open(&self.info, None, own_tls, self.display.clone()).await?,
        };
        let reply = service.clone().oneshot(Request::from(question)).await;
        if reply.as_ref().map_or_else(Error::is_server, |_| true) {
            *lock(&self.connection) = Some(service);
        }
        reply
    }

    /// `SENTINEL REPLICAS`: the host and port of each replica of the master, those this
    /// Sentinel deems up (not down, not disconnected) first, or `None` when it does not
    /// know the name.
    async fn ask_replicas(
        &self,
        master_name: &str,
        own_tls: &OwnTls,
    ) -> Result<Option<Vec<(String, u16)>>, Error> {
        let mut question = redis::cmd("SENTINEL");
        question.arg("REPLICAS").arg(master_name);
        let replicas = match self.question(question, own_tls).await {
            // `ERR No such master with that name`.
            Err(error) if error.is_server() => return Ok(None),
            Err(error) => return Err(error),
            Ok(Value::Array(replicas)) => replicas,
            Ok(_) => return Err(unexpected("REPLICAS")),
        };
        let mut replicas: Vec<(bool, (String, u16))> = replicas
            .iter()
            .filter_map(|replica| {
                let field = |name: &str| field(replica, name);
                let flags = field("flags")?;
                let down = flags
                    .split(',')
                    .any(|flag| matches!(flag, "s_down" | "o_down" | "disconnected"));
                let port = field("port")?.parse().ok()?;
                Some((down, (field("ip")?, port)))
            })
            .collect();
        // Those Sentinel deems up first. The others are tried last, not left out: a
        // replica being promoted shows as down and disconnected for a moment (Sentinel's
        // own link to it is cut as it promotes it), and that is the one to read from.
        replicas.sort_by_key(|(down, _)| *down);
        Ok(Some(
            replicas.into_iter().map(|(_, address)| address).collect(),
        ))
    }

    /// `SENTINEL GET-MASTER-ADDR-BY-NAME`: the master's host and port, or `None` when this
    /// Sentinel does not know the name.
    async fn ask(
        &self,
        master_name: &str,
        own_tls: &OwnTls,
    ) -> Result<Option<(String, u16)>, Error> {
        let mut question = redis::cmd("SENTINEL");
        question.arg("GET-MASTER-ADDR-BY-NAME").arg(master_name);
        match self.question(question, own_tls).await? {
            Value::Nil => Ok(None),
            Value::Array(items) => match items.as_slice() {
                [host, port] => match (text(host), text(port).and_then(|p| p.parse().ok())) {
                    (Some(host), Some(port)) => Ok(Some((host, port))),
                    _ => Err(unexpected("GET-MASTER-ADDR-BY-NAME")),
                },
                _ => Err(unexpected("GET-MASTER-ADDR-BY-NAME")),
            },
            _ => Err(unexpected("GET-MASTER-ADDR-BY-NAME")),
        }
    }
}

/// A question to one Sentinel, in flight.
type Question<'a, T> = Pin<Box<dyn Future<Output = Result<Option<T>, Error>> + Send + 'a>>;

fn unexpected(question: &'static str) -> Error {
    Error::unavailable_because(format!(
        "Sentinel answered {question} with an unexpected reply"
    ))
}

/// The value of field `name` in one entry of a `SENTINEL REPLICAS` reply: a flat array
/// of names and values (RESP2) or a map (RESP3).
fn field(entry: &Value, name: &str) -> Option<String> {
    match entry {
        Value::Array(items) => items
            .chunks_exact(2)
            .find(|pair| text(&pair[0]).as_deref() == Some(name))
            .and_then(|pair| text(&pair[1])),
        Value::Map(pairs) => pairs
            .iter()
            .find(|(key, _)| text(key).as_deref() == Some(name))
            .and_then(|(_, value)| text(value)),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// What a server said it is, asked with `ROLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Master,
    Replica,
    /// Something else (a Sentinel), or a reply not understood.
    Other,
    /// The server refused to say: the user may not run `ROLE` (an ACL user without
    /// `@dangerous`, a common least-privilege setting), or the command was renamed away.
    /// Sentinel's answer is then all there is to go on.
    Unknown,
}

impl Role {
    /// What a `ROLE` reply says: `master` or `slave` first.
    fn of(reply: &Value) -> Role {
        let first = match reply {
            Value::Array(items) => items.first().and_then(text),
            _ => None,
        };
        match first.as_deref() {
            Some("master") => Role::Master,
            Some("slave") => Role::Replica,
            _ => Role::Other,
        }
    }

    /// Whether the server may be `role`: it said so, or it would not say.
    fn may_be(self, role: Role) -> bool {
        self == role || self == Role::Unknown
    }
}

/// Asks the server on `service` its role. A server that answers with an error about the
/// command (`NOPERM`, an unknown command) is [`Role::Unknown`], not a failure: it is up
/// and may well be what Sentinel named. Any other error (unavailable, `LOADING`) fails.
async fn role_of(service: &RedisService) -> Result<Role, Error> {
    match service
        .clone()
        .oneshot(Request::from(redis::cmd("ROLE")))
        .await
    {
        Ok(reply) => Ok(Role::of(&reply)),
        Err(error) if error.is_server() => {
            tracing::debug!(%error, "the server would not answer ROLE; going by what Sentinel said");
            Ok(Role::Unknown)
        }
        Err(error) => Err(error),
    }
}

/// The master's address, over TLS if the template is.
fn at(template: &ConnectionAddr, (host, port): &(String, u16)) -> ConnectionAddr {
    match template {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.clone(),
            port: *port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.clone(), *port),
    }
}

/// A poisoned lock still guards consistent data here (every critical section is a few
/// plain assignments): go on with it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_is_reached_as_the_template_says_over_tls_or_not() {
        let master = ("127.0.0.1".to_owned(), 6380);
        let tls = ConnectionAddr::TcpTls {
            host: "cache".into(),
            port: 6379,
            insecure: true,
            tls_params: None,
        };
        match at(&tls, &master) {
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                ..
            } => assert_eq!((host.as_str(), port, insecure), ("127.0.0.1", 6380, true)),
            other => panic!("{other:?}"),
        }
        let plain = ConnectionAddr::Tcp("cache".into(), 6379);
        assert_eq!(
            at(&plain, &master),
            ConnectionAddr::Tcp("127.0.0.1".into(), 6380)
        );
    }

    #[test]
    fn a_role_reply_says_master_or_replica_first_and_an_unknown_role_may_be_either() {
        let role = |first: &str| {
            Value::Array(vec![
                Value::BulkString(first.as_bytes().to_vec()),
                Value::Int(0),
            ])
        };
        assert_eq!(Role::of(&role("master")), Role::Master);
        assert_eq!(Role::of(&role("slave")), Role::Replica);
        assert_eq!(Role::of(&role("sentinel")), Role::Other);
        assert_eq!(Role::of(&Value::Nil), Role::Other);
        assert!(!Role::Other.may_be(Role::Master));
        assert!(!Role::Replica.may_be(Role::Master));
        assert!(Role::Unknown.may_be(Role::Master));
    }
}
