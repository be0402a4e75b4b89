//! Per-peer rate limits (a token bucket for each peer, in a bounded table) and the filter of
//! re-published content ([`RepeatFilter`]).
//!
//! The [`Guard`](super::guard::Guard) keeps one [`PeerBudget`] for gossip messages (counted
//! per delivering peer) and one for control RPCs. A peer over its budget has the message ignored (not
//! forwarded, not processed) or the request answered `Busy`; one that stays over it is
//! penalised once per heartbeat, and banned like any peer that keeps breaking the protocol.

use std::collections::HashMap;

use foldhash::quality::RandomState;

use super::Millis;
use crate::NodeId;

/// One peer's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// The burst the bucket was last filled up to: when the budget grows (the domain turned
    /// out larger), the difference is credited at once.
    burst: f64,
    at: Millis,
    /// When the peer last went over its budget.
    over_at: Option<Millis>,
}

/// Token buckets per peer, at most `max_tracked` of them.
#[derive(Debug)]
pub struct PeerBudget {
    buckets: HashMap<NodeId, Bucket, RandomState>,
    max_tracked: usize,
}

/// What one message or request costs a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// Within budget.
    Allowed,
    /// Over budget: drop it.
    Over,
    /// Over budget, and the first overflow since `penalty_every` ago: drop it and penalise.
    OverAgain,
}

impl PeerBudget {
    /// An empty table of at most `max_tracked` peers.
    pub fn new(max_tracked: usize) -> Self {
        Self {
            buckets: HashMap::default(),
            max_tracked,
        }
    }

    /// Takes one token from `peer`'s bucket, which refills at `per_sec` up to `burst`. A
    /// burst larger than at the last call adds the difference to the bucket (a node that
    /// just joined a large domain learns its size within seconds, while its peers already
    /// pass on the domain's gossip at the rate of a large domain).
    /// `penalty_every` spaces the [`Spend::OverAgain`] answers of one peer.
    pub fn spend(
        &mut self,
        peer: NodeId,
        now: Millis,
        per_sec: f64,
        burst: f64,
        penalty_every_ms: u64,
    ) -> Spend {
        let Some(bucket) = (match self.buckets.get_mut(&peer) {
            Some(bucket) => Some(bucket),
            None => self.track(peer, now, per_sec, burst),
        }) else {
            return Spend::Allowed;
        };
        let grown = (burst - bucket.burst).max(0.0);
        bucket.burst = burst;
        let refill = secs(now.since(bucket.at)) * per_sec + grown;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Spend::Allowed;
        }
        match bucket.over_at {
            Some(at) if now.since(at) < penalty_every_ms => Spend::Over,
            _ => {
                bucket.over_at = Some(now);
                Spend::OverAgain
            }
        }
    }
}

impl PeerBudget {
    /// A full bucket for `peer`, if the table has room (after forgetting the peers whose
    /// buckets have refilled: they owe nothing).
    fn track(
        &mut self,
        peer: NodeId,
        now: Millis,
        per_sec: f64,
        burst: f64,
    ) -> Option<&mut Bucket> {
        if self.buckets.len() >= self.max_tracked {
            self.buckets
                .retain(|_, b| b.tokens + secs(now.since(b.at)) * per_sec < burst);
        }
        if self.buckets.len() >= self.max_tracked {
            return None;
        }
        Some(self.buckets.entry(peer).or_insert(Bucket {
            tokens: burst,
            burst,
            at: now,
            over_at: None,
        }))
    }

