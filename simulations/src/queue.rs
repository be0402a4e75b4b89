//! The event queue: events in order of time, then of scheduling.
//!
//! One binary heap over millions of pending events spends most of a large run in cache misses
//! (a 10 000-node cold start keeps millions of gossip copies in flight). Events are therefore
//! kept in buckets of virtual time (a calendar queue): the bucket being run is a small heap,
//! the next [`RING`] buckets are plain vectors in a ring (a push is an index, not a search),
//! later ones vectors in an ordered map, moved into the ring as it reaches them. The order is
//! exactly that of one heap on (time, sequence), so runs stay deterministic.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use crate::net::Time;

/// How many buckets after the current one the ring holds.
const RING: u64 = 4096;
/// How many emptied bucket vectors the queue keeps for the next buckets that get events.
const SPARES: usize = 8;
/// How far ahead of the current bucket an emptied vector is reused (the near buckets are the
/// busy ones; a bucket further on that gets one would hold its capacity for few events).
const SPARE_REACH: u64 = 64;

/// Pending events of type `T`.
pub struct Queue<T> {
    /// The width of a bucket, in virtual time.
    width: Time,
    /// The bucket `now` is in.
    current: Time,
    now: BinaryHeap<Entry<T>>,
    /// Buckets `current + 1 ..= current + RING`, in order.
    ring: VecDeque<Vec<Entry<T>>>,
    /// Events in the ring.
    in_ring: usize,
    far: BTreeMap<Time, Vec<Entry<T>>>,
    /// Emptied vectors, for the next buckets near the current one that get events: a few
    /// only, as a vector keeps the capacity of its busiest moment (kept in every bucket of the
    /// ring, the vectors of a large cold start's busiest milliseconds would hold gigabytes).
    spares: Vec<Vec<Entry<T>>>,
    seq: u64,
}

struct Entry<T> {
    at: Time,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        // A max-heap: the earliest (then the first scheduled) comes out first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl<T> Queue<T> {
    /// An empty queue with buckets `width` wide (at least 1).
    pub fn new(width: Time) -> Self {
        Self {
            width: width.max(1),
            current: 0,
            now: BinaryHeap::new(),
            ring: (0..RING).map(|_| Vec::new()).collect(),
            in_ring: 0,
            far: BTreeMap::new(),
            spares: Vec::new(),
            seq: 0,
        }
    }

    /// Adds `item` at `at` (not before the last time popped), after everything already
    /// scheduled at the same time.
    pub fn push(&mut self, at: Time, item: T) {
        self.seq += 1;
        let entry = Entry {
            at,
            seq: self.seq,
            item,
        };
        let bucket = at / self.width;
        if bucket <= self.current {
            self.now.push(entry);
        } else if bucket - self.current <= RING {
            let slot = &mut self.ring[(bucket - self.current - 1) as usize];
            if slot.capacity() == 0
                && bucket - self.current <= SPARE_REACH
                && let Some(spare) = self.spares.pop()
            {
                *slot = spare;
            }
            slot.push(entry);
            self.in_ring += 1;
        } else {
            self.far.entry(bucket).or_default().push(entry);
        }
    }

    /// The earliest event, with its time.
    pub fn pop(&mut self) -> Option<(Time, T)> {
        loop {
            if let Some(entry) = self.now.pop() {
                return Some((entry.at, entry.item));
            }
            let next = if self.in_ring > 0 {
                self.advance()
            } else {
                // Nothing in the ring: jump to the first far bucket, and fill the ring behind it.
                let (bucket, entries) = self.far.pop_first()?;
                self.current = bucket;
                while let Some(first) = self.far.first_entry() {
                    let d = *first.key() - self.current;
                    if d > RING {
                        break;
                    }
                    let entries = first.remove();
                    self.in_ring += entries.len();
                    self.ring[(d - 1) as usize] = entries;
                }
                entries
            };
            let done = std::mem::replace(&mut self.now, BinaryHeap::from(next));
            // Keep the emptied vector's memory for a bucket to come.
            let mut spare = done.into_vec();
            spare.clear();
            if spare.capacity() > 0 && self.spares.len() < SPARES {
                self.spares.push(spare);
            }
        }
    }

