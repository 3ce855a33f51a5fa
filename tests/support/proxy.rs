//! A TCP proxy in front of a real server that injects network faults on demand.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Forwards `127.0.0.1:<port>` to an upstream port. [`cut_replies_after`] makes it close
/// every connection once that many more bytes have gone from the server to the client,
/// so a reply can be cut in the middle; [`silence_open_connections`] makes the open ones
/// a black hole.
///
/// [`cut_replies_after`]: FaultProxy::cut_replies_after
/// [`silence_open_connections`]: FaultProxy::silence_open_connections
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    budget: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    upstream: Arc<AtomicU16>,
    /// Connections accepted before this many (counted from 1) forward nothing more.
    silenced_below: Arc<AtomicU64>,
    /// Milliseconds every reply is held before it goes on to the client.
    delay_millis: Arc<AtomicU64>,
    /// Bytes a second read from the server on each connection; 0: as fast as it sends.
    rate: Arc<AtomicU64>,
    /// Bytes each connection accepted now passes from the server before it is closed.
    each_budget: Arc<AtomicU64>,
    /// Bytes the first connection passed from the server to the client.
    first_bytes: Arc<AtomicU64>,
    /// Milliseconds after which a connection accepted now is closed; 0: never.
    lifetime_millis: Arc<AtomicU64>,
    /// Milliseconds a connection accepted now waits before it forwards anything.
    opening_millis: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

const UNLIMITED: u64 = u64::MAX;

impl FaultProxy {
    /// Starts forwarding; needs a tokio runtime.
    pub async fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let budget = Arc::new(AtomicU64::new(UNLIMITED));
        let accepted = Arc::new(AtomicU64::new(0));
        let upstream = Arc::new(AtomicU16::new(upstream_port));
        let silenced_below = Arc::new(AtomicU64::new(0));
        let delay_millis = Arc::new(AtomicU64::new(0));
        let delay = delay_millis.clone();
        let rate = Arc::new(AtomicU64::new(0));
        let each_rate = rate.clone();
        let each_budget = Arc::new(AtomicU64::new(UNLIMITED));
        let each = each_budget.clone();
        let first_bytes = Arc::new(AtomicU64::new(0));
        let first = first_bytes.clone();
        let lifetime_millis = Arc::new(AtomicU64::new(0));
        let lifetime = lifetime_millis.clone();
        let opening_millis = Arc::new(AtomicU64::new(0));
        let opening = opening_millis.clone();
        let shared = budget.clone();
        let counter = accepted.clone();
        let target = upstream.clone();
        let silence = silenced_below.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = counter.fetch_add(1, Ordering::SeqCst);
                let faults = Faults {
                    budget: shared.clone(),
                    silenced_below: silence.clone(),
                    delay_millis: delay.clone(),
                    rate: each_rate.clone(),
                    own_budget: each.load(Ordering::SeqCst),
                    passed: (number == 0).then(|| first.clone()),
                    number,
                };
                let upstream_port = target.load(Ordering::SeqCst);
                let lifetime = lifetime.load(Ordering::SeqCst);
                let opening = opening.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(opening)).await;
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await {
                        let forwarding = forward(client, server, faults);
                        if lifetime == 0 {
                            forwarding.await;
                        } else {
                            // Dropping it closes both connections.
                            let lifetime = std::time::Duration::from_millis(lifetime);
                            let _ = tokio::time::timeout(lifetime, forwarding).await;
                        }
                    }
                });
            }
        });
        FaultProxy {
            addr,
            budget,
            accepted,
            upstream,
            silenced_below,
            delay_millis,
            rate,
            each_budget,
            first_bytes,
            lifetime_millis,
            opening_millis,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.addr.port())
    }

    /// How many client connections the proxy accepted: every connection attempt, even
    /// those it could not forward because the server was down.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Forward connections accepted from now on to `port`; open ones stay where they
    /// are, as with a DNS name or a virtual IP moved to another server.
    pub fn retarget(&self, port: u16) {
        self.upstream.store(port, Ordering::SeqCst);
    }

    /// From now on, let only `bytes` more bytes through from the server, then close.
    pub fn cut_replies_after(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::SeqCst);
    }

    /// The connections open now forward nothing more, either way, and stay open: as a
    /// NAT or load balancer that dropped an idle flow without telling either end. New
    /// connections forward as usual.
    pub fn silence_open_connections(&self) {
        self.silenced_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Close every connection accepted from now on once `bytes` have gone from the server
    /// to the client on it: with the bytes of the connection's handshake (see
    /// [`first_connection_bytes`](Self::first_connection_bytes)), a load balancer or
    /// firewall that lets connections open and resets them at their first request.
    pub fn cut_each_connection_after(&self, bytes: u64) {
        self.each_budget.store(bytes, Ordering::SeqCst);
    }

    /// Close every connection accepted from now on `lifetime` after accepting it, as a
    /// load balancer with a limit on a connection's age, or a reaper of connections,
    /// would. Zero ends it.
    pub fn close_connections_after(&self, lifetime: std::time::Duration) {
        let millis = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
        self.lifetime_millis.store(millis, Ordering::SeqCst);
    }

    /// Every connection accepted from now on forwards nothing for `delay` (its handshake
    /// waits): a server slow to take connections, or a handshake far away. Zero ends it.
    pub fn delay_new_connections(&self, delay: std::time::Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.opening_millis.store(millis, Ordering::SeqCst);
    }

    /// How many bytes the first connection has passed from the server to the client: the
    /// handshake's, right after the client opened it.
    pub fn first_connection_bytes(&self) -> u64 {
        self.first_bytes.load(Ordering::SeqCst)
    }

    /// From now on, hold every reply `delay` before passing it on, in order, on every
    /// connection: a server that is slow but alive, or a slow network. Zero ends it.
    pub fn delay_replies(&self, delay: std::time::Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_millis.store(millis, Ordering::SeqCst);
    }

    /// From now on, read what the server sends at `bytes_per_second` at most, on every
    /// connection: a slow network, which holds a large reply back in the server's
    /// output buffer. Zero ends it.
    pub fn limit_replies_to(&self, bytes_per_second: u64) {
        self.rate.store(bytes_per_second, Ordering::SeqCst);
    }
}