    /// Gives back the token `peer` last spent (what it delivered turned out to cost
    /// nothing), up to its burst.
    pub fn refund(&mut self, peer: NodeId) {
        if let Some(bucket) = self.buckets.get_mut(&peer) {
            bucket.tokens = (bucket.tokens + 1.0).min(bucket.burst);
        }
    }
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId([n; 20])
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_and_overflow_is_penalised_once_per_period() {
        let mut budget = PeerBudget::new(8);
        let peer = id(1);
        let t0 = Millis(1_000_000);
        let second = 1_000;
        for _ in 0..10 {
            assert_eq!(budget.spend(peer, t0, 5.0, 10.0, second), Spend::Allowed);
        }
        assert_eq!(budget.spend(peer, t0, 5.0, 10.0, second), Spend::OverAgain);
        assert_eq!(budget.spend(peer, t0, 5.0, 10.0, second), Spend::Over);
        // 0.4 s later two tokens are back.
        let t1 = t0.plus(400);
        assert_eq!(budget.spend(peer, t1, 5.0, 10.0, second), Spend::Allowed);
        assert_eq!(budget.spend(peer, t1, 5.0, 10.0, second), Spend::Allowed);
        assert_eq!(budget.spend(peer, t1, 5.0, 10.0, second), Spend::Over);
        // A second after t1 the bucket holds five tokens; more than a second after the first
        // overflow, a new one is penalised again.
        let t2 = t0.plus(1400);
        for _ in 0..5 {
            assert_eq!(budget.spend(peer, t2, 5.0, 10.0, second), Spend::Allowed);
        }
        assert_eq!(budget.spend(peer, t2, 5.0, 10.0, second), Spend::OverAgain);
        // Another peer has its own bucket.
        assert_eq!(budget.spend(id(2), t2, 5.0, 10.0, second), Spend::Allowed);
    }

    /// A budget that grows (the domain turned out larger) credits the growth at once; one
    /// that shrinks only caps the bucket.
    #[test]
    fn a_grown_budget_is_credited_at_once() {
        let mut budget = PeerBudget::new(8);
        let peer = id(1);
        let t0 = Millis(1_000_000);
        for _ in 0..10 {
            assert_eq!(budget.spend(peer, t0, 1.0, 10.0, 1_000), Spend::Allowed);
        }
        assert_eq!(budget.spend(peer, t0, 1.0, 10.0, 1_000), Spend::OverAgain);
        // The burst grows from 10 to 100: 90 more pass at the same instant, no more.
        for _ in 0..90 {
            assert_eq!(budget.spend(peer, t0, 10.0, 100.0, 1_000), Spend::Allowed);
        }
        assert_eq!(budget.spend(peer, t0, 10.0, 100.0, 1_000), Spend::Over);
        // Shrinking back gives nothing.
        let t1 = t0.plus(1_000);
        assert_eq!(budget.spend(peer, t1, 1.0, 10.0, 1_000), Spend::Allowed);
        assert_eq!(budget.spend(peer, t1, 1.0, 10.0, 1_000), Spend::OverAgain);
    }

    /// A refund gives back one token, never beyond the burst, and only to a peer tracked.
    #[test]
    fn a_refund_gives_back_one_token_up_to_the_burst() {
        let mut budget = PeerBudget::new(8);
        let peer = id(1);
        let t0 = Millis(1_000_000);
        for _ in 0..3 {
            assert_eq!(budget.spend(peer, t0, 1.0, 3.0, 1_000), Spend::Allowed);
        }
        assert_eq!(budget.spend(peer, t0, 1.0, 3.0, 1_000), Spend::OverAgain);
        budget.refund(peer);
        assert_eq!(budget.spend(peer, t0, 1.0, 3.0, 1_000), Spend::Allowed);
        assert_eq!(budget.spend(peer, t0, 1.0, 3.0, 1_000), Spend::Over);
        // Refunds past a full bucket are lost.
        let t1 = t0.plus(10_000);
        for _ in 0..5 {
            budget.refund(peer);
        }
        for _ in 0..3 {
            assert_eq!(budget.spend(peer, t1, 1.0, 3.0, 1_000), Spend::Allowed);
        }
        assert_ne!(budget.spend(peer, t1, 1.0, 3.0, 1_000), Spend::Allowed);
        budget.refund(id(2));
        assert_eq!(
            budget.buckets.len(),
            1,
            "an unknown peer is not tracked by a refund"
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let mut budget = PeerBudget::new(4);
        let t0 = Millis(1_000_000);
        let second = 1_000;
        let peers: Vec<NodeId> = (0..4).map(id).collect();
        for peer in &peers {
            for _ in 0..3 {
                budget.spend(*peer, t0, 1.0, 3.0, second);
            }
        }
        // Full of drained buckets: a new peer is let through untracked.
        let newcomer = id(9);
        assert_eq!(budget.spend(newcomer, t0, 1.0, 3.0, second), Spend::Allowed);
        assert_eq!(budget.buckets.len(), 4);
        // Once the others refilled, they are forgotten to make room.
        let later = t0.plus(10_000);
        assert_eq!(
            budget.spend(newcomer, later, 1.0, 3.0, second),
            Spend::Allowed
        );
        assert!(budget.buckets.contains_key(&newcomer));
        assert!(budget.buckets.len() <= 4);
    }
}

/// What a re-published message is, judged by when the same content was last passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// News: pass it on.
    Fresh,
    /// The same content passed on less than the minimum interval ago: drop it quietly.
    Duplicate,
    /// The same peer delivered the same content twice within half the minimum interval: a
    /// replay or a re-wrap flood (honest relays pass on one publication per interval; half of
    /// it leaves room for the jitter of their delays).
    Replayed,
}

