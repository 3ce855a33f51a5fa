//! Real `redis-server` processes for tests: free loopback ports, a temp dir each, and the
//! faults tests need (kill, restart on the same port, pause, resume).
//!
//! Every server runs under a tiny `sh` watchdog that holds a pipe from this process: if the
//! test process dies in any way (panic=abort, SIGKILL), the pipe closes and the watchdog
//! kills its server, so servers never outlive the tests. `Drop` kills them in the normal
//! case.
#![allow(dead_code)] // each test binary uses its own part of the harness

mod blackhole;
mod cluster;
mod proxy;
#[allow(unused_imports)] // not every test binary injects network faults
pub use blackhole::{Blackhole, ConnectAttempts};
#[allow(unused_imports)] // only the cluster tests use it
pub use cluster::{RedisCluster, asking};
#[allow(unused_imports)] // not every test binary injects network faults
pub use proxy::FaultProxy;

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// How a test server is configured before it starts.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    password: Option<String>,
    user: Option<(String, String)>,
    tls: bool,
    /// TLS with these certificates (shared by several servers: one CA for a cluster),
    /// and plain TCP on a second port for the harness's own commands.
    tls_beside_plain: Option<PathBuf>,
    args: Vec<(String, String)>,
    /// A Sentinel watching the master of this name on this port.
    sentinel: Option<(String, u16)>,
}

impl ServerConfig {
    /// `requirepass`: the default user needs this password.
    pub fn password(mut self, password: &str) -> Self {
        self.password = Some(password.to_owned());
        self
    }

    /// An ACL user with every permission, and the default user disabled.
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.user = Some((name.to_owned(), password.to_owned()));
        self
    }

    /// Serve TLS only, with a CA and server certificate generated now.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Serve TLS on [`port`](RedisServer::port) with the certificates in `certificates`
    /// (made by [`make_certificates`]), and plain TCP on a port of its own that only
    /// [`raw_command`](RedisServer::raw_command) uses.
    pub fn tls_beside_plain(mut self, certificates: &Path) -> Self {
        self.tls = true;
        self.tls_beside_plain = Some(certificates.to_owned());
        self
    }

    /// Any other `redis-server --name value` option (`appendonly yes`, ...).
    pub fn arg(mut self, name: &str, value: &str) -> Self {
        self.args.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn start(self) -> RedisServer {
        RedisServer::start_with(self)
    }
}

impl ServerConfig {
    /// A Sentinel (`redis-server --sentinel`) watching `master` under `name`, alone enough
    /// to fail it over (quorum 1): it deems the master down after 300 ms without an answer.
    pub fn sentinel_of(master: &RedisServer, name: &str) -> ServerConfig {
        ServerConfig {
            sentinel: Some((name.to_owned(), master.port())),
            ..ServerConfig::default()
        }
    }
}

impl RedisServer {
    /// [`ServerConfig::sentinel_of`], started.
    pub fn sentinel_of(master: &RedisServer, name: &str) -> RedisServer {
        ServerConfig::sentinel_of(master, name).start()
    }

    /// Where this Sentinel says master `name` is: its port.
    pub fn master_port(&self, name: &str) -> u16 {
        let reply = self.raw_command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", name]);
        let port = reply
            .lines()
            .nth(1)
            .unwrap_or_else(|| panic!("no master: {reply}"));
        port.parse().expect("a port")
    }

    /// Makes this Sentinel fail master `name` over to a replica now, without asking other
    /// Sentinels. It answers at once; the replica is promoted within about a second.
    pub fn fail_over(&self, name: &str) {
        assert_eq!(self.raw_command(&["SENTINEL", "FAILOVER", name]), "OK");
    }
}

/// A running `redis-server` on `127.0.0.1`.
#[derive(Debug)]
pub struct RedisServer {
    config: ServerConfig,
    port: u16,
    /// The plain TCP port of a server with [`ServerConfig::tls_beside_plain`].
    plain_port: Option<u16>,
    dir: TempDir,
    process: Option<Process>,
    starts: u32,
}

#[derive(Debug)]
struct Process {
    watchdog: Child,
    pid: i32,
}

impl RedisServer {
    /// A plain server with no password.
    pub fn start() -> RedisServer {
        ServerConfig::default().start()
    }

