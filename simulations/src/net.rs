//! The simulated network: per-link latency drawn from the scenario's distribution (never
//! below `network.min_latency_ms`, the parallel event loop's lookahead), jitter, loss, each
//! node's upload bandwidth, relayed links, partitions.
//!
//! A link's base latency is a pure function of the seed and the two node indices (nothing
//! stored per pair), so a run of 10 000 nodes does not hold 10^8 numbers.

use gaia_protocol::machine::SeededRng;

use crate::scenario::{Latency, Network};

/// Virtual time, in microseconds since the start of the run.
pub type Time = u64;

/// Microseconds in a millisecond.
pub const MS: Time = 1_000;
/// Microseconds in a second.
pub const SEC: Time = 1_000_000;

/// The link model: what every node's events read (links, partitions) and only global events
/// change. What a transmission changes lives with its sender: when its upload link is free
/// again (a field of the node) and the generator of its loss and jitter (its shard's), so the
/// shards of a run can send at the same time.
#[derive(Debug)]
pub struct Net {
    config: Network,
    seed: u64,
    /// The least one-way latency of a link (`network.min_latency_ms`).
    min_latency: Time,
    /// Whether each node is reachable only through a relay.
    relay_only: Vec<bool>,
    /// The side of the current partition each node is on (all 0 when there is none).
    side: Vec<u8>,
    partitioned: bool,
    /// Draws for new nodes (relays) and partitions.
    rng: SeededRng,
}

