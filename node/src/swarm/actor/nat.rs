//! Reachability: AutoNAT, relay reservations, hole punching and mDNS, as the swarm actor
//! drives them.
//!
//! - **AutoNAT** (v1) asks peers to dial back the addresses they observe. `Public` confirms
//!   the address, turns the relay server on (this node may relay for members behind NAT) and
//!   the DHT to server mode; `Private` turns both off, the relay server only once no member
//!   holds a slot here (a wrong verdict must not cut them all off). As a server, this node
//!   closes each dial-back connection once the probe is answered (left open, they would fill
//!   the per-peer connection limit and fail the prober's next probes).
//! - **Relay reservations.** A node that is not publicly reachable (AutoNAT says private, or
//!   has not decided within three heartbeats of starting) and runs with `swarm.relay_client`
//!   keeps slots on up to [`RELAYS`] connected members that offer relaying (identify lists the
//!   hop protocol). The relayed address (`…/p2p/<relay>/p2p-circuit/p2p/<self>`) goes into
//!   its advert, so every member can dial it. Once AutoNAT says public, the slots are given
//!   back.
//! - **DCUtR.** When a peer connects over a relay, both sides try to open a direct connection
//!   at the addresses they observed (hole punching); the outcome is counted in the status.
//! - **mDNS** (`swarm.mdns`): Gaia nodes found on the local network are dialed like bootstrap
//!   peers while this node has few connections.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, autonat, dcutr, kad, mdns, relay};

use super::{Actor, TARGET_PEERS};
use crate::swarm::node_id_of;

/// Relays a node behind NAT keeps a slot on.
pub(super) const RELAYS: usize = 2;
/// How long a relay that refused or lost a reservation is left alone.
const RELAY_BACKOFF: Duration = Duration::from_secs(30);

/// The actor's reachability state.
pub(super) struct Nat {
    /// `swarm.relay_client`, and no `external_addrs` configured.
    reserve: bool,
    /// `swarm.external_addrs` is set: the operator says this node is reachable.
    external_configured: bool,
    /// From when a still-undecided AutoNAT counts as "not reachable".
    undecided_until: Instant,
    /// Peers that offer relaying, with an address they were reached at.
    relays: HashMap<PeerId, Multiaddr>,
    /// Reservations asked for or held: relay → the relayed listener.
    reservations: HashMap<PeerId, ListenerId>,
    /// Relays that accepted a reservation (the node is reachable through them).
    accepted: Vec<PeerId>,
    /// Members holding a relay slot on this node (connected, the slot not timed out).
    pub(super) slots: HashSet<PeerId>,
    /// How many times AutoNAT's verdict changed.
    pub(super) changes: u64,
    /// Relays not to ask again before the instant.
    backoff: HashMap<PeerId, Instant>,
    /// Where each peer was dialed (direct connections only).
    dialed_at: HashMap<PeerId, Multiaddr>,
    /// The newest direct connection this node dialed to a peer it was already connected to,
    /// and where: an AutoNAT dial-back, if a probe answer for that peer and address follows.
    extra_dialed: HashMap<PeerId, (ConnectionId, Multiaddr)>,
    /// Hole punches that opened a direct connection, and those that failed.
    pub(super) punched: u64,
    pub(super) punch_failed: u64,
}

impl Nat {
    pub(super) fn new(relay_client: bool, external_configured: bool, heartbeat: Duration) -> Self {
        Self {
            reserve: relay_client && !external_configured,
            external_configured,
            undecided_until: Instant::now() + (heartbeat * 3).max(Duration::from_secs(1)),
            relays: HashMap::new(),
            reservations: HashMap::new(),
            accepted: Vec::new(),
            slots: HashSet::new(),
            changes: 0,
            backoff: HashMap::new(),
            dialed_at: HashMap::new(),
            extra_dialed: HashMap::new(),
            punched: 0,
            punch_failed: 0,
        }
    }

    /// The relays holding a slot for this node.
    pub(super) fn relays_in_use(&self) -> Vec<PeerId> {
        self.accepted.clone()
    }
}

/// `addr` without a trailing `/p2p/<peer>`.
fn without_peer(addr: &Multiaddr) -> Multiaddr {
    let mut plain = addr.clone();
    if matches!(plain.iter().last(), Some(Protocol::P2p(_))) {
        plain.pop();
    }
    plain
}

/// Whether `addr` goes through a relay.
pub(super) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// AutoNAT's verdict in words, for the status.
pub(super) fn nat_words(status: &autonat::NatStatus) -> &'static str {
    match status {
        autonat::NatStatus::Public(_) => "public",
        autonat::NatStatus::Private => "private",
        autonat::NatStatus::Unknown => "unknown",
    }
}