    /// The time of the earliest event. It moves nothing (the queue stays at the last time
    /// popped, so that events pushed before the time it gives go to their buckets): it looks
    /// through the first bucket that holds events when the current one is empty.
    pub fn peek(&self) -> Option<Time> {
        if let Some(entry) = self.now.peek() {
            return Some(entry.at);
        }
        let first = if self.in_ring > 0 {
            self.ring.iter().find(|bucket| !bucket.is_empty())
        } else {
            self.far.values().next()
        };
        first.and_then(|bucket| bucket.iter().map(|entry| entry.at).min())
    }

    /// The earliest event, with its time, if it comes before `end`.
    pub fn pop_before(&mut self, end: Time) -> Option<(Time, T)> {
        if self.peek()? < end { self.pop() } else { None }
    }

    /// Moves to the next bucket of the ring (which holds events): its events.
    fn advance(&mut self) -> Vec<Entry<T>> {
        loop {
            let entries = self.ring.pop_front().unwrap_or_default();
            self.current += 1;
            let back = self.far.remove(&(self.current + RING)).unwrap_or_default();
            self.in_ring += back.len();
            self.ring.push_back(back);
            if !entries.is_empty() {
                self.in_ring -= entries.len();
                return entries;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queue gives exactly the order of one heap on (time, sequence), whatever the bucket
    /// width, with events pushed while others are popped.
    #[test]
    fn buckets_keep_the_order_of_one_heap() {
        for width in [1, 7, 1000, 1 << 40] {
            // Times up to 5 000 000: far past the ring at small widths, with empty stretches.
            let mut queue = Queue::new(width);
            let mut reference: Vec<(Time, u64)> = Vec::new();
            let mut x = 12345u64;
            let mut next = || {
                x = crate::net::mix(x);
                x
            };
            let mut id = 0u64;
            for _ in 0..200 {
                let at = if next() % 4 == 0 {
                    next() % 5_000_000
                } else {
                    next() % 5000
                };
                queue.push(at, id);
                reference.push((at, id));
                id += 1;
            }
            let mut popped = Vec::new();
            while let Some((at, item)) = queue.pop() {
                popped.push((at, item));
                // Some events schedule more, at or after now.
                if item % 3 == 0 && id < 2000 {
                    let later = at
                        + if next() % 8 == 0 {
                            next() % 20_000
                        } else {
                            next() % 300
                        };
                    queue.push(later, id);
                    reference.push((later, id));
                    id += 1;
                }
            }
            // Ids grow with scheduling order, so (time, id) is the heap's order.
            reference.sort();
            assert_eq!(popped, reference, "width {width}");
        }
    }

    /// Run in windows as the simulator runs it: a peek gives the next window's start, events
    /// before its end are popped, and events pushed between windows at or after the end of
    /// the last one (so maybe before the time a peek gave) still come out in order, and go to
    /// their buckets (the current heap holds one bucket).
    #[test]
    fn windows_with_peeks_keep_the_order_of_one_heap() {
        for width in [1, 1000] {
            let mut queue = Queue::new(width);
            let mut reference: Vec<(Time, u64)> = Vec::new();
            let mut x = 999u64;
            let mut next = || {
                x = crate::net::mix(x);
                x
            };
            let mut id = 0u64;
            for _ in 0..50 {
                let at = next() % 100_000;
                queue.push(at, id);
                reference.push((at, id));
                id += 1;
            }
            let mut popped = Vec::new();
            let mut later = Vec::new();
            while let Some(start) = queue.peek() {
                let end = start + 700;
                while let Some((at, item)) = queue.pop_before(end) {
                    assert!(at < end);
                    popped.push((at, item));
                    if id < 3000 {
                        // One event within the window or after, one for the next window.
                        let soon = at + next() % 900;
                        queue.push(soon, id);
                        reference.push((soon, id));
                        later.push(end + next() % 5000);
                        id += 1;
                    }
                }
                assert!(queue.peek().is_none_or(|t| t >= end));
                // Peeking moved nothing: the queue is at the bucket last popped.
                if let Some(&(last, _)) = popped.last() {
                    assert_eq!(queue.current, last / width);
                }
                for at in later.drain(..) {
                    queue.push(at, id);
                    reference.push((at, id));
                    id += 1;
                }
            }
            reference.sort();
            assert_eq!(popped, reference, "width {width}");
        }
    }
}
