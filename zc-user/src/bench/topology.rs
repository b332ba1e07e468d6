//! Where the bench's client, relay and server live: all on loopback, or in
//! three network namespaces (client, relay, server) joined by veth pairs,
//! which the bench creates and removes itself.
use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use log::{debug, warn};

/// A named network namespace, held open by a file descriptor.
pub struct Netns {
    pub name: String,
    file: File,
}

impl Netns {
    /// Runs `f` with the calling thread inside this namespace. Sockets keep
    /// the namespace they were created in, so creating them here is enough.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let home = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        zc_user::sys::setns_net(&self.file)
            .with_context(|| format!("entering netns {}", self.name))?;
        let out = f();
        zc_user::sys::setns_net(&home).context("returning to the original netns")?;
        Ok(out)
    }
}

pub struct Topology {
    pub name: &'static str,
    pub client: Option<Netns>,
    pub relay: Option<Netns>,
    pub server: Option<Netns>,
    /// Address the server and the relays bind on; clients reach relays here.
    pub server_ip: IpAddr,
    pub relay_ip: IpAddr,
    created: Vec<String>,
}

/// Runs `f` in `ns` if there is one, else right here.
pub fn within<T>(ns: Option<&Netns>, f: impl FnOnce() -> T) -> Result<T> {
    match ns {
        Some(ns) => ns.run(f),
        None => Ok(f()),
    }
}

impl Topology {
    pub fn loopback() -> Self {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Self {
            name: "loopback",
            client: None,
            relay: None,
            server: None,
            server_ip: lo,
            relay_ip: lo,
            created: Vec::new(),
        }
    }

    /// client (10.211.1.1) -- veth -- relay (10.211.1.2 | 10.211.2.1)
    /// -- veth -- server (10.211.2.2). The relay namespace forwards, so a
    /// direct connection crosses the same two links as a relayed one.
    pub fn namespaces() -> Result<Self> {
        remove_stale();
        let tag = format!("zcb{}", std::process::id());
        let [c, r, s] = ["c", "r", "s"].map(|x| format!("{tag}{x}"));
        let mut topo = Self {
            name: "netns",
            client: None,
            relay: None,
            server: None,
            server_ip: IpAddr::V4(Ipv4Addr::new(10, 211, 2, 2)),
            relay_ip: IpAddr::V4(Ipv4Addr::new(10, 211, 1, 2)),
            created: Vec::new(),
        };
        for ns in [&c, &r, &s] {
            ip(&["netns", "add", ns])?;
            topo.created.push(ns.clone());
        }
        let (cr, rc, rs, sr) = (
            format!("{tag}cr"),
            format!("{tag}rc"),
            format!("{tag}rs"),
            format!("{tag}sr"),
        );
        let steps: Vec<Vec<&str>> = vec![
            vec![
                "link", "add", &cr, "netns", &c, "type", "veth", "peer", "name", &rc, "netns", &r,
            ],
            vec![
                "link", "add", &sr, "netns", &s, "type", "veth", "peer", "name", &rs, "netns", &r,
            ],
            vec!["-n", &c, "addr", "add", "10.211.1.1/24", "dev", &cr],
            vec!["-n", &r, "addr", "add", "10.211.1.2/24", "dev", &rc],
            vec!["-n", &r, "addr", "add", "10.211.2.1/24", "dev", &rs],
            vec!["-n", &s, "addr", "add", "10.211.2.2/24", "dev", &sr],
            vec!["-n", &c, "link", "set", &cr, "up"],
            vec!["-n", &r, "link", "set", &rc, "up"],
            vec!["-n", &r, "link", "set", &rs, "up"],
            vec!["-n", &s, "link", "set", &sr, "up"],
            vec!["-n", &c, "link", "set", "lo", "up"],
            vec!["-n", &r, "link", "set", "lo", "up"],
            vec!["-n", &s, "link", "set", "lo", "up"],
            vec!["-n", &c, "route", "add", "default", "via", "10.211.1.2"],
            vec!["-n", &s, "route", "add", "default", "via", "10.211.2.1"],
        ];
        for step in &steps {
            ip(step)?;
        }
        let fwd = Command::new("ip")
            .args(["netns", "exec", &r, "sh", "-c"])
            .arg("echo 1 > /proc/sys/net/ipv4/ip_forward")
            .status()
            .context("running ip netns exec")?;
        if !fwd.success() {
            bail!("could not enable forwarding in netns {r}");
        }
        let open = |n: &str| -> Result<Netns> {
            let file = File::open(format!("/run/netns/{n}"))
                .with_context(|| format!("opening /run/netns/{n}"))?;
            Ok(Netns {
                name: n.to_string(),
                file,
            })
        };
        topo.client = Some(open(&c)?);
        topo.relay = Some(open(&r)?);
        topo.server = Some(open(&s)?);
        Ok(topo)
    }

