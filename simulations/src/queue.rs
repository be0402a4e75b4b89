//! The event queue: events in order of time, then of scheduling.
//!
//! One binary heap over millions of pending events spends most of a large run in cache misses
//! (a 10 000-node cold start keeps about ten million gossip copies in flight). Events are
//! therefore kept in buckets of virtual time: the bucket being run is a small heap, later
//! ones are plain vectors in an ordered map, turned into a heap when their time comes. The
//! order is exactly that of one heap on (time, sequence), so runs stay deterministic.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

use crate::net::Time;

/// Pending events of type `T`.
pub struct Queue<T> {
    /// The width of a bucket, in virtual time.
    width: Time,
    /// The bucket `now` is in.
    current: Time,
    now: BinaryHeap<Entry<T>>,
    later: BTreeMap<Time, Vec<Entry<T>>>,
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
            later: BTreeMap::new(),
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
        } else {
            self.later.entry(bucket).or_default().push(entry);
        }
    }

    /// The earliest event, with its time.
    pub fn pop(&mut self) -> Option<(Time, T)> {
        loop {
            if let Some(entry) = self.now.pop() {
                return Some((entry.at, entry.item));
            }
            let (bucket, entries) = self.later.pop_first()?;
            self.current = bucket;
            self.now = BinaryHeap::from(entries);
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
            let mut queue = Queue::new(width);
            let mut reference: Vec<(Time, u64)> = Vec::new();
            let mut x = 12345u64;
            let mut next = || {
                x = crate::net::mix(x);
                x
            };
            let mut id = 0u64;
            for _ in 0..200 {
                let at = next() % 5000;
                queue.push(at, id);
                reference.push((at, id));
                id += 1;
            }
            let mut popped = Vec::new();
            while let Some((at, item)) = queue.pop() {
                popped.push((at, item));
                // Some events schedule more, at or after now.
                if item % 3 == 0 && id < 2000 {
                    let later = at + next() % 300;
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
}