/// What the proxy does to one connection.
struct Faults {
    budget: Arc<AtomicU64>,
    silenced_below: Arc<AtomicU64>,
    delay_millis: Arc<AtomicU64>,
    rate: Arc<AtomicU64>,
    /// Bytes this connection passes from the server before it is closed.
    own_budget: u64,
    /// Counts the bytes it passed from the server (the first connection's alone).
    passed: Option<Arc<AtomicU64>>,
    /// This connection's place in the order of acceptance, from 0.
    number: u64,
}

impl Faults {
    fn silenced(&self) -> bool {
        self.number < self.silenced_below.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(client: TcpStream, server: TcpStream, faults: Faults) {
    let faults = Arc::new(faults);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up_faults = faults.clone();
    let upstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if !up_faults.silenced() && server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Replies go through a queue to the writer, each due when it was read plus the delay
    // in force then, so a delay holds replies without slowing the reading of later ones.
    let (queue, mut due) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let budget = &faults.budget;
        let mut own_left = faults.own_budget;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if faults.silenced() {
                continue;
            }
            let allowed = budget.load(Ordering::SeqCst).min(own_left);
            let pass = (n as u64).min(allowed) as usize;
            if budget.load(Ordering::SeqCst) != UNLIMITED {
                budget.fetch_sub(pass as u64, Ordering::SeqCst);
            }
            own_left = own_left.saturating_sub(pass as u64);
            if let Some(passed) = &faults.passed {
                passed.fetch_add(pass as u64, Ordering::SeqCst);
            }
            let delay =
                std::time::Duration::from_millis(faults.delay_millis.load(Ordering::SeqCst));
            let at = tokio::time::Instant::now() + delay;
            if queue.send((at, buf[..pass].to_vec())).is_err() || pass < n {
                return; // the writer closes the client connection after what it holds
            }
            let rate = faults.rate.load(Ordering::SeqCst);
            if rate > 0 {
                // Reads no more until this much has gone at the rate: the rest waits in
                // the server.
                tokio::time::sleep(std::time::Duration::from_secs_f64(n as f64 / rate as f64))
                    .await;
            }
        }
    };
    let writer = async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if client_write.write_all(&bytes).await.is_err() {
                return;
            }
        }
        // The reader ended: dropping the write half closes the client connection, mid-reply
        // when the budget ran out.
    };
    let downstream = async move {
        tokio::join!(reader, writer);
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}
