//! The adaptive path (`--mode auto`): when a direction's skbs are small
//! enough that user space, where one read takes many of them, carries
//! them cheaper than the kernel's redirect, and when they are bulk again.
//! The move itself is the window's hold (see `switch`).
use super::{BpfEngine, Pair};

/// Default size below which a direction's average skb counts as small and
/// the direction is moved to user space (`--mode auto`). Each skb the
/// kernel redirects costs a verdict run, a queue operation and a share of
/// a worker wake-up, and leaves as a segment of its own; user space reads
/// many small skbs at once and writes them as one. Measured in
/// BENCHMARKS.md ("adaptive path", tuning logs 16 and 21).
///
/// Not 32 KiB: writes larger than a segment arrive as full skbs
/// alternating with each write's remainder, so a bulk stream of 64 KiB
/// writes averages half a full skb, 32,514-32,768 bytes on loopback and
/// across namespaces, and at 32 KiB moved to user space and back many
/// times a second. 16 KiB writes average 19.8-24.6 KB (medians), 1 KiB
/// writes 1-17 KB.
pub const DEFAULT_SMALL_SKB: u64 = 28 << 10;

/// The average passed-skb size at which a direction moved to user space
/// for its small skbs goes back to the kernel: twice the threshold, but no
/// more than nearly full 64 KiB skbs, or a bulk stream could never return.
/// (Skbs a user-space reader leaves in the queue coalesce, so they come
/// out larger than the same traffic's skbs on the kernel path: a
/// threshold without this gap flips the direction back and forth.)
pub(super) fn back_to_kernel_at(small_skb: u64) -> u64 {
    (2 * small_skb).min(60 << 10).max(small_skb)
}

/// How long a direction moved for its small skbs stays in user space,
/// in bytes forwarded, before the size of what the verdict passes may
/// send it back. Passed skbs coalesce while the reader lags (TCP merges
/// what waits for a busy socket), so 16 KiB writes looked like bulk in
/// user space (60-260 KB) and like small segments in the kernel (24.5
/// KB): 29 moves out and back in one second. So the stay doubles each
/// time a direction comes back for small skbs soon after it left, up to
/// [`MAX_DWELL`], and starts again at one sample once it stayed away.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dwell {
    /// Bytes to forward before a look at the passed skbs counts.
    bytes: u64,
    /// The direction's redirected total when it last came back from
    /// user space, if it did.
    back_at: Option<u64>,
    /// Whether the running forwarder came for small skbs.
    small: bool,
}

impl Default for Dwell {
    fn default() -> Self {
        Self {
            bytes: ADAPT_SAMPLE,
            back_at: None,
            small: false,
        }
    }
}

impl Dwell {
    /// The direction moves to user space for its small skbs, having
    /// redirected `sent` in all: returns how much it forwards first.
    pub(super) fn leave(&mut self, sent: u64) -> u64 {
        self.small = true;
        self.bytes = match self.back_at {
            Some(at) if sent.saturating_sub(at) < FLAP => (2 * self.bytes).min(MAX_DWELL),
            _ => ADAPT_SAMPLE,
        };
        self.bytes
    }

    /// A forwarder ended, with the direction's redirected total at `sent`.
    pub(super) fn ended(&mut self, sent: u64) {
        if std::mem::take(&mut self.small) {
            self.back_at = Some(sent);
        }
    }
}

/// Redirected bytes within which a direction that came back from user
/// space and leaves again for small skbs counts as flapping.
const FLAP: u64 = 64 << 20;

/// The longest stay in user space, in bytes forwarded, before a bulk
/// stream that had flapped may go back to the kernel.
const MAX_DWELL: u64 = 256 << 20;

impl BpfEngine {
    /// The redirected-skb total at which the verdict should next report a
    /// socket that has sent `f` so far: soon when adaptive, so a direction
    /// of small skbs is found long before a window of them has passed.
    pub(super) fn msg_limit(&self, f: zc_common::Flow) -> u64 {
        if self.small_skb == 0 || self.window == 0 {
            u64::MAX
        } else {
            f.sent_msgs + ADAPT_MSGS
        }
    }
}

/// Redirected skbs between looks at a direction's average skb size.
pub(super) const ADAPT_MSGS: u64 = 512;

/// Bytes a small-skb direction forwards between looks at the size of what
/// the verdict passes.
pub(super) const ADAPT_SAMPLE: u64 = 1 << 20;

impl Pair<'_> {
    /// The average size of the skbs the verdict redirected from `src`
    /// since its last report, when adaptive and below the threshold in
    /// this sample and the one before.
    ///
    /// One sample is not enough: the first after a hold, or after the
    /// start of a stream, can average a few KB for bulk traffic (3.3-4.5
    /// KB seen for 64 KiB writes both ways on a busy host), and moved
    /// such streams to user space and back. Small writes stay small for
    /// sample after sample.
    pub(super) fn small_segments(&mut self, src: usize) -> Option<u64> {
        if self.engine.small_skb == 0 || self.engine.window == 0 {
            return None;
        }
        let now = self.engine.progs.flow(&self.keys[src])?;
        let now = (now.sent, now.sent_msgs);
        let last = std::mem::replace(&mut self.sampled[src], now);
        let (bytes, msgs) = (now.0 - last.0, now.1 - last.1);
        let avg = bytes.checked_div(msgs)?;
        let small = avg < self.engine.small_skb;
        let before = std::mem::replace(&mut self.small_before[src], small);
        (small && before).then_some(avg)
    }
}