/// Re-publications of one content (a certificate a gateway re-gossips each heartbeat, with a
/// new `sent_at`): at most one per `min_interval` is passed on, whatever the wrapping.
#[derive(Debug)]
pub struct RepeatFilter<K> {
    last: HashMap<K, (Millis, NodeId)>,
    max_tracked: usize,
}

impl<K: std::hash::Hash + Eq + Copy> RepeatFilter<K> {
    /// An empty filter of at most `max_tracked` keys.
    pub fn new(max_tracked: usize) -> Self {
        Self {
            last: HashMap::new(),
            max_tracked,
        }
    }

    /// Judges `key` delivered by `peer` at `now`.
    pub fn check(&mut self, key: K, peer: NodeId, now: Millis, min_interval_ms: u64) -> Repeat {
        if let Some((at, by)) = self.last.get(&key)
            && now.since(*at) < min_interval_ms
        {
            // An honest relay passes on at most one publication per interval by its own clock;
            // two of its copies can arrive closer than that by the difference of their
            // delays, never by half the interval.
            return if *by == peer && now.since(*at) < min_interval_ms / 2 {
                Repeat::Replayed
            } else {
                Repeat::Duplicate
            };
        }
        if self.last.len() >= self.max_tracked && !self.last.contains_key(&key) {
            self.last
                .retain(|_, (at, _)| now.since(*at) < min_interval_ms);
            if self.last.len() >= self.max_tracked {
                return Repeat::Duplicate;
            }
        }
        self.last.insert(key, (now, peer));
        Repeat::Fresh
    }
}

#[cfg(test)]
mod repeat_tests {
    use super::*;

    #[test]
    fn one_publication_per_interval_passes_and_a_peer_repeating_itself_is_a_replayer() {
        let mut filter = RepeatFilter::new(4);
        let (honest, other) = (NodeId([1; 20]), NodeId([2; 20]));
        let t0 = Millis(1_000_000);
        let half = 500;
        assert_eq!(filter.check(1u8, honest, t0, half), Repeat::Fresh);
        // Another relay's copy of the same round: a duplicate, nobody's fault.
        let t1 = t0.plus(100);
        assert_eq!(filter.check(1, other, t1, half), Repeat::Duplicate);
        // The first deliverer again, re-wrapped, within half the interval: a replay.
        assert_eq!(filter.check(1, honest, t1, half), Repeat::Replayed);
        // Later in the interval it is only a duplicate: an honest relay's next round that
        // arrived a little early.
        assert_eq!(
            filter.check(1, honest, t0.plus(450), half),
            Repeat::Duplicate
        );
        // The next round is news again.
        let t2 = t0.plus(600);
        assert_eq!(filter.check(1, other, t2, half), Repeat::Fresh);
        // Bounded: a full table of recent keys lets nothing new through.
        for k in 2..5 {
            assert_eq!(filter.check(k, honest, t2, half), Repeat::Fresh);
        }
        assert_eq!(filter.check(9, honest, t2, half), Repeat::Duplicate);
        let t3 = t2.plus(1_000);
        assert_eq!(filter.check(9, honest, t3, half), Repeat::Fresh);
    }
}
