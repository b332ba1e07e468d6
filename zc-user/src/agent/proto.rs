//! The control protocol between `zc` commands and `zc agent`: one JSON
//! object per SOCK_SEQPACKET message for a request, so a message is never
//! split or merged and a truncated one is detectable; a response is one
//! JSON object split into messages of `control::REPLY_CHUNK` bytes, ended
//! by the first shorter one.
use serde::{Deserialize, Serialize};

/// Largest request the agent reads; anything longer is refused whole.
pub const MAX_REQUEST: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Pair two sockets of a running process, taken with pidfd_getfd.
    PairPid { pid: i32, fds: [i32; 2] },
    /// Pair two sockets recorded by sock_ops, named LOCAL-REMOTE as `ss`
    /// prints them. Root or the agent's group only. `netns` names the
    /// network namespace they live in, by a pid in it or a path such as
    /// /run/netns/NAME (default: the agent's).
    PairTuple {
        sockets: [String; 2],
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    /// End a pairing; the sockets go back to their owner untouched.
    Unpair { id: u64 },
    /// The current pairings.
    List,
    /// Bytes and messages each pair moved, per direction.
    Stats,
    /// What the agent can do here and why, and what it has pinned.
    Status,
    /// Take over two connected sockets sent with the request (SCM_RIGHTS):
    /// from now on the agent moves their bytes and closes them.
    Handoff,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Paired {
        id: u64,
        pair: PairInfo,
    },
    Unpaired {
        id: u64,
        /// How the pair's connections ended.
        #[serde(default)]
        how: String,
    },
    Pairs {
        pairs: Vec<PairInfo>,
    },
    Stats {
        pairs: Vec<PairStats>,
        /// What the same-host short-circuit carried, when it is on.
        #[serde(default)]
        short_circuit: Option<crate::ebpf::ShortCircuitTotals>,
    },
    Status(AgentStatus),
    Error {
        kind: ErrorKind,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairInfo {
    pub id: u64,
    /// Where the sockets came from, e.g. "pid 4242 fds 5,7".
    pub source: String,
    /// Each socket as `ss` prints it: local-remote.
    pub sockets: [String; 2],
}

/// `zc status` for a running agent: each way of pairing, available or
/// why not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// "bpf", or "splice (why)".
    pub data_path: String,
    /// None: available; else why not.
    pub pid_pairing: Option<String>,
    pub tuple_pairing: Option<String>,
    pub fin_hold: Option<String>,
    /// Bare FINs the hold dropped until the peer's queue emptied, and FINs
    /// it took off data segments (0 when it is off).
    #[serde(default)]
    pub fins_held: u64,
    #[serde(default)]
    pub fins_stripped: u64,
    /// Copies of held FINs the hold sent round the device's backlog.
    #[serde(default)]
    pub fins_requeued: u64,
    /// None: the same-host short-circuit is on; else why not.
    #[serde(default)]
    pub short_circuit: Option<String>,
    pub pin_dir: Option<String>,
    pub pinned: Vec<String>,
    pub pairs: usize,
    /// Where `--metrics` is served (the address bound), if it is.
    #[serde(default)]
    pub metrics: Option<String>,
}

/// What the kernel moved for one pair, from the verdict's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairStats {
    pub id: u64,
    pub sockets: [String; 2],
    /// Bytes that arrived on socket 0 and left through socket 1, and back.
    pub bytes: [u64; 2],
    /// Redirect calls (skbs) per direction.
    pub msgs: [u64; 2],
    /// Redirects that failed (the peer was gone), per direction.
    pub failed: [u64; 2],
}

/// What went wrong, for callers that branch; the message says it to people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request could not be read: oversized, truncated, not JSON, or
    /// not a known request.
    Malformed,
    /// The requester may not do this.
    Denied,
    /// A named process, fd, socket or pair does not exist.
    NotFound,
    /// The sockets exist but cannot be paired as asked.
    Invalid,
    /// The agent or the kernel failed.
    Internal,
    /// The requester is at its share of the agent (control connections
    /// open); retry once one of its connections has closed.
    Busy,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty request")]
    Empty,
    #[error("request larger than {MAX_REQUEST} bytes")]
    Oversized,
    #[error("request is not valid JSON for any known operation: {0}")]
    Invalid(String),
    #[error("fd numbers must be non-negative, not {0}")]
    NegativeFd(i32),
    #[error("pid must be positive, not {0}")]
    BadPid(i32),
    #[error("both fds are {0}: a socket cannot be paired with itself")]
    SameFd(i32),
}

