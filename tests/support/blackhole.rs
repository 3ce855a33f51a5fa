//! A port made a black hole by the kernel: packets to and from it are dropped, as when
//! a host vanished (powered off, cut off) or a middlebox forgot the flow. Neither end is
//! told anything, and unlike a proxy that stops forwarding, nothing answers TCP's own
//! probes either.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
};

/// While it lives, packets to and from a loopback port are dropped (two `iptables`
/// rules). Needs `iptables` and root (or `sudo` without a password). The rules go when
/// it is dropped, or when the test process dies in any way: a `sh` watchdog holds a pipe
/// from this process and removes them when the pipe closes.
pub struct Blackhole {
    watchdog: Child,
}

impl Blackhole {
    pub fn port(port: u16) -> Blackhole {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let iptables = if root { "iptables" } else { "sudo -n iptables" };
        let rules =
            ["--dport", "--sport"].map(|end| format!("INPUT -i lo -p tcp {end} {port} -j DROP"));
        let script = format!(
            "trap '{iptables} -D {0} 2>/dev/null; {iptables} -D {1} 2>/dev/null' EXIT; \
             {iptables} -I {0} && {iptables} -I {1} && echo on && read _",
            rules[0], rules[1]
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
                "this test makes a port a black hole with iptables, which needs the \
                 `iptables` command (apt-get install -y iptables) and root: {}",
                why.trim()
            );
        }
        Blackhole { watchdog }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        drop(self.watchdog.stdin.take()); // ends the `read`: the rules are removed
        let _ = self.watchdog.wait();
    }
}
