//! The test harness does what the other tests rely on.

mod support;

use std::{
    io::{BufRead, BufReader},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::RedisServer;

#[test]
fn restart_keeps_the_port_and_appendonly_data() {
    let mut server = RedisServer::config()
        .arg("appendonly", "yes")
        .arg("appendfsync", "always")
        .start();
    let port = server.port();
    assert_eq!(server.raw_command(&["INCRBY", "n", "41"]), "41");
    server.kill();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "killed server refuses"
    );
    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(server.raw_command(&["INCR", "n"]), "42");
}

#[test]
fn paused_server_accepts_but_does_not_answer_until_resumed() {
    let server = RedisServer::start();
    server.pause();
    let mut stream = TcpStream::connect(("127.0.0.1", server.port())).expect("kernel accepts");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    std::io::Write::write_all(&mut stream, b"PING\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    assert!(
        reader.read_line(&mut line).is_err(),
        "a paused server answers nothing"
    );
    server.resume();
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "+PONG\r\n");
}

#[test]
fn password_and_info_fields_are_available() {
    let server = RedisServer::config().password("pw").start();
    assert!(server.url().contains(":pw@"));
    let received: u64 = server
        .info_field("total_connections_received")
        .parse()
        .unwrap();
    assert!(received >= 1);
}

const CHILD: &str = "HARNESS_TEST_CHILD";

/// In a child process: start a server, report it, and die without running any Drop.
#[test]
fn child_that_aborts_with_a_running_server() {
    if std::env::var_os(CHILD).as_deref() != Some("abort".as_ref()) {
        return; // only meaningful when spawned by servers_die_with_the_test_process
    }
    let server = RedisServer::start();
    println!("SERVER {} {}", server.pid(), server.port());
    std::process::abort();
}

#[test]
fn servers_die_with_the_test_process() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_that_aborts_with_a_running_server",
            "--nocapture",
        ])
        .env(CHILD, "abort")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reader = BufReader::new(child.stdout.take().unwrap());
    let line = reader
        .lines()
        .map_while(Result::ok)
        .find(|line| line.starts_with("SERVER "))
        .expect("child reports its server");
    let mut parts = line.split_whitespace().skip(1);
    let pid: i32 = parts.next().unwrap().parse().unwrap();
    let port: u16 = parts.next().unwrap().parse().unwrap();
    assert!(!child.wait().unwrap().success(), "child aborted");

    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() || process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "server {pid} outlived its test process"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn process_alive(pid: i32) -> bool {
    // A zombie waiting to be reaped is dead for our purpose.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .split_whitespace()
            .nth(2)
            .is_none_or(|state| state != "Z"),
        Err(_) => false,
    }
}

#[test]
fn child_without_redis_server() {
    if std::env::var_os(CHILD).as_deref() != Some("missing".as_ref()) {
        return;
    }
    support::redis_server_binary();
}

#[test]
fn missing_redis_server_fails_with_one_clear_line() {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_without_redis_server", "--nocapture"])
        .env(CHILD, "missing")
        .env("PATH", "")
        .env_remove("REDIS_SERVER_BIN")
        .output()
        .unwrap();
    assert!(!output.status.success(), "the test fails, it does not skip");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("redis-server is not on PATH")
            && stderr.contains("apt-get install -y redis-server"),
        "{stderr}"
    );
}
