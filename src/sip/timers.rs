//! The endpoint's timer queue: FIFO lanes with a binary-heap fallback.
//!
//! Why not one binary heap: the core arms its timers at `now + constant`
//! (T1 for Timer A and E, 32 s for Timer D), so the deadlines of one kind
//! arrive already sorted. A heap still pays O(log n) per pop over every call
//! lingering in Timer D (about 130,000 entries at 4,000 calls/s), with a
//! cache miss per level. Here an entry is appended to the lane whose last
//! deadline is the latest one not after it, which keeps every lane sorted;
//! only an entry that fits no lane (rare: a deadline earlier than every
//! lane's tail once all lanes are in use) goes to the heap. Push and pop are
//! O(1) for the common case, O(lanes) to find the minimum.
//!
//! The queue holds `(deadline, slot, generation)`; it knows nothing of what
//! is due. The endpoint keeps one entry per call at the call's earliest
//! deadline and skips entries that no longer match (lazy deletion).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Instant;

/// One timer entry: when, and which call (slot + generation).
pub(crate) type Entry = (Instant, u32, u32);

/// Lanes kept at most: enough for the distinct durations the core uses.
const LANES: usize = 8;

#[derive(Debug, Default)]
pub(crate) struct TimerQueue {
    lanes: Vec<VecDeque<Entry>>,
    heap: BinaryHeap<Reverse<Entry>>,
}

impl TimerQueue {
    pub(crate) fn push(&mut self, e: Entry) {
        // The lane with the latest tail not after `e` keeps the lanes tight:
        // a 32 s deadline does not land behind a 500 ms one.
        let mut best: Option<(usize, Instant)> = None;
        let mut empty = None;
        for (i, lane) in self.lanes.iter().enumerate() {
            match lane.back() {
                Some(&(tail, _, _)) if tail <= e.0 => {
                    if best.is_none_or(|(_, t)| tail > t) {
                        best = Some((i, tail));
                    }
                }
                Some(_) => {}
                None => empty = empty.or(Some(i)),
            }
        }
        match (best, empty) {
            (Some((i, _)), _) | (None, Some(i)) => self.lanes[i].push_back(e),
            (None, None) if self.lanes.len() < LANES => {
                self.lanes.push(VecDeque::from([e]));
            }
            (None, None) => self.heap.push(Reverse(e)),
        }
    }

    /// The earliest entry, without removing it.
    pub(crate) fn peek(&self) -> Option<Entry> {
        let mut min = self.heap.peek().map(|r| r.0);
        for lane in &self.lanes {
            if let Some(&f) = lane.front() {
                if min.is_none_or(|m| f < m) {
                    min = Some(f);
                }
            }
        }
        min
    }

    /// Removes and returns the earliest entry.
    pub(crate) fn pop(&mut self) -> Option<Entry> {
        let mut min: Option<(Option<usize>, Entry)> = self.heap.peek().map(|r| (None, r.0));
        for (i, lane) in self.lanes.iter().enumerate() {
            if let Some(&f) = lane.front() {
                if min.is_none_or(|(_, m)| f < m) {
                    min = Some((Some(i), f));
                }
            }
        }
        match min? {
            (Some(i), e) => {
                self.lanes[i].pop_front();
                Some(e)
            }
            (None, _) => self.heap.pop().map(|r| r.0),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.heap.len() + self.lanes.iter().map(VecDeque::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::time::Duration;

    /// Whatever the insertion order, entries come out sorted, like a heap.
    #[test]
    fn pops_in_order_for_any_insertion_order() {
        let t0 = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for round in 0..50 {
            let mut q = TimerQueue::default();
            let mut want = Vec::new();
            let mut now = 0u64;
            for i in 0..2_000u32 {
                // Mostly monotonic "now + constant" like the core, some random.
                now += rng.gen_range(0..3);
                let d = match (round + i as usize) % 5 {
                    0 => 500,
                    1 => 32_000,
                    2 => 15_000,
                    3 => rng.gen_range(0..40_000),
                    _ => 1_000,
                };
                let e = (t0 + Duration::from_millis(now + d), i, round as u32);
                q.push(e);
                want.push(e);
                // Interleave pops as the endpoint does.
                if rng.gen_ratio(1, 4) {
                    want.sort();
                    assert_eq!(q.pop(), Some(want.remove(0)));
                }
            }
            want.sort();
            assert_eq!(q.len(), want.len());
            let mut got = Vec::new();
            while let Some(p) = q.peek() {
                assert_eq!(q.pop(), Some(p));
                got.push(p);
            }
            assert_eq!(got, want);
        }
    }

    /// The core's pattern (two constant delays) never needs the heap.
    #[test]
    fn constant_delays_stay_in_lanes() {
        let t0 = Instant::now();
        let mut q = TimerQueue::default();
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_micros(250 * i);
            q.push((now + Duration::from_millis(500), i as u32, 0));
            q.push((now + Duration::from_secs(32), i as u32, 1));
            while q.peek().is_some_and(|e| e.0 <= now) {
                q.pop();
            }
        }
        assert!(q.heap.is_empty());
        assert!(q.lanes.len() <= 2);
    }
}