    pub fn config() -> ServerConfig {
        ServerConfig::default()
    }

    fn start_with(config: ServerConfig) -> RedisServer {
        let binary = redis_server_binary();
        let mut server = RedisServer {
            config,
            port: 0,
            plain_port: None,
            dir: TempDir::new(),
            process: None,
            starts: 0,
        };
        if server.config.tls && server.config.tls_beside_plain.is_none() {
            make_certificates(server.dir.path());
        }
        // Another test may take the free port between our probe and the bind; try again.
        for _ in 0..5 {
            server.port = free_port();
            if server.config.tls_beside_plain.is_some() {
                server.plain_port = Some(free_port());
            }
            match server.spawn(&binary) {
                Ok(()) => return server,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("redis-server did not start:\n{log}"),
            }
        }
        panic!("redis-server found no free port after 5 tries");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL clients use, with the credentials this server requires.
    pub fn url(&self) -> String {
        let scheme = if self.config.tls { "rediss" } else { "redis" };
        let auth = match (&self.config.user, &self.config.password) {
            (Some((user, pass)), _) => format!("{user}:{pass}@"),
            (None, Some(pass)) => format!(":{pass}@"),
            (None, None) => String::new(),
        };
        format!("{scheme}://{auth}127.0.0.1:{}", self.port)
    }

    /// Where a TLS server's certificates are.
    fn certificates(&self) -> PathBuf {
        match &self.config.tls_beside_plain {
            Some(dir) => dir.clone(),
            None => self.dir.path().to_owned(),
        }
    }

    /// The PEM of the CA that signed a TLS server's certificate.
    pub fn ca_certificate(&self) -> Vec<u8> {
        std::fs::read(self.certificates().join("ca.crt")).expect("TLS server has a CA certificate")
    }

    pub fn pid(&self) -> i32 {
        self.process.as_ref().expect("server is running").pid
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// SIGKILL: the server dies at once, connections see resets. Returns once the port
    /// refuses connections.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            signal(process.pid, libc::SIGKILL);
            drop(process.watchdog.stdin.take()); // lets the watchdog exit
            let _ = process.watchdog.wait();
            let deadline = Instant::now() + Duration::from_secs(5);
            while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                assert!(Instant::now() < deadline, "killed server still accepts");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Starts the server again on the same port with the same directory (so `appendonly`
    /// data survives). Kills it first if it is running.
    pub fn restart(&mut self) {
        self.kill();
        let binary = redis_server_binary();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn(&binary) {
                Ok(()) => return,
                Err(log) if log.contains("Address already in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(log) => panic!("redis-server did not restart on port {}:\n{log}", self.port),
            }
        }
    }

    /// Restarts on the same port and returns as soon as the port accepts connections,
    /// while the server may still be loading its data (and answering `LOADING`).
    pub fn restart_while_loading(&mut self) {
        self.kill();
        let binary = redis_server_binary();
        self.spawn_until(&binary, Ready::Listening)
            .unwrap_or_else(|log| panic!("redis-server did not restart:\n{log}"));
    }

    /// SIGSTOP: the server keeps its sockets but answers nothing, like a stalled host.
    pub fn pause(&self) {
        signal(self.pid(), libc::SIGSTOP);
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        signal(self.pid(), libc::SIGCONT);
    }

    /// Makes this server's port a black hole until the guard is dropped: its host as if
    /// gone, every packet to and from it dropped, open connections and new ones alike,
    /// this harness's own [`raw_command`](Self::raw_command) too. Needs `iptables` and
    /// root (see [`Blackhole`]).
    pub fn blackhole(&self) -> Blackhole {
        Blackhole::port(self.port)
    }

    /// A field of `INFO` (`total_connections_received`, `connected_clients`...), read over
    /// a fresh connection that counts itself in those numbers.
    pub fn info_field(&self, field: &str) -> String {
        let reply = self.raw_command(&["INFO", "everything"]);
        reply
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("INFO has no field {field}"))
            .trim()
            .to_owned()
    }

    /// Makes this server a replica of `master`, as a failover leaves the master it
    /// demoted: from now on it answers writes with `READONLY`. Blocks until it holds the
    /// master's data as of the sync (a few milliseconds: test servers sync at once);
    /// [`catch_up`](Self::catch_up) waits for the writes made after it too.
    pub fn replicate(&self, master: &RedisServer) {
        let port = master.port().to_string();
        assert_eq!(self.raw_command(&["REPLICAOF", "127.0.0.1", &port]), "OK");
        let started = Instant::now();
        while self.info_field("master_link_status") != "up" {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the replica never synced with its master"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Blocks until writes made on `master` reach this replica. After a sync, a master
    /// streams its writes to the replica only once the replica acknowledges (within a
    /// second); a replica promoted before that has none of them.
    pub fn catch_up(&self, master: &RedisServer) {
        let started = Instant::now();
        for attempt in 0u64.. {
            let mark = attempt.to_string();
            // Refused (NOREPLICAS) while the master does not count this replica yet.
            master.raw_command(&["SET", "harness:replication-mark", &mark]);
            std::thread::sleep(Duration::from_millis(20));
            if self.raw_command(&["GET", "harness:replication-mark"]) == mark {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "writes never reached the replica"
            );
        }
    }

    /// Sends one command over a plain socket (RESP) and returns the reply's text. For
    /// arranging state from outside the code under test. Not for TLS servers, unless they
    /// serve plain TCP beside it.
    /// Whether this server runs a write within `within`: `PUBLISH` (a write as far as
    /// `CLIENT PAUSE WRITE` goes, and keyless, so a cluster node runs it whatever slots
    /// it serves). `false` while it holds writes, as a master does during a coordinated
    /// failover until it ends or times out. Plain TCP, no password.
    pub fn takes_writes(&self, within: Duration) -> bool {
        let Ok(mut stream) =
            TcpStream::connect(("127.0.0.1", self.plain_port.unwrap_or(self.port)))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(within));
        let mut request = Vec::new();
        write_command(&mut request, &["PUBLISH", "harness:probe", "1"]);
        if stream.write_all(&request).is_err() {
            return false;
        }
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with(':')
    }

    /// ACL user `name`, allowed everything, made or given `password` alone (its old
    /// ones no longer valid), as a token service rotating its tokens would.
    pub fn set_user_password(&self, name: &str, password: &str) {
        let password = format!(">{password}");
        let args = [
            "ACL",
            "SETUSER",
            name,
            "on",
            "resetpass",
            &password,
            "~*",
            "&*",
            "+@all",
        ];
        assert_eq!(self.raw_command(&args), "OK");
    }

    /// Closes every connection of ACL user `name`, as a service does when its token
    /// expires.
    pub fn close_connections_of_user(&self, name: &str) {
        self.raw_command(&["CLIENT", "KILL", "USER", name]);
    }

    /// The ids of the connections of ACL user `name`, in order: a connection that keeps
    /// its id was not replaced.
    pub fn connection_ids_of_user(&self, name: &str) -> Vec<u64> {
        let clients = self.raw_command(&["CLIENT", "LIST"]);
        let mut ids: Vec<u64> = clients
            .lines()
            .filter(|line| line.contains(&format!(" user={name} ")))
            .filter_map(|line| line.strip_prefix("id=")?.split(' ').next()?.parse().ok())
            .collect();
        ids.sort_unstable();
        ids
    }

    pub fn raw_command(&self, args: &[&str]) -> String {
        let port = match (self.config.tls, self.plain_port) {
            (false, _) => self.port,
            (true, Some(plain)) => plain,
            (true, None) => panic!("raw_command speaks plain TCP"),
        };
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut request = Vec::new();
        if let Some(auth) = self.auth_args() {
            write_command(
                &mut request,
                &auth.iter().map(String::as_str).collect::<Vec<_>>(),
            );
        }
        write_command(&mut request, args);
        stream.write_all(&request).unwrap();
        let mut reader = BufReader::new(stream);
        if self.auth_args().is_some() {
            let auth_reply = read_reply(&mut reader);
            assert_eq!(auth_reply, "OK", "AUTH failed");
        }
        read_reply(&mut reader)
    }

    fn auth_args(&self) -> Option<Vec<String>> {
        match (&self.config.user, &self.config.password) {
            (Some((user, pass)), _) => Some(vec!["AUTH".into(), user.clone(), pass.clone()]),
            (None, Some(pass)) => Some(vec!["AUTH".into(), pass.clone()]),
            (None, None) => None,
        }
    }

    fn spawn(&mut self, binary: &Path) -> Result<(), String> {
        // A Sentinel logs no "Ready to accept connections".
        let ready = match self.config.sentinel {
            Some(_) => Ready::Listening,
            None => Ready::Serving,
        };
        self.spawn_until(binary, ready)
    }

    fn spawn_until(&mut self, binary: &Path, ready: Ready) -> Result<(), String> {
        self.starts += 1;
        let log = self.dir.path().join(format!("redis-{}.log", self.starts));
        let mut args: Vec<String> = Vec::new();
        if let Some((name, master_port)) = &self.config.sentinel {
            // Sentinel rewrites its file as it learns; a restart reads it back.
            let file = self.dir.path().join("sentinel.conf");
            if !file.exists() {
                let conf = format!(
                    "sentinel monitor {name} 127.0.0.1 {master_port} 1\n\
                     sentinel down-after-milliseconds {name} 300\n\
                     sentinel failover-timeout {name} 2000\n"
                );
                std::fs::write(&file, conf).expect("write sentinel.conf");
            }
            args.extend([file.display().to_string(), "--sentinel".into()]);
        }
        args.extend([
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--logfile".into(),
            log.display().to_string(),
            "--save".into(),
            "".into(),
            // A master sends its data to a new replica at once, not after the default
            // 5 s wait for more replicas: a replica is in sync when a test fails over.
            "--repl-diskless-sync-delay".into(),
            "0".into(),
            "--daemonize".into(),
            "no".into(),
        ]);
        if self.config.tls {
            let d = self.certificates();
            let plain = self.plain_port.unwrap_or(0);
            args.extend(
                [
                    ("--port", plain.to_string()),
                    ("--tls-port", self.port.to_string()),
                    (
                        "--tls-cert-file",
                        d.join("server.crt").display().to_string(),
                    ),
                    ("--tls-key-file", d.join("server.key").display().to_string()),
                    ("--tls-ca-cert-file", d.join("ca.crt").display().to_string()),
                    ("--tls-auth-clients", "no".to_owned()),
                ]
                .map(|(k, v)| [k.to_owned(), v])
                .into_iter()
                .flatten(),
            );
        } else {
            args.extend(["--port".into(), self.port.to_string()]);
        }
        if let Some(pass) = &self.config.password {
            args.extend(["--requirepass".into(), pass.clone()]);
        }
        if let Some((user, pass)) = &self.config.user {
            // Each word of the ACL rule is its own argument.
            let rule = format!("{user} on >{pass} ~* &* +@all");
            args.push("--user".into());
            args.extend(rule.split(' ').map(str::to_owned));
            args.extend(["--user", "default", "off"].map(str::to_owned));
        }
        for (name, value) in &self.config.args {
            args.extend([format!("--{name}"), value.clone()]);
        }

        // The watchdog prints the server's pid, then waits for this process's end of the
        // pipe to close, and kills the server.
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(r#""$0" "$@" >/dev/null 2>&1 & echo $!; read _; kill -9 $! 2>/dev/null"#)
            .arg(binary)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh");
        let mut line = String::new();
        BufReader::new(watchdog.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("watchdog prints the pid");
        let pid: i32 = line.trim().parse().expect("pid");
        let process = Process { watchdog, pid };

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let up = match ready {
                Ready::Serving => text.contains("Ready to accept connections"),
                Ready::Listening => TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
            };
            if up {
                self.process = Some(process);
                return Ok(());
            }
            let dead = unsafe { libc::kill(pid, 0) } != 0
                || text.contains("# Failed")
                || text.contains("FATAL");
            if dead || Instant::now() > deadline {
                signal(pid, libc::SIGKILL);
                let mut process = process;
                drop(process.watchdog.stdin.take());
                let _ = process.watchdog.wait();
                return Err(if text.is_empty() {
                    "no log written".into()
                } else {
                    text
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Ready {
    /// The server logged that it serves (data loaded).
    Serving,
    /// The port accepts connections.
    Listening,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(process) = &self.process {
            signal(process.pid, libc::SIGKILL);
        }
        if let Some(mut process) = self.process.take() {
            drop(process.watchdog.stdin.take());
            let _ = process.watchdog.wait();
        }
    }
}

/// A token service's stand-in: the token of the moment, and how many were handed out.
#[derive(Clone, Default)]
pub struct TokenService {
    current: std::sync::Arc<std::sync::Mutex<String>>,
    handed_out: std::sync::Arc<AtomicU64>,
}

impl TokenService {
    pub fn issuing(token: &str) -> Self {
        let service = TokenService::default();
        service.issue(token);
        service
    }

    /// From now on, hands out `token`.
    pub fn issue(&self, token: &str) {
        *self.current.lock().unwrap() = token.to_owned();
    }

    /// The token of the moment, counted.
    pub fn take(&self) -> String {
        self.handed_out.fetch_add(1, Ordering::SeqCst);
        self.current.lock().unwrap().clone()
    }

    pub fn handed_out(&self) -> u64 {
        self.handed_out.load(Ordering::SeqCst)
    }
}

/// The seeds a seeded fault test runs: those in `CHAOS_SEEDS` (`CHAOS_SEEDS=1,2,3`), or
/// `default`, the one CI runs.
#[allow(dead_code)] // only the fault-sequence tests use it
pub fn chaos_seeds(default: u64) -> Vec<u64> {
    std::env::var("CHAOS_SEEDS")
        .ok()
        .map(|seeds| {
            seeds
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse()
                        .expect("CHAOS_SEEDS: numbers, comma-separated")
                })
                .collect()
        })
        .unwrap_or_else(|| vec![default])
}

/// A runtime of its own, for tests of a client used on several runtimes in turn.
pub fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Polls `check` every 5 ms until it holds, for at most `limit` (then panics); answers how
/// long it took.
pub async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

/// For the examples: `REDIS_URL` if set, and otherwise a throwaway server on a free
/// loopback port (kept alive by the returned handle).
pub fn redis_url_or_throwaway_server() -> (String, Option<RedisServer>) {
    match std::env::var("REDIS_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let server = RedisServer::start();
            (server.url(), Some(server))
        }
    }
}

/// `redis-server` from `REDIS_SERVER_BIN` or `PATH`, or a failing test with one clear line.
pub fn redis_server_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("REDIS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "redis-server is not on PATH and REDIS_SERVER_BIN is unset: install it \
                 (`sudo apt-get install -y redis-server`, any Redis >= 6) to run these tests"
            )
        })
}

/// The TCP options of a socket that tests check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    pub nodelay: bool,
    /// `SO_KEEPALIVE`, and then `TCP_KEEPIDLE`, `TCP_KEEPINTVL` (seconds) and
    /// `TCP_KEEPCNT`.
    pub keepalive: Option<(i32, i32, i32)>,
    /// `TCP_USER_TIMEOUT`, in milliseconds (0: none).
    pub user_timeout_ms: i32,
    /// Segments sent and not acknowledged yet (`TCP_INFO`): keepalive probes only go
    /// out on a connection with none.
    pub unacked: u32,
}

impl TcpOptions {
    /// What this crate sets by default: `TCP_NODELAY`, keepalive after 30 s quiet, every
    /// 10 s, 3 probes, and a user timeout of their total.
    pub fn are_the_defaults(&self) -> bool {
        self.nodelay && self.keepalive == Some((30, 10, 3)) && self.user_timeout_ms == 60_000
    }
}

/// The [`TcpOptions`] of each TCP socket of this process connected to `port` on loopback,
/// read from the sockets themselves (`/proc/self/fd`, `getpeername`, `getsockopt`), so
/// it covers connections redis-rs opens too.
pub fn tcp_options_of_connections_to(port: u16) -> Vec<TcpOptions> {
    let mut found = Vec::new();
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return found;
    };
    for entry in fds.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if peer_port(fd) != Some(port) {
            continue;
        }
        let option = |level, name| socket_option(fd, level, name);
        let (Some(nodelay), Some(keepalive)) = (
            option(libc::IPPROTO_TCP, libc::TCP_NODELAY),
            option(libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        ) else {
            continue;
        };
        let probes = || {
            Some((
                option(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?,
                option(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)?,
                option(libc::IPPROTO_TCP, libc::TCP_KEEPCNT)?,
            ))
        };
        found.push(TcpOptions {
            nodelay: nodelay != 0,
            keepalive: if keepalive != 0 { probes() } else { None },
            user_timeout_ms: option(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT).unwrap_or(0),
            unacked: tcp_info(fd).map_or(0, |info| info.tcpi_unacked),
        });
    }
    found
}

/// The port of the peer of socket `fd`, if it is a connected IP socket.
fn peer_port(fd: i32) -> Option<u16> {
    // SAFETY: getpeername writes at most the length given into a buffer of that size;
    // an fd that is not a socket (or closed meanwhile) fails.
    unsafe {
        let mut peer: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getpeername(fd, (&raw mut peer).cast(), &raw mut len) != 0 {
            return None;
        }
        match i32::from(peer.ss_family) {
            libc::AF_INET => {
                let v4 = &*(&raw const peer).cast::<libc::sockaddr_in>();
                Some(u16::from_be(v4.sin_port))
            }
            libc::AF_INET6 => {
                let v6 = &*(&raw const peer).cast::<libc::sockaddr_in6>();
                Some(u16::from_be(v6.sin6_port))
            }
            _ => None,
        }
    }
}

/// `TCP_INFO` of socket `fd`.
fn tcp_info(fd: i32) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers, for which zero is valid; getsockopt writes at
    // most `len` bytes into it, its size.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let got = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        );
        (got == 0).then_some(info)
    }
}

