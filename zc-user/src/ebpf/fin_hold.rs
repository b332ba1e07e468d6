//! The FIN hold (`zc_fin_hold`, tc ingress): for the agent's pairs, a FIN
//! waits until the peer has taken every byte redirected before it.
use aya::programs::{SchedClassifier, TcAttachType, links::FdLink};
use std::os::fd::BorrowedFd;

use log::{debug, warn};

use super::{LoadError, Programs};

/// File names of the FIN hold's pinned links start with this, followed by
/// the interface index (bpffs refuses dots, which interface names may hold).
pub const HOLD_LINK_PREFIX: &str = "fin_hold_";

impl Programs {
    /// Loads `zc_fin_hold` and attaches it to the ingress of every network
    /// interface (tcx links, which leave other tc programs alone): from
    /// now on a FIN for a socket paired with [`Self::pair_foreign`] waits
    /// until its peer has taken every redirected byte. Needs the kernel's
    /// BTF for two struct offsets.
    pub fn enable_fin_hold(&self) -> Result<(), LoadError> {
        let hold = |e: anyhow::Error| LoadError::Hold(format!("{e:#}"));
        let o = crate::btf::Offsets::of_running_kernel(&[
            ("sock", "sk_user_data"),
            ("sk_psock", "ingress_skb"),
            ("sk_buff_head", "qlen"),
            ("sock_common", "skc_net"),
            ("net", "net_cookie"),
        ])
        .map_err(hold)?;
        let user_data = o.get("sock", "sk_user_data").map_err(hold)?;
        let qlen = o.get("sk_psock", "ingress_skb").map_err(hold)?
            + o.get("sk_buff_head", "qlen").map_err(hold)?;
        // `skc_net` is a possible_net_t, whose only member is the pointer.
        let skc_net = o.get("sock_common", "skc_net").map_err(hold)?;
        let net_cookie = o.get("net", "net_cookie").map_err(hold)?;
        let mut ebpf = self.ebpf();
        {
            let mut config: aya::maps::Array<_, u64> = aya::maps::Array::try_from(
                ebpf.map_mut("HOLD_CONFIG")
                    .ok_or(LoadError::MissingMap("HOLD_CONFIG"))?,
            )
            .map_err(|e| LoadError::MapType("HOLD_CONFIG", e))?;
            for (i, v) in [(0, user_data), (1, qlen), (2, skc_net), (3, net_cookie)] {
                config
                    .set(i, u64::from(v), 0)
                    .map_err(|e| LoadError::MapType("HOLD_CONFIG", e))?;
            }
        }
        let prog: &mut SchedClassifier = ebpf
            .program_mut("zc_fin_hold")
            .ok_or(LoadError::MissingProgram("zc_fin_hold"))?
            .try_into()
            .map_err(|e| LoadError::Program("zc_fin_hold", e))?;
        prog.load()
            .map_err(|e| LoadError::Program("zc_fin_hold", e))?;
        drop(ebpf);
        // An earlier agent's hold, kept by its pins, gives way to this one.
        if let Some(dir) = &self.pin_dir {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(HOLD_LINK_PREFIX)
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.refresh_fin_hold();
        Ok(())
    }

    /// Attaches the FIN hold to interfaces that appeared since it was
    /// enabled (a no-op when it is not). Interfaces whose link-layer
    /// header length is unknown are skipped, with a warning.
    pub fn refresh_fin_hold(&self) {
        match crate::sys::own_netns() {
            Ok(ns) => self.attach_hold_here(ns, true),
            Err(e) => warn!("FIN hold: reading this process's network namespace: {e}"),
        }
    }

    /// Makes sure the FIN hold covers the network namespace `sock` lives
    /// in: a proxy in a container or pod has interfaces of its own, which
    /// the agent's namespace does not show. Its interfaces are attached
    /// from a thread that enters that namespace for the purpose (a no-op
    /// when the hold is not enabled, or the namespace is the agent's).
    ///
    /// Fails when the hold is on but cannot reach that namespace: paired
    /// without it, a proxy that shuts down on EOF would cut its streams.
    pub fn fin_hold_for(&self, sock: BorrowedFd<'_>) -> Result<(), String> {
        if !self.fin_hold_loaded() {
            return Ok(());
        }
        let own = crate::sys::own_netns()
            .map_err(|e| format!("reading the agent's network namespace: {e}"))?;
        let (ns_fd, ns) = crate::sys::netns_of(sock)
            .map_err(|e| format!("finding the sockets' network namespace: {e}"))?;
        if ns == own {
            self.refresh_fin_hold();
            return Ok(());
        }
        let me = self.clone();
        // A thread of its own: setns changes only the calling thread, and
        // this one is thrown away after, so no task of the runtime ever
        // runs in the other namespace.
        let entered = std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&ns_fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
                me.attach_hold_here(ns, false);
                Ok::<_, nix::Error>(())
            })
            .join()
        });
        match entered {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!(
                "the sockets live in another network namespace (inode {ns}, a container's?), \
                 and entering it to attach the FIN hold there failed: {e}; the agent needs \
                 CAP_SYS_ADMIN for that"
            )),
            Err(_) => Err(format!(
                "attaching the FIN hold in network namespace {ns} panicked"
            )),
        }
    }

    /// Whether `zc_fin_hold` is loaded ([`Self::enable_fin_hold`]).
    fn fin_hold_loaded(&self) -> bool {
        let mut ebpf = self.ebpf();
        ebpf.program_mut("zc_fin_hold")
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .is_some_and(|p| p.fd().is_ok())
    }

    /// Attaches the hold to every interface of the calling thread's
    /// network namespace (`netns`, `own`: the agent's) not attached yet.
    fn attach_hold_here(&self, netns: u64, own: bool) {
        let mut ebpf = self.ebpf();
        let Some(Ok(prog)) = ebpf
            .program_mut("zc_fin_hold")
            .map(<&mut SchedClassifier>::try_from)
        else {
            return;
        };
        if prog.fd().is_err() {
            return;
        }
        let mut attached = self.hold_ifaces.lock().unwrap_or_else(|p| p.into_inner());
        for (index, name) in crate::sys::interfaces() {
            if attached.contains(&(netns, index)) {
                continue;
            }
            if crate::sys::link_header_len(&name).is_none() {
                warn!("FIN hold: interface {name} has an unknown link type, not attached");
                attached.insert((netns, index));
                continue;
            }
            match prog.attach(&name, TcAttachType::Ingress) {
                Ok(id) => {
                    debug!("FIN hold attached to {name}");
                    if let Some(dir) = &self.pin_dir {
                        // Interface numbers repeat across namespaces.
                        let path = dir.join(if own {
                            format!("{HOLD_LINK_PREFIX}{index}")
                        } else {
                            format!("{HOLD_LINK_PREFIX}{netns}_{index}")
                        });
                        let pinned = prog
                            .take_link(id)
                            .map_err(|e| format!("{e:#}"))
                            .and_then(|l| FdLink::try_from(l).map_err(|e| format!("{e:#}")))
                            .and_then(|l| l.pin(&path).map_err(|e| format!("{e:#}")));
                        if let Err(e) = pinned {
                            // The failed pin dropped the link: attach again,
                            // held by this process only.
                            warn!(
                                "FIN hold on {name}: pinning its link at {} failed ({e}); \
                                 it ends with this process",
                                path.display()
                            );
                            if let Err(e) = prog.attach(&name, TcAttachType::Ingress) {
                                warn!("FIN hold: attaching to {name} failed: {e}");
                            }
                        }
                    }
                }
                Err(e) => warn!("FIN hold: attaching to {name} failed: {e}"),
            }
            attached.insert((netns, index));
        }
    }

    /// What the FIN hold did so far: FINs dropped until the peer's queue
    /// emptied, FINs taken off data segments, and copies of held FINs sent
    /// round the device's backlog instead of waiting for TCP to resend.
    pub fn fin_hold_counts(&self) -> Option<(u64, u64, u64)> {
        let ebpf = self.ebpf();
        let stats = aya::maps::PerCpuArray::<_, u64>::try_from(ebpf.map("HOLD_STATS")?).ok()?;
        let sum = |i| stats.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
        Some((sum(0), sum(1), sum(2)))
    }
}