/// Decodes one request message. `truncated` is whether the kernel cut the
/// message (MSG_TRUNC): such a request is refused, never half-read.
pub fn decode(msg: &[u8], truncated: bool) -> Result<Request, DecodeError> {
    if truncated || msg.len() > MAX_REQUEST {
        return Err(DecodeError::Oversized);
    }
    if msg.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::Empty);
    }
    let req: Request =
        serde_json::from_slice(msg).map_err(|e| DecodeError::Invalid(e.to_string()))?;
    if let Request::PairPid { pid, fds } = &req {
        if *pid <= 0 {
            return Err(DecodeError::BadPid(*pid));
        }
        if let Some(&fd) = fds.iter().find(|&&f| f < 0) {
            return Err(DecodeError::NegativeFd(fd));
        }
        if fds[0] == fds[1] {
            return Err(DecodeError::SameFd(fds[0]));
        }
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_requests_decode() {
        assert_eq!(
            decode(br#"{"op":"pair_pid","pid":42,"fds":[5,7]}"#, false),
            Ok(Request::PairPid {
                pid: 42,
                fds: [5, 7]
            })
        );
        assert_eq!(decode(br#"{"op":"list"}"#, false), Ok(Request::List));
        assert_eq!(decode(br#"{"op":"stats"}"#, false), Ok(Request::Stats));
        assert_eq!(
            decode(br#"{"op":"unpair","id":3}"#, false),
            Ok(Request::Unpair { id: 3 })
        );
    }

    #[test]
    fn malformed_requests_get_precise_errors() {
        assert_eq!(decode(b"", false), Err(DecodeError::Empty));
        assert_eq!(decode(b"{}", true), Err(DecodeError::Oversized));
        assert_eq!(
            decode(&vec![b' '; MAX_REQUEST + 1], false),
            Err(DecodeError::Oversized)
        );
        assert_eq!(
            decode(br#"{"op":"pair_pid","pid":0,"fds":[5,7]}"#, false),
            Err(DecodeError::BadPid(0))
        );
        assert_eq!(
            decode(br#"{"op":"pair_pid","pid":9,"fds":[5,-1]}"#, false),
            Err(DecodeError::NegativeFd(-1))
        );
        assert_eq!(
            decode(br#"{"op":"pair_pid","pid":9,"fds":[5,5]}"#, false),
            Err(DecodeError::SameFd(5))
        );
        for bad in [
            &br#"{"op":"pair_pid","pid":9,"fds":[5]}"#[..],
            br#"{"op":"pair_pid","pid":9,"fds":[5,6],"x":1}"#,
            br#"{"op":"launch_missiles"}"#,
            br#"{"op":"pair_pid","pid":99999999999,"fds":[1,2]}"#,
            br#"{"op":"list""#,
            b"\xff\xfe",
        ] {
            assert!(
                matches!(decode(bad, false), Err(DecodeError::Invalid(_))),
                "{:?} was not refused as invalid",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Random and mutated inputs never panic the decoder and never decode
    /// to a pairing that fails the checks above.
    #[test]
    fn decoder_survives_random_and_mutated_input() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let seeds: [&[u8]; 3] = [
            br#"{"op":"pair_pid","pid":42,"fds":[5,7]}"#,
            br#"{"op":"unpair","id":3}"#,
            br#"{"op":"list"}"#,
        ];
        for i in 0..200_000 {
            let mut msg = seeds[i % seeds.len()].to_vec();
            if i % 5 == 0 {
                let len = rng.random_range(0..64);
                msg = (0..len).map(|_| rng.random()).collect();
            } else {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..msg.len());
                    match rng.random_range(0..3) {
                        0 => msg[at] = rng.random(),
                        1 => {
                            msg.remove(at);
                        }
                        _ => msg.insert(at, rng.random()),
                    }
                    if msg.is_empty() {
                        break;
                    }
                }
            }
            if let Ok(Request::PairPid { pid, fds }) = decode(&msg, false) {
                assert!(pid > 0 && fds[0] >= 0 && fds[1] >= 0 && fds[0] != fds[1]);
            }
        }
    }
}
