//! `zc agent --metrics`: what the agent holds and has done, in the
//! Prometheus text format (served by `crate::metrics`), and whether it is
//! serving, for `/healthz`.
//!
//! A scrape takes the pair table's lock (not one the data path takes)
//! for one map lookup per socket of each pair; the map fill is counted
//! through handles of its own, outside every lock.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use super::{
    Agent, Entry,
    proto::{ErrorKind, Request, Response},
    quiesce::Progress,
    sockopts::Saved,
};
use crate::{
    engine::Summary,
    metrics::{Family, Health, Render},
};

/// The reason a `--data-path splice` agent gives: asked for, not a
/// fallback.
pub const FORCED_SPLICE: &str = "--data-path splice";

/// Where the agent stands, for `/healthz`.
#[derive(Clone, Debug, Default)]
pub(super) enum State {
    #[default]
    Starting,
    Serving,
    /// accept() on the control socket fails (the error); requests wait.
    AcceptFailing(String),
    Stopping,
}

/// How a pairing request was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Paired,
    /// Refused for a reason of the request's (denied, not found, not
    /// pairable, malformed, busy).
    Refused,
    /// The agent or the kernel failed.
    Error,
}

impl Outcome {
    const ALL: [(Outcome, &'static str); 3] = [
        (Outcome::Paired, "ok"),
        (Outcome::Refused, "refused"),
        (Outcome::Error, "error"),
    ];

    /// The outcome of a pairing request answered `resp`; None for other
    /// requests.
    pub(super) fn of(req: &Request, resp: &Response) -> Option<Self> {
        if !matches!(
            req,
            Request::PairPid { .. } | Request::PairTuple { .. } | Request::Handoff
        ) {
            return None;
        }
        Some(match resp {
            Response::Error {
                kind: ErrorKind::Internal,
                ..
            } => Outcome::Error,
            Response::Error { .. } => Outcome::Refused,
            _ => Outcome::Paired,
        })
    }
}

/// Totals of pairs that have ended, per direction (0: first socket to
/// second).
#[derive(Clone, Copy, Debug, Default)]
struct Ended {
    kernel: [u64; 2],
    user: [u64; 2],
    holds: u64,
    small: u64,
}

/// The agent's counters that no map holds.
#[derive(Default)]
pub(super) struct Tally {
    requests: [AtomicU64; 3],
    adopted: AtomicU64,
    /// Changed only with the pair table locked, where a pair leaves it, so
    /// that a scrape never counts a pair both live and ended.
    ended: Mutex<Ended>,
    state: Mutex<State>,
    /// The last value each counter was shown with: a pair leaves the table
    /// a moment before its totals join `ended` (it is unpaired first, or
    /// its counters leave the maps first), and a counter must never seem
    /// to go back.
    shown: Mutex<HashMap<String, f64>>,
}

impl Tally {
    pub(super) fn request(&self, o: Outcome) {
        self.requests[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn adopted(&self) {
        self.adopted.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn set_state(&self, s: State) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// A pair's relay ended with `s`; `by_user` is what user space moved
    /// of it (the rest went through the kernel). Call with the pair table
    /// locked, as the pair leaves it.
    pub(super) fn pair_ended(&self, s: &Summary, by_user: [u64; 2]) {
        let mut e = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        for (i, moved) in [s.a_to_b, s.b_to_a].into_iter().enumerate() {
            e.kernel[i] += moved.saturating_sub(by_user[i]);
            e.user[i] += by_user[i].min(moved);
        }
        e.holds += s.holds;
        e.small += s.small;
    }

    /// `v`, or the highest value `series` was shown with if that is more.
    fn counter(&self, series: &str, v: f64) -> f64 {
        let mut shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        let last = shown.entry(series.to_string()).or_insert(v);
        *last = last.max(v);
        *last
    }
}

/// What the live pairs hold, read under the pair table's lock.
#[derive(Default)]
struct Live {
    pairs: usize,
    kernel: [u64; 2],
    user: [u64; 2],
    failed: u64,
    /// Pairs of another process's sockets: the agent's duplicates of them,
    /// what each had written at pairing, and what the verdict redirected
    /// each way.
    backlog_probes: Vec<(Arc<Saved>, [Progress; 2], [u64; 2])>,
}

impl Agent {
    /// `/metrics`, rendered anew on each scrape.
    pub fn metrics(self: &Arc<Self>) -> Render {
        let me = Arc::downgrade(self);
        Arc::new(move || me.upgrade().map(|a| a.render()).unwrap_or_default())
    }

    /// `/healthz`: healthy while the agent accepts control connections.
    pub fn health(self: &Arc<Self>) -> Health {
        let me = Arc::downgrade(self);
        Arc::new(move || {
            let Some(a) = me.upgrade() else {
                return Err("the agent has stopped".into());
            };
            let state = a
                .tally
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            match state {
                State::Serving => Ok(()),
                State::Starting => Err("starting".into()),
                State::Stopping => Err("stopping".into()),
                State::AcceptFailing(e) => Err(format!(
                    "accepting control connections fails: {e}; retrying"
                )),
            }
        })
    }

    fn live(&self) -> (Live, Ended) {
        let pairs = self.pairs();
        let mut live = Live {
            pairs: pairs.len(),
            ..Live::default()
        };
        for e in pairs.values() {
            let mut sent = [0u64; 2];
            for i in 0..2 {
                if let Some(p) = &self.progs {
                    sent[i] = p.flow(&e.keys[i]).map_or(0, |f| f.sent);
                    live.failed += p.counters(&e.keys[i]).map_or(0, |c| c.failed);
                }
                live.kernel[i] += sent[i];
                live.user[i] += e
                    .counts
                    .as_ref()
                    .map_or(0, |c| c[i].load(Ordering::Relaxed));
            }
            if let Entry {
                saved: Some(saved),
                before: Some(before),
                ..
            } = e
            {
                live.backlog_probes.push((saved.clone(), *before, sent));
            }
        }
        let ended = *self.tally.ended.lock().unwrap_or_else(|p| p.into_inner());
        (live, ended)
    }

    fn render(&self) -> String {
        let (live, ended) = self.live();
        let t = &self.tally;
        let mut out = String::new();

        let (path, reason) = match &self.no_bpf {
            None => ("bpf", "bpf_loaded"),
            Some(why) if why == FORCED_SPLICE => ("splice", "forced"),
            Some(_) => ("splice", "bpf_unavailable"),
        };
        Family::new(
            &mut out,
            "zc_agent_data_path_info",
            "gauge",
            "The data path the agent runs with, and why: bpf_loaded, forced (--data-path splice), or bpf_unavailable (a fallback; the start log says why).",
        )
        .sample(&[("path", path), ("reason", reason)], 1.0);
        let on = |off: &Option<String>| if off.is_none() { 1.0 } else { 0.0 };
        Family::new(
            &mut out,
            "zc_agent_feature_enabled",
            "gauge",
            "Whether each way of pairing and each safeguard works here (0: off; `zc status` says why).",
        )
        .sample(&[("feature", "pid_pairing")], on(&self.no_bpf))
        .sample(&[("feature", "tuple_pairing")], on(&self.no_recording))
        .sample(&[("feature", "fin_hold")], on(&self.no_fin_hold))
        .sample(&[("feature", "short_circuit")], on(&self.no_short_circuit));

        Family::new(
            &mut out,
            "zc_agent_pairs_open",
            "gauge",
            "Pairs the agent holds now (adopted ones included).",
        )
        .sample(&[], live.pairs as f64);
        let paired = t.requests[Outcome::Paired as usize].load(Ordering::Relaxed);
        Family::new(
            &mut out,
            "zc_agent_pairs_total",
            "counter",
            "Pairs since the agent started: made on request, or adopted from the pinned maps at start.",
        )
        .sample(&[("source", "paired")], paired as f64)
        .sample(
            &[("source", "adopted")],
            t.adopted.load(Ordering::Relaxed) as f64,
        );
        let mut requests = Family::new(
            &mut out,
            "zc_agent_pair_requests_total",
            "counter",
            "Pairing requests (pid/fd, tuple, handoff) by answer: ok, refused (the request's fault), error (the agent's or the kernel's).",
        );
        for (o, name) in Outcome::ALL {
            requests.sample(
                &[("result", name)],
                t.requests[o as usize].load(Ordering::Relaxed) as f64,
            );
        }

        let mut bytes = Family::new(
            &mut out,
            "zc_agent_bytes_total",
            "counter",
            "Bytes the agent's pairs moved, by direction (first socket of the request to second, and back) and data path: kernel (the BPF redirect), user (a held direction forwarded in user space), splice (the splice data path without BPF).",
        );
        let user_path = if self.progs.is_some() {
            "user"
        } else {
            "splice"
        };
        for (i, dir) in ["first_to_second", "second_to_first"]
            .into_iter()
            .enumerate()
        {
            for (p, v) in [
                ("kernel", live.kernel[i] + ended.kernel[i]),
                ("user", 0),
                ("splice", 0),
            ] {
                let v = if p == user_path {
                    live.user[i] + ended.user[i]
                } else {
                    v
                };
                let key = format!("bytes/{dir}/{p}");
                bytes.sample(
                    &[("direction", dir), ("path", p)],
                    t.counter(&key, v as f64),
                );
            }
        }
        let failed = live.failed + self.progs.as_ref().map_or(0, |p| p.retired_failures());
        Family::new(
            &mut out,
            "zc_agent_redirect_failures_total",
            "counter",
            "Redirects the kernel refused (the destination failed or was gone).",
        )
        .sample(&[], t.counter("failed", failed as f64));
        Family::new(
            &mut out,
            "zc_agent_switches_total",
            "counter",
            "Times a direction of an ended pair moved to user space: held for a slow reader (window), or for small segments.",
        )
        .sample(&[("reason", "window")], ended.holds as f64)
        .sample(&[("reason", "small_segments")], ended.small as f64);

        let (held, stripped, requeued) = self
            .progs
            .as_ref()
            .and_then(|p| p.fin_hold_counts())
            .unwrap_or_default();
        Family::new(
            &mut out,
            "zc_agent_fin_hold_total",
            "counter",
            "What the FIN hold did: FINs held until the peer's queue emptied, FINs taken off data segments, held FINs sent round again.",
        )
        .sample(&[("action", "held")], held as f64)
        .sample(&[("action", "stripped")], stripped as f64)
        .sample(&[("action", "requeued")], requeued as f64);

        Family::new(
            &mut out,
            "zc_agent_kernel_backlog_bytes",
            "gauge",
            "Bytes the kernel redirected and the destination socket has not taken yet, summed over pairs of another process's sockets (handed-over and adopted pairs are not counted).",
        )
        .sample(&[], backlog(&live.backlog_probes) as f64);

        let fill = self
            .progs
            .as_ref()
            .map(|p| p.map_fill())
            .unwrap_or_default();
        let mut used = Family::new(
            &mut out,
            "zc_agent_map_entries",
            "gauge",
            "Entries in the maps that hold pairs (PEERS, two per pair), sockets being paired or paired (TARGETS) and sockets recorded by 4-tuple (RECORDED).",
        );
        for (name, n, _) in &fill {
            used.sample(&[("map", name)], *n as f64);
        }
        let mut cap = Family::new(
            &mut out,
            "zc_agent_map_capacity",
            "gauge",
            "The most entries each of those maps takes.",
        );
        for (name, _, c) in &fill {
            cap.sample(&[("map", name)], f64::from(*c));
        }
        out
    }
}

/// Per direction: what the verdict redirected less what the destination
/// has taken since pairing (into its send queue or acknowledged).
fn backlog(probes: &[(Arc<Saved>, [Progress; 2], [u64; 2])]) -> u64 {
    use std::os::fd::AsFd as _;
    let mut sum = 0;
    for (saved, before, sent) in probes {
        for (src, redirected) in sent.iter().enumerate() {
            let dst = 1 - src;
            let Ok(written) = crate::sys::bytes_written(saved.socks()[dst].as_fd()) else {
                continue;
            };
            let taken = written.saturating_sub(before[dst].written);
            sum += redirected.saturating_sub(taken);
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{DataPath, Options};

    #[test]
    fn healthz_is_ok_only_while_the_agent_serves() {
        let a = Agent::new(DataPath::Splice(FORCED_SPLICE.into()), Options::default());
        let health = a.health();
        assert_eq!(health(), Err("starting".to_string()));
        a.tally.set_state(State::Serving);
        assert_eq!(health(), Ok(()));
        a.tally
            .set_state(State::AcceptFailing("Too many open files".into()));
        let why = health().expect_err("accept() fails");
        assert!(why.contains("Too many open files"), "{why}");
        a.tally.set_state(State::Stopping);
        assert_eq!(health(), Err("stopping".to_string()));
        drop(a);
        assert!(health().is_err(), "a dropped agent is healthy");
    }

    #[test]
    fn a_splice_agent_says_so_and_counts_what_ended() {
        let a = Agent::new(DataPath::Splice(FORCED_SPLICE.into()), Options::default());
        a.tally.pair_ended(
            &Summary {
                a_to_b: 10,
                b_to_a: 7,
                ..Summary::default()
            },
            [10, 7],
        );
        let text = (a.metrics())();
        for line in [
            "zc_agent_data_path_info{path=\"splice\",reason=\"forced\"} 1",
            "zc_agent_bytes_total{direction=\"first_to_second\",path=\"splice\"} 10",
            "zc_agent_bytes_total{direction=\"second_to_first\",path=\"splice\"} 7",
            "zc_agent_bytes_total{direction=\"first_to_second\",path=\"kernel\"} 0",
            "zc_agent_feature_enabled{feature=\"pid_pairing\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }

    #[test]
    fn a_counter_never_goes_back() {
        let t = Tally::default();
        assert_eq!(t.counter("x", 5.0), 5.0);
        assert_eq!(t.counter("x", 3.0), 5.0);
        assert_eq!(t.counter("x", 8.0), 8.0);
    }
}
