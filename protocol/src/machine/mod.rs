//! The domain's decision logic, as sans-IO state machines.
//!
//! A domain is a set of nodes serving one agent (see [`crate::domain`]). Everything a node
//! decides about its domain lives here, written as plain state machines: events go in, actions
//! come out, and nothing in this module touches a socket, a timer, a task or the system clock.
//! The caller passes the current time ([`Millis`]) with every event and seeds every random
//! choice ([`SeededRng`]), so the same inputs always give the same outputs. Two drivers use
//! them:
//!
//! - the node's swarm actor (`gaia-node`), which turns gossip messages, control RPC answers and stream frames
//!   into events, and actions into gossip publications, RPCs and substreams;
//! - the simulator (`gaia-simulations`), which drives thousands of them in one thread on a virtual clock.
//!
//! The machines:
//!
//! - [`membership::Membership`]: one domain as this node sees it. It checks every advert,
//!   certificate and revocation at the boundary (signatures, authorship, admission, freshness,
//!   sequence numbers), keeps the bounded member table, forgets silent members, and schedules
//!   this node's own signed adverts (heartbeats with seeded jitter).
//! - [`router::Router`]: picks the node for one request among the routable members and the
//!   local node: a capability filter, then power-of-two-choices on a load and latency score,
//!   with exponential-backoff bans of failing nodes.
//! - [`guard::Guard`]: who may talk to this node: per-peer budgets of gossip and control
//!   requests ([`rate`]), re-wrapped certificates, the certificates of gateways, the
//!   authorisation of chat requests and member-snapshot reads, penalties and bans.
//! - [`failover::Request`]: one routed request from dispatch to its end: first-token and stall
//!   timeouts, retries on other nodes, and resuming a half-streamed completion elsewhere.
//!
//! How they fit together for one chat request on an entry node:
//!
//! 1. the API builds a [`router::Needs`] from the request and a [`failover::Request`];
//! 2. the request asks the router (through a closure over [`Membership::candidates`]) for a node
//!    and emits [`failover::Action::Dispatch`]; the swarm opens a stream to that node;
//! 3. stream frames become [`failover::Event`]s; tokens flow to the client as
//!    [`failover::Action::EmitToClient`]; [`failover::Action::Observe`] feeds the router's
//!    in-flight counts, latency averages and bans;
//! 4. if the node fails or stalls, the request excludes it and dispatches again, resuming after
//!    the text already sent; when no node is left it fails with a message that says why.
//!
//! [`Membership::candidates`]: membership::Membership::candidates

pub mod failover;
pub mod guard;
pub mod membership;
pub mod rate;
pub mod router;

use std::fmt;