/// An integer socket option of `fd`.
fn socket_option(fd: i32, level: i32, name: i32) -> Option<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, an int of that size.
    let got = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
    (got == 0).then_some(value)
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// A port that no other server of this process was given, free now.
///
/// Not one the kernel picks (`127.0.0.1:0`): it hands out a port a test has just freed,
/// and tests that restart a server on its port (`kill` then `restart`) then found another
/// test's server there (`NOAUTH` from a server with a password, or a refused connection).
/// These come from below the kernel's range for outgoing connections (32768–60999 by
/// default), so no connection's local port takes them either; each test process starts
/// at its own place in the range, and never hands one out twice.
fn free_port() -> u16 {
    const LOW: u32 = 10_000;
    const COUNT: u32 = 22_000;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = std::process::id().wrapping_mul(7_919) % COUNT;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::SeqCst) as u32;
        let port = (LOW + (start + n) % COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOW} and {}", LOW + COUNT);
}

fn write_command(out: &mut Vec<u8>, args: &[&str]) {
    out.extend(format!("*{}\r\n", args.len()).bytes());
    for arg in args {
        out.extend(format!("${}\r\n{arg}\r\n", arg.len()).bytes());
    }
}

/// Reads one RESP2 reply as text: simple strings, errors (prefixed `-`), integers, bulk
/// strings; arrays are joined with newlines.
fn read_reply(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("reply");
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(1);
    match kind {
        "+" | ":" => rest.to_owned(),
        "-" => line.to_owned(),
        "$" => {
            let len: i64 = rest.parse().expect("bulk length");
            if len < 0 {
                return String::new();
            }
            let mut buf = vec![0; len as usize + 2];
            reader.read_exact(&mut buf).expect("bulk body");
            String::from_utf8_lossy(&buf[..len as usize]).into_owned()
        }
        "*" => {
            let n: i64 = rest.parse().expect("array length");
            (0..n.max(0))
                .map(|_| read_reply(reader))
                .collect::<Vec<_>>()
                .join("\n")
        }
        other => panic!("unexpected reply type {other}"),
    }
}

/// A directory of its own holding a CA and a server certificate it signed
/// ([`make_certificates`]), for servers that share them.
pub fn certificates() -> TempDir {
    let dir = TempDir::new();
    make_certificates(dir.path());
    dir
}

/// Certificates that trust the CA of `ca` (a PEM) and no other, with no client certificate.
#[cfg(feature = "tls")]
pub fn trust(ca: Vec<u8>) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca),
    }
}

/// Self-signed CA and a server certificate for 127.0.0.1 and localhost, by the openssl CLI.
pub fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("openssl is needed for TLS tests ({e}): apt-get install -y openssl")
            });
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat());
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    #[allow(clippy::new_without_default)] // examples make it `pub`
    pub fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "tower-redis-resilience-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // A process that had this pid before may have left its directory (killed before
        // its drops ran): a server's old log there would say "Ready to accept
        // connections" before the new server is (seen once: a connect refused).
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