impl Actor {
    /// A connection to `peer` opened; `established` connections to it are open now.
    pub(super) fn on_connection_for_nat(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        endpoint: &ConnectedPoint,
        established: u32,
    ) {
        if let ConnectedPoint::Dialer { address, .. } = endpoint
            && !is_relayed(address)
        {
            let plain = without_peer(address);
            if established > 1 {
                self.nat
                    .extra_dialed
                    .insert(peer, (connection, plain.clone()));
            }
            self.nat.dialed_at.insert(peer, plain);
        }
    }

    pub(super) fn on_disconnected_for_nat(&mut self, peer: &PeerId) {
        self.nat.dialed_at.remove(peer);
        self.nat.extra_dialed.remove(peer);
        self.nat.relays.remove(peer);
        if self.nat.slots.remove(peer) {
            self.stop_relaying_if_unused();
        }
    }

    /// This node, as an AutoNAT server, dialed `peer` back at `address` and told it so: the
    /// dial-back connection has done its work. It is closed at once when `peer` holds another
    /// connection: left open until idle, each probe of a peer with few neighbours would add
    /// one, until the per-peer connection limit refuses the next dial-back and the prober,
    /// though public, concludes it is private (and stops relaying for its members).
    fn close_dial_back(&mut self, peer: PeerId, address: &Multiaddr) {
        let Some((connection, dialed)) = self.nat.extra_dialed.remove(&peer) else {
            return;
        };
        if dialed == without_peer(address) {
            tracing::debug!(%peer, %address, "closing an AutoNAT dial-back connection");
            self.swarm.close_connection(connection);
        }
    }