/// A point in time, in milliseconds since the Unix epoch, as the caller's clock reads it.
///
/// The machines never read a clock: the swarm actor passes the system time, a simulation its
/// virtual time. The machines tolerate a clock that steps backwards (every difference
/// saturates at zero); they only need wall-clock meaning where they compare with timestamps
/// written by other nodes (advert `sent_at`, certificate validity), which are Unix seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    /// The time `secs` seconds after the epoch.
    pub const fn from_secs(secs: u64) -> Self {
        Self(secs.saturating_mul(1000))
    }

    /// Whole seconds since the epoch (rounded down), the unit of protocol timestamps.
    pub const fn as_secs(self) -> u64 {
        self.0 / 1000
    }

    /// This time plus `ms` milliseconds (saturating).
    #[must_use]
    pub const fn plus(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`; zero if `earlier` is later.
    pub const fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

/// A small, fast, seeded pseudo-random generator (SplitMix64).
///
/// The machines own one each, seeded by the caller, so a run is reproducible from its seeds.
/// The algorithm is fixed here (unlike `rand::rngs::StdRng`, whose output may change between
/// `rand` versions), so recorded simulation seeds stay meaningful. It is not cryptographic: it
/// only spreads load and jitters timers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeededRng {
    state: u64,
}

impl SeededRng {
    /// A generator whose output depends only on `seed`.
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n` (0 when `n` is 0), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Lemire's multiply-and-reject method.
        let threshold = n.wrapping_neg() % n;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(n);
            if (product as u64) >= threshold {
                return (product >> 64) as u64;
            }
        }
    }

    /// A uniform index into a collection of `len` elements (0 when `len` is 0).
    pub fn index(&mut self, len: usize) -> usize {
        // usize fits in u64 on every supported target, and the result is below `len`.
        self.below(len as u64) as usize
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Keys, manifests and adverts for the domain tests (the protocol crate's own builders sit
    //! behind a feature this crate does not enable).

    use crate::advert::{Advert, Capabilities, Load};
    use crate::domain::{Admission, DomainId, DomainManifest, MembershipCertificate, Requirements};
    use crate::{ContentHash, NodeId, SecretKey};

    /// A deterministic key for `seed` (1..=127).
    pub(crate) fn key(seed: u8) -> SecretKey {
        let mut bytes = [seed.clamp(1, 0x7f); 32];
        bytes[31] = 0x11;
        SecretKey::from_bytes(&bytes).expect("a small non-zero scalar is a valid key")
    }

    /// A key for any `n`, for tests that need many nodes.
    pub(crate) fn many_key(n: u32) -> SecretKey {
        let mut bytes = [0x22u8; 32];
        bytes[0] = 0x01;
        bytes[28..].copy_from_slice(&n.to_be_bytes());
        SecretKey::from_bytes(&bytes).expect("a small non-zero scalar is a valid key")
    }

    /// The model every test domain accepts.
    pub(crate) fn model_hash() -> ContentHash {
        ContentHash::of(b"model")
    }

    /// A manifest run by `operator` with `admission`, requiring the test model and kb.
    pub(crate) fn manifest(operator: &SecretKey, admission: Admission) -> DomainManifest {
        DomainManifest {
            name: "rust-tutor".into(),
            topic: "/gaia/domain/rust-tutor/adverts".into(),
            operator: operator.node_id(),
            requirements: Requirements {
                accepted_model_hashes: vec![model_hash()],
                kb_hash: Some(ContentHash::of(b"kb")),
                prompt_hash: None,
            },
            bootstrap: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            admission,
            created_at: 1_700_000_000,
            version: 1,
            pricing: None,
        }
    }

    /// An advert of `node` meeting [`manifest`]'s requirements.
    pub(crate) fn advert(node: NodeId, domain: DomainId, seq: u64, sent_at: u64) -> Advert {
        Advert {
            node,
            domain,
            seq,
            model_name: "SmolLM2-135M-Instruct".into(),
            model_hash: model_hash(),
            kb_hash: Some(ContentHash::of(b"kb")),
            prompt_hash: None,
            capabilities: Capabilities {
                tools: true,
                structured_output: true,
                context_length: 8192,
                max_tokens: 2048,
            },
            load: Load {
                in_flight: 0,
                queued: 0,
                tokens_per_s: 90.0,
            },
            prompt_price: 10,
            addrs: vec!["/ip4/127.0.0.1/tcp/4002".into()],
            sent_at,
            leaving: false,
            completion_price: 10,
        }
    }

    /// A certificate of `member` valid from `issued_at` for a day.
    pub(crate) fn certificate(
        domain: DomainId,
        member: NodeId,
        issued_at: u64,
        serial: u64,
    ) -> MembershipCertificate {
        MembershipCertificate {
            domain,
            member,
            issued_at,
            expires_at: issued_at + 86_400,
            serial,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_arithmetic_saturates() {
        let t = Millis(5_500);
        assert_eq!(t.as_secs(), 5);
        assert_eq!(Millis::from_secs(7), Millis(7_000));
        assert_eq!(t.plus(500), Millis(6_000));
        assert_eq!(Millis(u64::MAX).plus(1), Millis(u64::MAX));
        assert_eq!(t.since(Millis(5_000)), 500);
        assert_eq!(Millis(5_000).since(t), 0);
        assert_eq!(t.to_string(), "5.500s");
    }

    #[test]
    fn seeded_rng_is_reproducible_and_uniform() {
        let mut a = SeededRng::new(42);
        let mut b = SeededRng::new(42);
        let mut c = SeededRng::new(43);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);

        assert_eq!(a.below(0), 0);
        assert_eq!(a.below(1), 0);
        let mut counts = [0u32; 7];
        for _ in 0..70_000 {
            counts[a.index(7)] += 1;
        }
        for count in counts {
            assert!((9_500..10_500).contains(&count), "{counts:?}");
        }
    }
}
