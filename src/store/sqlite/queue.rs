//! The writer's job queue.
//!
//! Not `std::sync::mpsc`: a send to a receiver blocked in `recv` or
//! `recv_timeout` always wakes it, and while the writer holds a batch open
//! for more jobs (see `gather`) that meant one wake-up per status update
//! the SIP driver queued, though nobody waits for those and the writer
//! only has to take them before its deadline: a futex wake on the SIP
//! thread (~9% of its CPU at 1,000 calls/s) and a context switch on the
//! writer, each time. Here the writer says what it waits for ([`Wake`]),
//! and a sender wakes it only for that.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::Job;

/// A push after the writer stopped.
#[derive(Debug)]
pub(super) struct Stopped;

/// What wakes a waiting writer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Wake {
    /// Not waiting: no sender notifies.
    No,
    /// Any job (the writer has nothing to do).
    Any,
    /// Only a job someone waits for (the writer holds a batch of jobs
    /// nobody waits for until their deadline).
    Waited,
}

struct State {
    jobs: Vec<Job>,
    /// Jobs in `jobs` with a waiter.
    waited: usize,
    wake: Wake,
    /// No more jobs will come (the store is dropping).
    closed: bool,
    /// The writer has stopped: sends fail.
    gone: bool,
}

pub(super) struct JobQueue {
    state: Mutex<State>,
    ready: Condvar,
}

impl JobQueue {
    pub(super) fn new() -> JobQueue {
        JobQueue {
            state: Mutex::new(State {
                jobs: Vec::with_capacity(256),
                waited: 0,
                wake: Wake::No,
                closed: false,
                gone: false,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it cannot leave the queue half-changed
        // (every change is a push, a drain or a flag): carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job; fails (dropping it, so that its waiter hears the
    /// store stopped) if the writer has stopped or the queue is closed.
    pub(super) fn push(&self, job: Job) -> Result<(), Stopped> {
        let mut s = self.lock();
        if s.gone || s.closed {
            return Err(Stopped);
        }
        let waited = job.waiter.is_some();
        s.waited += usize::from(waited);
        s.jobs.push(job);
        let notify = match s.wake {
            Wake::No => false,
            Wake::Any => true,
            Wake::Waited => waited,
        };
        if notify {
            s.wake = Wake::No;
        }
        drop(s);
        if notify {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Jobs queued, not yet taken.
    pub(super) fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// No more jobs: the writer commits what is queued and stops.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// The writer is stopping: later sends fail, and what is queued is
    /// dropped (a waiter then hears that the store stopped).
    pub(super) fn writer_gone(&self) {
        let jobs = {
            let mut s = self.lock();
            s.gone = true;
            s.waited = 0;
            std::mem::take(&mut s.jobs)
        };
        drop(jobs);
    }

    /// Moves what is queued into `batch`, up to `max` jobs in it; returns
    /// whether the queue is closed and empty (nothing more will come).
    pub(super) fn drain(&self, batch: &mut Vec<Job>, max: usize) -> bool {
        let mut s = self.lock();
        Self::take(&mut s, batch, max)
    }

    fn take(s: &mut State, batch: &mut Vec<Job>, max: usize) -> bool {
        let n = max.saturating_sub(batch.len()).min(s.jobs.len());
        if n == s.jobs.len() {
            batch.append(&mut s.jobs);
            s.waited = 0;
        } else {
            let taken = s.jobs.drain(..n);
            let waited = taken
                .as_slice()
                .iter()
                .filter(|j| j.waiter.is_some())
                .count();
            batch.extend(taken);
            s.waited -= waited;
        }
        s.closed && s.jobs.is_empty()
    }

    /// Waits until what `wake` asks for is queued (or the queue closes, or
    /// `until` passes), then moves what is queued into `batch` as
    /// [`drain`](Self::drain) does. Returns at once if it is there already.
    pub(super) fn wait(
        &self,
        batch: &mut Vec<Job>,
        max: usize,
        wake: Wake,
        until: Option<Instant>,
    ) -> bool {
        let mut s = self.lock();
        let due = |s: &State| {
            s.closed
                || match wake {
                    Wake::No => true,
                    Wake::Any => !s.jobs.is_empty(),
                    Wake::Waited => s.waited > 0,
                }
        };
        while !due(&s) {
            s.wake = wake;
            s = match until {
                None => self.ready.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(t) => {
                    let left = t.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    self.ready
                        .wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        s.wake = Wake::No;
        Self::take(&mut s, batch, max)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Job, Op};
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn job(waited: bool) -> Job {
        Job {
            op: Op::Flush,
            waiter: waited.then(super::super::Waiter::test),
            queued_at: Instant::now(),
        }
    }

    /// Runs `then` on another thread 20 ms from now (the test's side
    /// meanwhile is waiting on the queue).
    fn later(
        q: &Arc<JobQueue>,
        then: impl FnOnce(&JobQueue) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let q = q.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            then(&q);
        })
    }

    #[test]
    fn a_job_nobody_waits_for_does_not_end_a_wait_for_waited_ones() {
        let q = Arc::new(JobQueue::new());
        let pusher = later(&q, |q| q.push(job(false)).unwrap());
        let mut batch = Vec::new();
        let until = Instant::now() + Duration::from_millis(300);
        let closed = q.wait(&mut batch, 100, Wake::Waited, Some(until));
        pusher.join().unwrap();
        // Woken by the deadline, not by the job: it is taken all the same.
        assert!(Instant::now() >= until);
        assert!(!closed);
        assert_eq!(batch.len(), 1);
    }

    #[test]
    fn a_waited_job_ends_the_wait_and_brings_the_others_along() {
        let q = Arc::new(JobQueue::new());
        q.push(job(false)).unwrap();
        let pusher = later(&q, |q| q.push(job(true)).unwrap());
        let mut batch = Vec::new();
        // An hour: only the waited job can end this wait.
        let until = Instant::now() + Duration::from_secs(3600);
        q.wait(&mut batch, 100, Wake::Waited, Some(until));
        pusher.join().unwrap();
        assert_eq!(batch.len(), 2);
        assert!(batch[1].waiter.is_some());
    }

    #[test]
    fn any_job_ends_an_idle_wait_and_close_ends_it_empty() {
        let q = Arc::new(JobQueue::new());
        let pusher = later(&q, |q| {
            q.push(job(false)).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            q.close();
        });
        let mut batch = Vec::new();
        assert!(!q.wait(&mut batch, 100, Wake::Any, None));
        assert_eq!(batch.len(), 1);
        assert!(q.wait(&mut batch, 100, Wake::Any, None), "closed and empty");
        pusher.join().unwrap();
        assert!(q.push(job(false)).is_err(), "closed: sends fail");
    }

    #[test]
    fn a_batch_takes_at_most_max_and_keeps_the_rest_in_order() {
        let q = JobQueue::new();
        for i in 0..5 {
            q.push(job(i % 2 == 0)).unwrap();
        }
        let mut batch = Vec::new();
        assert!(!q.drain(&mut batch, 3));
        assert_eq!(batch.len(), 3);
        // Two left, one of them waited for: a wait for waited jobs ends at
        // once.
        let mut rest = Vec::new();
        q.wait(&mut rest, 100, Wake::Waited, None);
        assert_eq!(rest.len(), 2);
        assert!(rest[1].waiter.is_some());
        q.writer_gone();
        assert!(q.push(job(true)).is_err(), "writer gone: sends fail");
    }
}
