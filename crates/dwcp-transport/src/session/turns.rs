//! Migration rounds of one target, applied in the order they were begun.
//!
//! A v5 sender may have two parts of a round in flight at once, each in a session of its own:
//! the next part's bytes cross while the one before waits for its last packets and its
//! verdict. A later part may refer to pages an earlier one wrote (duplicates within a round),
//! so the receiver applies them in the order it read their begins: each round takes a
//! [`Ticket`] at its begin, and waits for its turn before it writes into the target.
//!
//! The order is that of the begins the receiver read. A part whose session broke and that
//! resumes in a new one begins again, behind the parts begun meanwhile: a part after it that
//! refers to its pages then fails with `DELTA_UNRESOLVED`, and the sender sends the rest of
//! the round without references. Never a wrong page.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How often a round waiting for its turn looks whether it was abandoned.
const POLL: Duration = Duration::from_millis(50);

/// The queues of every target with a round begun and not yet finished.
#[derive(Debug, Default)]
pub(crate) struct Turns {
    queues: Arc<Mutex<HashMap<PathBuf, Arc<Queue>>>>,
}

#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    turn: Condvar,
}

#[derive(Debug, Default)]
struct QueueState {
    /// The number the next ticket gets.
    next: u64,
    /// Every ticket below this one is done.
    serving: u64,
    /// Tickets done out of order (their round failed or went before its turn came).
    done: BTreeSet<u64>,
    /// Each outstanding ticket's round's flag, raised when the target is aborted.
    flags: BTreeMap<u64, Arc<AtomicBool>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain counters: a panic elsewhere while holding the lock leaves them consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Turns {
    /// A ticket for the next round of `target`, whose object raises `abandoned` when it
    /// goes (and which an abort of the target raises).
    pub(crate) fn take(&self, target: &Path, abandoned: Arc<AtomicBool>) -> Ticket {
        let mut queues = lock(&self.queues);
        let queue = queues.entry(target.to_path_buf()).or_default().clone();
        let n = {
            let mut st = lock(&queue.state);
            st.next += 1;
            let n = st.next - 1;
            st.flags.insert(n, abandoned.clone());
            n
        };
        Ticket {
            queues: self.queues.clone(),
            target: target.to_path_buf(),
            queue,
            n,
            abandoned,
        }
    }

    /// The target is aborted: every round of it begun so far is abandoned (it writes nothing
    /// more, and one waiting for its turn gives up), and rounds begun from now on queue
    /// afresh, not behind those.
    pub(crate) fn abandon(&self, target: &Path) {
        let Some(queue) = lock(&self.queues).remove(target) else {
            return;
        };
        for f in lock(&queue.state).flags.values() {
            f.store(true, Ordering::Release);
        }
        queue.turn.notify_all();
    }

    /// Whether a round of `target` has been begun and not finished.
    pub(crate) fn busy(&self, target: &Path) -> bool {
        lock(&self.queues).contains_key(target)
    }
}

/// A round's place in its target's queue; dropping it lets the next round go.
#[derive(Debug)]
pub(crate) struct Ticket {
    queues: Arc<Mutex<HashMap<PathBuf, Arc<Queue>>>>,
    target: PathBuf,
    queue: Arc<Queue>,
    n: u64,
    abandoned: Arc<AtomicBool>,
}

impl Ticket {
    /// Blocks until every round of the target begun before this one is done. Gives up when
    /// the round is abandoned (its object is gone, or the target was aborted) or after
    /// `limit`.
    pub(crate) fn wait(&self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let mut st = lock(&self.queue.state);
        loop {
            if self.abandoned.load(Ordering::Acquire) {
                return Err("the round was abandoned".into());
            }
            if st.serving == self.n {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "an earlier round of this target did not finish within {} s",
                    limit.as_secs()
                ));
            }
            st = self
                .queue
                .turn
                .wait_timeout(st, POLL.min(deadline - now))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Lock order: the map, then a queue (as in `take`).
        let mut queues = lock(&self.queues);
        let idle = {
            let mut st = lock(&self.queue.state);
            st.flags.remove(&self.n);
            st.done.insert(self.n);
            while st.done.first() == Some(&st.serving) {
                st.done.pop_first();
                st.serving += 1;
            }
            st.serving == st.next
        };
        self.queue.turn.notify_all();
        if idle
            && queues
                .get(&self.target)
                .is_some_and(|q| Arc::ptr_eq(q, &self.queue))
        {
            queues.remove(&self.target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }

    #[test]
    fn rounds_go_in_the_order_of_their_tickets() {
        let turns = Turns::default();
        let t = Path::new("/x/.vm.dwcp-migrating");
        let a = turns.take(t, flag());
        let b = turns.take(t, flag());
        let c = turns.take(t, flag());
        assert!(turns.busy(t));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        // Started last first: each still goes only after the ones before it.
        for (name, ticket) in [("c", c), ("b", b)] {
            let order = order.clone();
            threads.push(std::thread::spawn(move || {
                ticket.wait(Duration::from_secs(10)).unwrap();
                order.lock().unwrap().push(name);
                drop(ticket);
            }));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(order.lock().unwrap().is_empty());
        a.wait(Duration::from_secs(1)).unwrap();
        order.lock().unwrap().push("a");
        drop(a);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a", "b", "c"]);
        // Every round done: the queue is gone.
        assert!(!turns.busy(t));
    }

    #[test]
    fn a_ticket_dropped_before_its_turn_does_not_hold_up_the_rest() {
        let turns = Turns::default();
        let t = Path::new("t");
        let a = turns.take(t, flag());
        let b = turns.take(t, flag());
        let c = turns.take(t, flag());
        drop(b);
        // c waits for a only.
        assert!(c.wait(Duration::from_millis(100)).is_err());
        drop(a);
        c.wait(Duration::from_millis(100)).unwrap();
        // Other targets are not involved.
        let other = turns.take(Path::new("u"), flag());
        other.wait(Duration::from_millis(10)).unwrap();
        drop(c);
        assert!(!turns.busy(t));
        assert!(turns.busy(Path::new("u")));
    }

    #[test]
    fn a_waiting_round_gives_up_when_abandoned_or_late() {
        let turns = Turns::default();
        let t = Path::new("t");
        let _a = turns.take(t, flag());
        let abandoned = flag();
        let b = turns.take(t, abandoned.clone());
        let started = Instant::now();
        let waiter = std::thread::spawn(move || {
            let r = b.wait(Duration::from_secs(30));
            (r, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(100));
        abandoned.store(true, Ordering::Release);
        let (r, took) = waiter.join().unwrap();
        assert!(r.unwrap_err().contains("abandoned"));
        assert!(took < Duration::from_secs(10), "{took:?}");
        let c = turns.take(t, flag());
        let e = c.wait(Duration::from_millis(60)).unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
    }

    #[test]
    fn an_abort_abandons_the_rounds_begun_and_later_ones_queue_afresh() {
        let turns = Turns::default();
        let t = Path::new("t");
        let (fa, fb) = (flag(), flag());
        let a = turns.take(t, fa.clone());
        let b = turns.take(t, fb.clone());
        turns.abandon(t);
        assert!(fa.load(Ordering::Acquire) && fb.load(Ordering::Acquire));
        assert!(
            b.wait(Duration::from_secs(5))
                .unwrap_err()
                .contains("abandoned")
        );
        // Not behind the abandoned ones, which may linger until their objects go.
        assert!(!turns.busy(t));
        let c = turns.take(t, flag());
        c.wait(Duration::from_millis(10)).unwrap();
        drop((a, b));
        assert!(turns.busy(t), "c's queue is not the old one");
        drop(c);
        assert!(!turns.busy(t));
    }
}