    /// Where a client reaches a server listening on `port` directly.
    pub fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server_ip, port)
    }

    /// The relay namespace's TCP sockets that hold bytes (`ss -tnim`: the
    /// state line with both queues, then TCP's own figures), to show where
    /// the bytes of a stream that stopped wait. Empty if `ss` is missing.
    pub fn queued_sockets(&self) -> Vec<String> {
        let text = self.relay_output(&["ss", "-tnim"]);
        let mut lines = text.lines().skip(1).peekable();
        let mut queued = Vec::new();
        while let Some(state) = lines.next() {
            // The figures continue on an indented line.
            let info = lines.next_if(|l| l.starts_with(char::is_whitespace));
            let f: Vec<&str> = state.split_whitespace().collect();
            let held = |i: usize| f.get(i).is_some_and(|q| *q != "0");
            if held(1) || held(2) {
                queued.push(format!("{} {}", state.trim(), info.unwrap_or("").trim()));
            }
        }
        queued
    }

    /// The relay namespace's TCP counters (`TcpExt` of /proc/net/netstat,
    /// e.g. TCPBacklogDrop), to tell why a stalled stream's segments go
    /// nowhere. Empty if they cannot be read.
    pub fn tcp_counters(&self) -> BTreeMap<String, u64> {
        parse_netstat(&self.relay_output(&["cat", "/proc/net/netstat"]), "TcpExt:")
    }

    /// What `command` prints run where the relay runs; empty if it cannot
    /// run (a diagnostic, never worth failing a bench for).
    fn relay_output(&self, command: &[&str]) -> String {
        let mut argv = self.relay_prefix();
        argv.extend(command.iter().map(|a| a.to_string()));
        let Some((prog, args)) = argv.split_first() else {
            return String::new();
        };
        Command::new(prog)
            .args(args)
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default()
    }

    /// `ip netns exec NS` for processes that run in the relay's place.
    pub fn relay_prefix(&self) -> Vec<String> {
        match &self.relay {
            Some(ns) => vec!["ip".into(), "netns".into(), "exec".into(), ns.name.clone()],
            None => Vec::new(),
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends inside it.
        for ns in self.created.drain(..) {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                warn!("could not remove netns {ns}: {e:#}");
            }
        }
    }
}

/// One section of /proc/net/netstat: a line of names, then one of values,
/// both starting with `section`.
fn parse_netstat(text: &str, section: &str) -> BTreeMap<String, u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(section));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return BTreeMap::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
        .collect()
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Namespaces left by a bench that was killed: `zcb<pid>x` whose pid is gone.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("zcb")
            .and_then(|r| r.get(..r.len().saturating_sub(1)))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            debug!("removing stale bench netns {name}");
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_netstat;

    #[test]
    fn netstat_sections_pair_names_with_values() {
        let text = "TcpExt: SyncookiesSent TCPBacklogDrop\nTcpExt: 0 17\n\
                    IpExt: InNoRoutes\nIpExt: 3\n";
        let c = parse_netstat(text, "TcpExt:");
        assert_eq!(c.len(), 2);
        assert_eq!(c["TCPBacklogDrop"], 17);
        assert_eq!(parse_netstat(text, "IpExt:")["InNoRoutes"], 3);
        assert!(parse_netstat("TcpExt: A\n", "TcpExt:").is_empty());
    }
}
