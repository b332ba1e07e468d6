//! One request at a time per process. Pairing holds its owner stopped
//! from the moment it measures what the owner holds until the pair is
//! confirmed; a second request for the same owner must not let it run in
//! between (a stop is also one tracer's: the kernel lets only one thread
//! seize a process). So requests that stop a process take its turn first,
//! and wait for it.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use tokio::sync::OwnedMutexGuard;

use super::pidfd::Process;

/// The turns, by pid. A pid reused by a new process while an old request
/// still holds its turn only makes the new process's requests wait.
#[derive(Default)]
pub struct Turns {
    by_pid: Mutex<HashMap<i32, Weak<tokio::sync::Mutex<()>>>>,
}

/// The turns of some processes; theirs until dropped.
pub struct Turn {
    _held: Vec<OwnedMutexGuard<()>>,
}

impl Turns {
    /// Waits for the turn of every process in `owners`, taken in pid
    /// order so that two requests for the same processes cannot each hold
    /// one and wait for the other.
    pub async fn take(&self, owners: &[Arc<Process>]) -> Turn {
        let mut pids: Vec<i32> = owners.iter().map(|p| p.pid()).collect();
        pids.sort_unstable();
        pids.dedup();
        let locks: Vec<_> = {
            let mut by_pid = self.by_pid.lock().unwrap_or_else(|p| p.into_inner());
            by_pid.retain(|_, w| w.strong_count() > 0);
            pids.iter()
                .map(|&pid| {
                    by_pid.get(&pid).and_then(Weak::upgrade).unwrap_or_else(|| {
                        let l = Arc::new(tokio::sync::Mutex::new(()));
                        by_pid.insert(pid, Arc::downgrade(&l));
                        l
                    })
                })
                .collect()
        };
        let mut held = Vec::with_capacity(locks.len());
        for l in locks {
            held.push(l.lock_owned().await);
        }
        Turn { _held: held }
    }
}
