//! What the read commands answer: `zc status`, `zc stats`.
use std::sync::atomic::Ordering;

use super::{Agent, proto};
use crate::ebpf::Programs;

impl Agent {
    pub(super) fn status(&self) -> proto::AgentStatus {
        let pinned = self
            .pin_dir
            .as_ref()
            .and_then(|d| std::fs::read_dir(d).ok())
            .map(|d| {
                let mut v: Vec<String> = d
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        let (fins_held, fins_stripped, fins_requeued) = self
            .progs
            .as_ref()
            .and_then(Programs::fin_hold_counts)
            .unwrap_or_default();
        proto::AgentStatus {
            data_path: match &self.no_bpf {
                None => "bpf".into(),
                Some(why) => format!("splice ({why})"),
            },
            pid_pairing: self.no_bpf.as_ref().map(|why| format!("needs BPF ({why})")),
            tuple_pairing: self.no_recording.clone(),
            fin_hold: self.no_fin_hold.clone(),
            fins_held,
            fins_stripped,
            fins_requeued,
            short_circuit: self.no_short_circuit.clone(),
            pin_dir: self.pin_dir.as_ref().map(|d| d.display().to_string()),
            pinned,
            pairs: self.pairs().len(),
            metrics: self.metrics_addr.map(|a| a.to_string()),
        }
    }

    pub(super) fn short_circuit_totals(&self) -> Option<crate::ebpf::ShortCircuitTotals> {
        match (&self.progs, &self.no_short_circuit) {
            (Some(p), None) => p.short_circuit_totals(),
            _ => None,
        }
    }

    pub(super) fn stats(&self) -> Vec<proto::PairStats> {
        self.pairs()
            .values()
            .map(|e| {
                // What the kernel carried (BPF pairs) plus what user space
                // moved (splice and copy pairs, held BPF directions).
                let kernel = match &self.progs {
                    Some(progs) => e.keys.map(|k| progs.counters(&k).unwrap_or_default()),
                    None => Default::default(),
                };
                let c = [0, 1].map(|i| zc_common::Counters {
                    bytes: kernel[i].bytes
                        + e.counts
                            .as_ref()
                            .map_or(0, |n| n[i].load(Ordering::Relaxed)),
                    ..kernel[i]
                });
                proto::PairStats {
                    id: e.info.id,
                    sockets: e.info.sockets.clone(),
                    bytes: c.map(|c| c.bytes),
                    msgs: c.map(|c| c.msgs),
                    failed: c.map(|c| c.failed),
                }
            })
            .collect()
    }
}
