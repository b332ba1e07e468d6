//! Network namespaces a test makes for itself and removes after.
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// A network namespace made for the test (`ip netns add`), with its
/// loopback up; removed when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("zc-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread that entered the namespace: sockets it makes
    /// and processes it starts live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = std::fs::File::open(self.path()).expect("opening the namespace");
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("entering the namespace");
                f()
            })
            .join()
            .expect("the namespace thread panicked")
        })
    }
}

/// A namespace joined to this one by a veth pair on a /30 of its own:
/// `host_ip` on `host_if` here, `ns_ip` inside. A process in the
/// namespace has every port to itself, so a program that cannot listen on
/// port 0 (iperf3) can take a fixed one there without racing anyone.
pub struct Veth {
    pub ns: Netns,
    pub host_if: String,
    pub ns_if: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

impl Veth {
    pub fn new(tag: &str) -> Self {
        // Named and numbered after the pid and a count, so parallel tests
        // and parallel runs differ (interface names stop at 15 bytes).
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = std::process::id();
        let ns = Netns::new(&format!("{tag}{n}"));
        let (host_if, ns_if) = (format!("zv{id}x{n}h"), format!("zv{id}x{n}n"));
        let index = (id.wrapping_mul(8).wrapping_add(n) % 16_384) * 4;
        let base = u32::from(Ipv4Addr::new(10, 213, 0, 0)) + index;
        let (host_ip, ns_ip) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &ns.name,
        ]);
        let veth = Self {
            ns,
            host_if,
            ns_if,
            host_ip,
            ns_ip,
        };
        ip(&[
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &veth.host_if,
        ]);
        ip(&["link", "set", &veth.host_if, "up"]);
        let name = veth.ns.name.clone();
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &veth.ns_if,
        ]);
        ip(&["-n", &name, "link", "set", &veth.ns_if, "up"]);
        veth
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Removing either end removes the pair; the namespace goes after.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
    }
}

/// Runs `ip ARGS` and fails the test with its error if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
