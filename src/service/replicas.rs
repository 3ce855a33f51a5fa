//! Reads a cluster's master cannot serve, sent to its replicas
//! ([`Connector::read_replicas`](crate::Connector::read_replicas)).

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use redis::{
    Cmd, Pipeline, RedisError, RedisResult, Value, cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

use crate::{CommandInfo, Error};

/// A second cluster connection, set up for replica reads (its connections to replicas
/// in `READONLY` mode), one for every connection a connector opens, opened in the
/// background beside the first (or by the first read that needs it). Once it has lost
/// its connection to a slot's master, it sends the slot's reads to a replica.
pub(crate) struct ReplicaReads {
    /// Built with `read_from_replicas`, and otherwise as the main connection's.
    client: ClusterClient,
    connect_timeout: Duration,
    connection: tokio::sync::OnceCell<ClusterConnection>,
    /// Reads a replica served.
    served: AtomicU64,
}

impl ReplicaReads {
    pub(crate) fn new(client: ClusterClient, connect_timeout: Duration) -> std::sync::Arc<Self> {
        std::sync::Arc::new(ReplicaReads {
            client,
            connect_timeout,
            connection: tokio::sync::OnceCell::new(),
            served: AtomicU64::new(0),
        })
    }

    /// How many reads a replica served.
    pub(crate) fn served(&self) -> u64 {
        self.served.load(Relaxed)
    }

    /// Opens the connection now, while the masters are up, so that the client knows
    /// which node is whose replica, and has its connections to the replicas, when a
    /// master goes. If it cannot be opened now, the first read that needs it tries
    /// again.
    pub(crate) async fn open(&self) {
        let _ = self.connection().await;
    }

    /// The connection, opened within the connect timeout if it is not yet; `None` if it
    /// cannot be (tried again next time).
    async fn connection(&self) -> Option<ClusterConnection> {
        let open = self
            .connection
            .get_or_try_init(|| self.client.get_async_connection());
        match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(Ok(connection)) => Some(connection.clone()),
            Ok(Err(error)) => {
                tracing::debug!(%error, "redis cluster: the connection for replica reads could not be opened");
                None
            }
            Err(_) => None,
        }
    }

    /// `cmd`'s reply from a replica, if `cmd` is a read that failed on the master's
    /// connection as unavailable (`err`) and a replica answers; `None` otherwise.
    pub(super) async fn command(&self, cmd: &Cmd, err: &RedisError) -> Option<Value> {
        if !CommandInfo::of_cmd(cmd).is_read_only() || !for_a_replica(err) {
            return None;
        }
        let mut connection = self.connection().await?;
        let reply = redis::aio::ConnectionLike::req_packed_command(&mut connection, cmd).await;
        self.count(answered(reply))
    }

    /// The same for a plain pipeline of reads.
    pub(super) async fn commands(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
        err: &RedisError,
    ) -> Option<Vec<Value>> {
        if !CommandInfo::of_pipeline(pipeline).is_read_only() || !for_a_replica(err) {
            return None;
        }
        let mut connection = self.connection().await?;
        let replies = redis::aio::ConnectionLike::req_packed_commands(
            &mut connection,
            pipeline,
            offset,
            count,
        )
        .await;
        answered(replies)
    }
}

impl ReplicaReads {
    fn count<T>(&self, served: Option<T>) -> Option<T> {
        if served.is_some() {
            self.served.fetch_add(1, Relaxed);
        }
        served
    }
}

/// Whether a read that failed so may be served by a replica: the master could not serve
/// it (its node's connection lost, no master for the slot, `MOVED` to a master that is
/// gone...), as opposed to an error of the read's own.
fn for_a_replica(err: &RedisError) -> bool {
    Error::from_request(err.clone()).is_unavailable()
}

/// A replica's answer, or `None` if it could not give one.
fn answered<T>(reply: RedisResult<T>) -> Option<T> {
    match reply {
        Ok(reply) => {
            tracing::debug!(
                "redis cluster: a read the master could not serve was served by a replica"
            );
            Some(reply)
        }
        Err(error) => {
            tracing::debug!(%error, "redis cluster: a replica could not serve a read the master could not either");
            None
        }
    }
}
