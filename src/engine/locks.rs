//! Sector range locks shared by every connection of an export.
//!
//! Writes (including read-modify-write of partial sectors, TRIM and WRITE_ZEROES) take an
//! exclusive lock on the sectors they touch; reads take a shared lock, so a read never sees a
//! sector while its ciphertext is half rewritten. Two overlapping writes therefore apply in
//! one serial order.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Whether a lock excludes other readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

#[derive(Debug)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    mode: LockMode,
}

#[derive(Debug, Default)]
struct State {
    held: Vec<Held>,
    next_id: u64,
}

/// A table of locked sector ranges.
#[derive(Debug, Default)]
pub struct RangeLocks {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    released: Notify,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a list of ranges; a panic elsewhere cannot leave it half-updated.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl RangeLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until sectors `start..end` can be locked in `mode`, then locks them. The lock
    /// is released when the guard drops, on any thread.
    ///
    /// NOTE: waiters are not queued in order, so a steady stream of shared locks on a range
    /// can delay an exclusive one; in-flight requests per connection are bounded, so the
    /// delay is bounded in practice.
    pub async fn lock(&self, start: u64, end: u64, mode: LockMode) -> RangeGuard {
        loop {
            let released = self.inner.released.notified();
            tokio::pin!(released);
            // Register interest before checking, so a release between the check and the
            // await still wakes this task.
            released.as_mut().enable();

            if let Some(id) = self.try_insert(start, end, mode) {
                return RangeGuard { inner: Arc::clone(&self.inner), id };
            }
            released.await;
        }
    }

    fn try_insert(&self, start: u64, end: u64, mode: LockMode) -> Option<u64> {
        let mut state = self.inner.state();
        let conflict = state.held.iter().any(|held| {
            let overlaps = held.start < end && start < held.end;
            overlaps && (mode == LockMode::Exclusive || held.mode == LockMode::Exclusive)
        });
        if conflict {
            return None;
        }
        let id = state.next_id;
        state.next_id += 1;
        state.held.push(Held { id, start, end, mode });
        Some(id)
    }
}

/// A held sector range; dropping it releases the range and wakes waiters.
#[derive(Debug)]
pub struct RangeGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        {
            let mut state = self.inner.state();
            state.held.retain(|held| held.id != self.id);
        }
        self.inner.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn shared_locks_coexist() {
        let locks = RangeLocks::new();
        let _a = locks.lock(0, 10, LockMode::Shared).await;
        let _b = tokio::time::timeout(Duration::from_secs(1), locks.lock(5, 15, LockMode::Shared))
            .await
            .expect("shared locks must not block each other");
    }

    #[tokio::test]
    async fn exclusive_waits_for_overlap() {
        let locks = Arc::new(RangeLocks::new());
        let first = locks.lock(0, 10, LockMode::Exclusive).await;
        let waiter = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move { locks.lock(9, 12, LockMode::Shared).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "overlapping lock was granted while held");

        let _disjoint = tokio::time::timeout(Duration::from_secs(1), locks.lock(20, 30, LockMode::Exclusive))
            .await
            .expect("disjoint range must not wait");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
    }
}