/// Mixes a value into a well-spread 64-bit hash (SplitMix64's finaliser).
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in (0, 1) from 64 random bits.
pub fn unit(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// A standard normal deviate from two uniform ones (Box-Muller).
pub fn normal(u1: f64, u2: f64) -> f64 {
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl Net {
    /// The network of `nodes` nodes (more are added with [`Net::add_node`]).
    pub fn new(config: Network, seed: u64) -> Self {
        Self {
            min_latency: ((config.min_latency_ms * MS as f64) as Time).max(1),
            config,
            seed,
            relay_only: Vec::new(),
            side: Vec::new(),
            partitioned: false,
            rng: SeededRng::new(mix(seed ^ 0x006e_6574)),
        }
    }

    /// Adds a node; returns whether it is reachable only through relays.
    pub fn add_node(&mut self) -> bool {
        let relayed = unit(self.rng.next_u64()) < self.config.relay_only;
        self.relay_only.push(relayed);
        self.side.push(0);
        relayed
    }

    /// The least one-way latency of a link: whatever one node sends another arrives that
    /// much later or more (the parallel event loop's lookahead).
    pub fn min_latency(&self) -> Time {
        self.min_latency
    }

    /// The base one-way latency between `a` and `b`, in microseconds (at least
    /// [`min_latency`](Self::min_latency)).
    pub fn base_latency(&self, a: u32, b: u32) -> Time {
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        let h = mix(self.seed ^ mix((u64::from(lo) << 32) | u64::from(hi)));
        let (u1, u2) = (unit(h), unit(mix(h)));
        let ms = match self.config.latency {
            Latency::Constant { ms } => ms,
            Latency::Uniform { min_ms, max_ms } => min_ms + (max_ms - min_ms) * u1,
            Latency::LogNormal { median_ms, sigma } => median_ms * (sigma * normal(u1, u2)).exp(),
        };
        let relay = if self.relay_only[lo as usize] && self.relay_only[hi as usize] {
            2.0 * self.config.relay_latency_ms
        } else {
            0.0
        };
        (((ms.max(0.0) + relay) * MS as f64) as Time).max(self.min_latency)
    }

    /// Splits the nodes: each goes to side 1 with probability `share`.
    pub fn partition(&mut self, share: f64) {
        for side in &mut self.side {
            *side = u8::from(unit(self.rng.next_u64()) < share);
        }
        self.partitioned = true;
    }

    /// Heals the partition.
    pub fn heal(&mut self) {
        self.side.fill(0);
        self.partitioned = false;
    }

    /// Whether `a` and `b` can reach each other now.
    pub fn connected(&self, a: u32, b: u32) -> bool {
        !self.partitioned || self.side[a as usize] == self.side[b as usize]
    }

    /// Whether `node` is on side 1 of the current partition.
    pub fn side(&self, node: u32) -> u8 {
        self.side[node as usize]
    }

    /// Sends a gossip message of `bytes` from `from` to `to` at `now`: when it arrives, or
    /// `None` if it is lost or the link is cut.
    #[cfg(test)]
    pub fn send(
        &self,
        rng: &mut SeededRng,
        uplink: &mut Time,
        now: Time,
        from: u32,
        to: u32,
        bytes: u32,
    ) -> Option<Time> {
        let left = self.transmit(rng, uplink, now, from, to, bytes)?;
        Some(left + self.base_latency(from, to) + self.jitter(rng))
    }

    /// Puts a gossip message of `bytes` on `from`'s uplink (free again at `uplink`) at `now`,
    /// the loss drawn from `rng`: when its last byte leaves, or `None` if it is lost or the
    /// link is cut. A copy the receiver already has costs the uplink as much; add the link's
    /// [`base_latency`](Self::base_latency) and a [`jitter`](Self::jitter) for the arrival of
    /// the others.
    pub fn transmit(
        &self,
        rng: &mut SeededRng,
        uplink: &mut Time,
        now: Time,
        from: u32,
        to: u32,
        bytes: u32,
    ) -> Option<Time> {
        if !self.connected(from, to) {
            return None;
        }
        if self.config.loss > 0.0 && unit(rng.next_u64()) < self.config.loss {
            return None;
        }
        let transmit = (f64::from(bytes) * 8.0 / self.config.uplink_kbps * MS as f64) as Time;
        let start = (*uplink).max(now);
        *uplink = start + transmit;
        Some(*uplink)
    }

    /// A message's jitter, added to its link's [`base_latency`](Self::base_latency).
    pub fn jitter(&self, rng: &mut SeededRng) -> Time {
        (unit(rng.next_u64()) * self.config.jitter_ms * MS as f64) as Time
    }

    /// A message of `bytes` on a stream from `from` to `to` at `now` (reliable, no jitter),
    /// behind what `from`'s uplink (free again at `uplink`) carries: when it arrives, or
    /// `None` if the link is cut.
    pub fn rpc(
        &self,
        uplink: &mut Time,
        now: Time,
        from: u32,
        to: u32,
        bytes: u32,
    ) -> Option<Time> {
        if !self.connected(from, to) {
            return None;
        }
        let transmit = (f64::from(bytes) * 8.0 / self.config.uplink_kbps * MS as f64) as Time;
        let start = (*uplink).max(now);
        *uplink = start + transmit;
        Some(*uplink + self.base_latency(from, to))
    }

    /// How many nodes are relay-only.
    pub fn relay_only_count(&self) -> usize {
        self.relay_only.iter().filter(|r| **r).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_are_symmetric_reproducible_and_follow_the_distribution() {
        let mut net = Net::new(Network::default(), 7);
        for _ in 0..2000 {
            net.add_node();
        }
        assert_eq!(net.base_latency(3, 9), net.base_latency(9, 3));
        let mut samples: Vec<Time> = (0..1999).map(|i| net.base_latency(i, i + 1)).collect();
        samples.sort_unstable();
        let median_ms = samples[samples.len() / 2] as f64 / MS as f64;
        assert!((33.0..48.0).contains(&median_ms), "median {median_ms} ms");
        let mut other = Net::new(Network::default(), 7);
        for _ in 0..10 {
            other.add_node();
        }
        assert_eq!(other.base_latency(3, 9), net.base_latency(3, 9));
    }

    /// No link is shorter than the least latency (the parallel event loop's lookahead).
    #[test]
    fn links_take_at_least_the_least_latency() {
        let config = Network {
            latency: Latency::Uniform {
                min_ms: 0.0,
                max_ms: 4.0,
            },
            min_latency_ms: 2.5,
            ..Network::default()
        };
        let mut net = Net::new(config, 3);
        for _ in 0..200 {
            net.add_node();
        }
        let latencies: Vec<Time> = (0..199).map(|i| net.base_latency(i, i + 1)).collect();
        assert!(latencies.iter().all(|l| *l >= 2500), "{latencies:?}");
        assert!(latencies.contains(&2500) && latencies.iter().any(|l| *l > 2500));
        let (mut rng, mut uplink) = (SeededRng::new(1), 0);
        let at = net.rpc(&mut uplink, 1000, 0, 1, 10);
        assert!(at.is_some_and(|at| at >= 1000 + 2500));
        assert!(
            net.send(&mut rng, &mut uplink, 0, 0, 1, 10)
                .is_some_and(|at| at >= 2500)
        );
    }

    #[test]
    fn the_uplink_queues_messages_and_partitions_cut_links() {
        let config = Network {
            latency: Latency::Constant { ms: 10.0 },
            jitter_ms: 0.0,
            uplink_kbps: 8.0, // one byte per millisecond
            ..Network::default()
        };
        let mut net = Net::new(config, 1);
        for _ in 0..4 {
            net.add_node();
        }
        let (mut rng, mut uplink) = (SeededRng::new(1), 0);
        assert_eq!(
            net.send(&mut rng, &mut uplink, 0, 0, 1, 100),
            Some(110 * MS)
        );
        assert_eq!(
            net.send(&mut rng, &mut uplink, 0, 0, 2, 100),
            Some(210 * MS)
        );
        net.partition(0.5);
        let cut = (0..4).any(|b| !net.connected(0, b));
        let sides: Vec<u8> = (0..4).map(|n| net.side(n)).collect();
        assert_eq!(cut, sides.iter().any(|s| *s != sides[0]));
        net.heal();
        assert!((0..4).all(|b| net.connected(0, b)));
    }
}
