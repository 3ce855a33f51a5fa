//! `iptables` rules on loopback for the faults and counts a proxy cannot make: a port made
//! a black hole by the kernel (packets to and from it dropped, as when a host vanished,
//! powered off or cut off, or a middlebox forgot the flow: neither end is told anything,
//! and unlike a proxy that stops forwarding, nothing answers TCP's own probes either), and
//! the connections tried to a port that nothing listens on.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
};

/// `iptables`, or `sudo -n iptables` when not root.
fn iptables() -> &'static str {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        "iptables"
    } else {
        "sudo -n iptables"
    }
}

/// `iptables` rules (on `INPUT`) in place while it lives. They go when it is dropped, or
/// when the test process dies in any way: a `sh` watchdog holds a pipe from this process
/// and removes them when the pipe closes.
struct Rules {
    watchdog: Child,
}

impl Rules {
    /// Puts `rules` in place; panics saying what the test needs if it cannot.
    fn install(rules: &[String], test: &str) -> Rules {
        let iptables = iptables();
        let remove: Vec<String> = rules
            .iter()
            .map(|rule| format!("{iptables} -D {rule} 2>/dev/null"))
            .collect();
        let add: Vec<String> = rules
            .iter()
            .map(|rule| format!("{iptables} -I {rule}"))
            .collect();
        let script = format!(
            "trap '{}' EXIT; {} && echo on && read _",
            remove.join("; "),
            add.join(" && ")
        );
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut line = String::new();
        let _ = BufReader::new(watchdog.stdout.take().expect("piped")).read_line(&mut line);
        if line.trim() != "on" {
            let mut why = String::new();
            let _ = watchdog
                .stderr
                .take()
                .expect("piped")
                .read_to_string(&mut why);
            let _ = watchdog.wait();
            panic!(
                "this test {test} with iptables, which needs the `iptables` command \
                 (apt-get install -y iptables) and root: {}",
                why.trim()
            );
        }
        Rules { watchdog }
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        drop(self.watchdog.stdin.take()); // ends the `read`: the rules are removed
        let _ = self.watchdog.wait();
    }
}

/// While it lives, packets to and from a loopback port are dropped (two `iptables`
/// rules). Needs `iptables` and root (or `sudo` without a password).
pub struct Blackhole {
    _rules: Rules,
}

impl Blackhole {
    pub fn port(port: u16) -> Blackhole {
        let rules =
            ["--dport", "--sport"].map(|end| format!("INPUT -i lo -p tcp {end} {port} -j DROP"));
        Blackhole {
            _rules: Rules::install(&rules, "makes a port a black hole"),
        }
    }
}

/// Counts the connections tried to a loopback port from the moment it is made: the
/// `SYN`s that reach it, refused or not (an `iptables` rule that only counts). Needs
/// `iptables` and root (or `sudo` without a password).
pub struct ConnectAttempts {
    port: u16,
    _rules: Rules,
}

impl ConnectAttempts {
    pub fn to_port(port: u16) -> ConnectAttempts {
        let rule = format!("INPUT -i lo -p tcp --syn --dport {port} -j ACCEPT");
        ConnectAttempts {
            port,
            _rules: Rules::install(&[rule], "counts the connections tried to a port"),
        }
    }

    /// How many so far.
    pub fn count(&self) -> u64 {
        let listing = Command::new("sh")
            .arg("-c")
            .arg(format!("{} -L INPUT -v -x -n", iptables()))
            .output()
            .expect("run iptables");
        let listing = String::from_utf8_lossy(&listing.stdout);
        let rule = format!("tcp dpt:{} flags:", self.port);
        listing
            .lines()
            .filter(|line| line.contains("ACCEPT") && line.contains(&rule))
            .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}