    /// Identify told what `peer` supports: note whether it relays, and where it listens.
    pub(super) fn on_identify_for_nat(&mut self, peer: PeerId, info: &libp2p::identify::Info) {
        if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
            let addr = self.nat.dialed_at.get(&peer).cloned().or_else(|| {
                info.listen_addrs
                    .iter()
                    .find(|a| !is_relayed(a) && !is_loopback(a))
                    .cloned()
            });
            if let Some(addr) = addr {
                self.nat.relays.insert(peer, addr);
            }
        } else {
            self.nat.relays.remove(&peer);
        }
    }

    pub(super) fn on_autonat(&mut self, event: autonat::Event) {
        let (old, new) = match event {
            autonat::Event::StatusChanged { old, new } => (old, new),
            autonat::Event::InboundProbe(autonat::InboundProbeEvent::Response {
                peer,
                address,
                ..
            }) => {
                self.close_dial_back(peer, &address);
                return;
            }
            _ => return,
        };
        self.nat.changes += 1;
        tracing::info!(
            from = nat_words(&old),
            to = nat_words(&new),
            "reachability changed (AutoNAT)"
        );
        let explicit = self.nat.external_configured;
        match new {
            autonat::NatStatus::Public(_) => {
                let behaviour = self.swarm.behaviour_mut();
                if let Some(relay) = behaviour.relay.as_mut() {
                    relay.set_status(Some(relay::Status::Enable));
                }
                behaviour.kad.set_mode(Some(kad::Mode::Server));
                let listeners: Vec<ListenerId> = self.nat.reservations.values().copied().collect();
                for listener in listeners {
                    self.swarm.remove_listener(listener);
                }
                self.nat.reservations.clear();
                self.nat.accepted.clear();
            }
            autonat::NatStatus::Private if !explicit => {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .set_mode(Some(kad::Mode::Client));
                self.stop_relaying_if_unused();
                self.maintain_relays();
            }
            _ => {}
        }
    }

    pub(super) fn on_relay_client(&mut self, event: relay::client::Event) {
        match event {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            } => {
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "reachable through a relay");
                }
                if !self.nat.accepted.contains(&relay_peer_id) {
                    self.nat.accepted.push(relay_peer_id);
                }
            }
            relay::client::Event::OutboundCircuitEstablished { relay_peer_id, .. } => {
                tracing::debug!(relay = %relay_peer_id, "relayed connection out");
            }
            relay::client::Event::InboundCircuitEstablished { src_peer_id, .. } => {
                tracing::debug!(peer = %src_peer_id, "relayed connection in");
            }
        }
    }

    /// Turns the relay server off when AutoNAT says this node is private and no member holds
    /// a slot here. While members do, a private verdict is doubted (they reached this node,
    /// and a probe can fail for reasons of the prober's: a busy peer, a refused dial-back),
    /// and turning the relay off would cut every one of them off at once; it goes off when
    /// the last slot ends.
    fn stop_relaying_if_unused(&mut self) {
        let private = matches!(
            self.swarm.behaviour().autonat.nat_status(),
            autonat::NatStatus::Private
        );
        if !private || self.nat.external_configured {
            return;
        }
        if !self.nat.slots.is_empty() {
            tracing::info!(
                slots = self.nat.slots.len(),
                "AutoNAT says private, but members hold relay slots here: still relaying"
            );
            return;
        }
        if let Some(relay) = self.swarm.behaviour_mut().relay.as_mut() {
            relay.set_status(Some(relay::Status::Disable));
        }
    }

    pub(super) fn on_relay_server(&mut self, event: relay::Event) {
        match event {
            relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                tracing::debug!(peer = %src_peer_id, "holding a relay slot");
                self.nat.slots.insert(src_peer_id);
            }
            // Not `ReservationClosed`: libp2p-relay 0.22 reports it when any connection of
            // the peer closes, a dial-back for one, while the slot lives on another. A slot
            // ends when it times out or the peer disconnects altogether.
            relay::Event::ReservationTimedOut { src_peer_id } => {
                self.nat.slots.remove(&src_peer_id);
                self.stop_relaying_if_unused();
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                ..
            } => {
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "relay circuit refused (limits)");
            }
            other => tracing::trace!(?other, "relay server"),
        }
    }

    pub(super) fn on_dcutr(&mut self, event: dcutr::Event) {
        match event.result {
            Ok(_) => {
                self.nat.punched += 1;
                tracing::info!(peer = %event.remote_peer_id, "hole punched: direct connection");
            }
            Err(error) => {
                self.nat.punch_failed += 1;
                tracing::info!(peer = %event.remote_peer_id, %error, "hole punching failed: staying on the relay");
            }
        }
    }

    pub(super) fn on_mdns(&mut self, event: mdns::Event) {
        let mdns::Event::Discovered(found) = event else {
            return;
        };
        for (peer, addr) in found {
            if peer == self.local_peer || self.is_banned(&peer) || node_id_of(&peer).is_none() {
                continue;
            }
            self.swarm.add_peer_address(peer, addr);
            if !self.swarm.is_connected(&peer)
                && self.swarm.connected_peers().count() < TARGET_PEERS
            {
                tracing::debug!(%peer, "found a peer on the local network");
                let opts = DialOpts::peer_id(peer)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(error) = self.swarm.dial(opts) {
                    tracing::debug!(%peer, %error, "cannot dial a local peer");
                }
            }
        }
    }

    /// A listener closed: when it was a relay reservation, another relay is tried later.
    pub(super) fn on_listener_closed(&mut self, listener: ListenerId) {
        let Some(relay) = self
            .nat
            .reservations
            .iter()
            .find_map(|(relay, id)| (*id == listener).then_some(*relay))
        else {
            return;
        };
        tracing::info!(%relay, "relay slot lost");
        self.nat.reservations.remove(&relay);
        self.nat.accepted.retain(|r| *r != relay);
        self.nat
            .backoff
            .insert(relay, Instant::now() + RELAY_BACKOFF);
    }

    /// Once per heartbeat: keep [`RELAYS`] relay slots while this node is not reachable.
    pub(super) fn maintain_relays(&mut self) {
        if !self.nat.reserve {
            return;
        }
        let now = Instant::now();
        self.nat.backoff.retain(|_, until| *until > now);
        let needed = match self.swarm.behaviour().autonat.nat_status() {
            autonat::NatStatus::Public(_) => false,
            autonat::NatStatus::Private => true,
            autonat::NatStatus::Unknown => now >= self.nat.undecided_until,
        };
        if !needed || self.nat.reservations.len() >= RELAYS {
            return;
        }
        let mut candidates: Vec<(PeerId, Multiaddr)> = self
            .nat
            .relays
            .iter()
            .filter(|(peer, _)| {
                !self.nat.reservations.contains_key(peer)
                    && !self.nat.backoff.contains_key(peer)
                    && self.swarm.is_connected(peer)
                    && !self.is_banned(peer)
            })
            .map(|(peer, addr)| (*peer, addr.clone()))
            .collect();
        candidates.sort_by_key(|(peer, _)| *peer);
        let missing = RELAYS - self.nat.reservations.len();
        for (relay, addr) in candidates.into_iter().take(missing) {
            let circuit = addr.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    tracing::debug!(%circuit, "asking for a relay slot");
                    self.nat.reservations.insert(relay, listener);
                }
                Err(error) => {
                    tracing::debug!(%circuit, %error, "cannot ask for a relay slot");
                    self.nat.backoff.insert(relay, now + RELAY_BACKOFF);
                }
            }
        }
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}
