//! Ending a pair on request (`zc unpair`, an agent stopping with
//! `--unpin-on-exit`, a pairing undone): a proxy's sockets go back to it
//! with their options as they were before pairing.
use std::time::Duration;

use log::warn;
use tokio::sync::oneshot;

use super::{Agent, Entry, stop::stop};
use crate::engine::bpf::{HandBack, HandedBack};

/// How long a relay may take to answer a hand-back: the engine waits up to
/// half a second for the kernel to send what it queued
/// (engine::bpf::hand_back), then answers.
pub(super) const HAND_BACK_ANSWER: Duration = Duration::from_secs(1);

impl Agent {
    /// Ends a pair and says how its sockets ended.
    pub(super) async fn end(&self, e: Entry) -> String {
        if e.hand_back.is_some() {
            let _turn = self.turns.take(&e.owners).await;
            // Unstopped, the owner may read meanwhile and the counts then
            // show bytes the verdict did not move: the hand-back resets
            // rather than risk a cut, which is the honest end when the
            // owner cannot be held.
            let stopped = stop(&e.owners, self.max_stop, self.stop_ceiling())
                .await
                .inspect_err(|r| {
                    warn!(
                        "handing a pair back without stopping its owner: {}",
                        r.message
                    )
                })
                .ok();
            let how = self.give_back(e).await;
            if let Some(s) = stopped {
                s.release().await;
            }
            return how;
        }
        match e.task {
            // Dropping the relay ends the pair: handed-over sockets close
            // (with a reset unless both directions had ended).
            Some(t) => {
                t.abort();
                "the agent's relay of the handed-over sockets ended".into()
            }
            // Adopted from pinned maps: no relay and no byte counts from
            // pairing time to check against.
            None => {
                if let Some(p) = &self.progs {
                    p.unpair(&e.keys);
                }
                "left to the owner; bytes queued in the kernel at this moment are lost (adopted \
                 pair: the agent that paired it is gone)"
                    .into()
            }
        }
    }

    /// Has the relay of a proxy's pair give the sockets back (the caller
    /// holds the owner still, if it could) and restores their options.
    pub(super) async fn give_back(&self, e: Entry) -> String {
        let Entry {
            hand_back,
            task,
            saved,
            ..
        } = e;
        let how = match (hand_back, task) {
            (Some(ask), Some(task)) => match ask_back(ask).await {
                Ok(HandedBack::Intact) => {
                    "every byte the kernel accepted was delivered; the owner has its sockets back"
                        .into()
                }
                Ok(HandedBack::Reset(why)) => format!("both connections were reset: {why}"),
                Err(why) => {
                    // Dropping the relay takes the pair out of the maps;
                    // wait for that before the owner goes on.
                    task.abort();
                    let _ = task.await;
                    format!("left to the owner, bytes queued in the kernel may be lost: {why}")
                }
            },
            _ => "the pair had no relay to hand it back".into(),
        };
        if let Some(s) = saved {
            s.restore();
        }
        how
    }
}

async fn ask_back(ask: oneshot::Sender<HandBack>) -> Result<HandedBack, String> {
    let (answer, how) = oneshot::channel();
    ask.send(answer)
        .map_err(|_| "the pair's relay had ended".to_string())?;
    match tokio::time::timeout(HAND_BACK_ANSWER, how).await {
        Ok(Ok(how)) => Ok(how),
        Ok(Err(_)) => Err("the pair's relay ended while handing back".into()),
        Err(_) => Err(format!(
            "the pair's relay did not answer within {} ms",
            HAND_BACK_ANSWER.as_millis()
        )),
    }
}
