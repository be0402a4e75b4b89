//! The libp2p behaviours of a Gaia node, combined into one [`Behaviour`].

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use gaia_protocol::protocols;
use libp2p::gossipsub::{
    self, IdentTopic, MessageAuthenticity, MessageId, PeerScoreParams, PeerScoreThresholds,
    TopicScoreParams, ValidationMode,
};
use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    PeerId, StreamProtocol, autonat, connection_limits, dcutr, identify, kad, mdns, ping, relay,
    request_response,
};
use sha2::{Digest, Sha256};

use super::SwarmError;
use super::codec::ControlCodec;
use super::config::{SwarmConfig, SwarmLimits};
use gaia_protocol::gossip::MAX_GOSSIP_BYTES;

/// The identify protocol version of Gaia nodes.
pub const IDENTIFY_PROTOCOL: &str = "/gaia/id/1.0.0";

/// Application-score penalty of one invalid message, request or stream (gossipsub peer score).
pub const PENALTY: f64 = 10.0;

/// Every behaviour of a node; one task owns it inside the `Swarm` (see the actor).
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Connection limits (first, so it can deny a connection before the others see it).
    pub limits: connection_limits::Behaviour,
    /// Peer information: listen addresses and protocols.
    pub identify: identify::Behaviour,
    /// Liveness.
    pub ping: ping::Behaviour,
    /// The DHT under `/gaia/kad/1.0.0`: peer routing and domain rendezvous.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Adverts, certificates and revocations.
    pub gossipsub: gossipsub::Behaviour,
    /// Control RPCs (member snapshots, pings).
    pub control: request_response::Behaviour<ControlCodec>,
    /// Chat streams.
    pub stream: libp2p_stream::Behaviour,
    /// AutoNAT (v1): peers dial back the addresses they observe, which tells this node whether
    /// it is publicly reachable and confirms its external addresses.
    pub autonat: autonat::v1::Behaviour,
    /// Circuit relay v2, server side: slots and circuits for members behind NAT, enabled
    /// while AutoNAT says this node is public (or `external_addrs` says so).
    pub relay: Toggle<relay::Behaviour>,
    /// Circuit relay v2, client side: reservations on public members, relayed dials.
    pub relay_client: relay::client::Behaviour,
    /// Hole punching: turns a relayed connection into a direct one (`swarm.hole_punching`).
    pub dcutr: Toggle<dcutr::Behaviour>,
    /// Local-network discovery (`swarm.mdns`).
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

/// The gossip message id: the sha256 of the content, so that the same advert relayed by
/// several peers is one message.
fn message_id(message: &gossipsub::Message) -> MessageId {
    MessageId::from(Sha256::digest(&message.data).to_vec())
}

/// The gossip topic carrying a domain's messages.
pub fn topic(name: &str) -> IdentTopic {
    IdentTopic::new(name)
}

/// Peer-score parameters: invalid messages (rejected by validation) and application penalties
/// weigh heavily; mesh-delivery rates do not count (adverts are rare by design); peers on the
/// same loopback or private address are not treated as a Sybil colony.
fn score_params(topic: &IdentTopic, heartbeat: Duration) -> PeerScoreParams {
    let mut topics = HashMap::new();
    topics.insert(
        topic.hash(),
        TopicScoreParams {
            topic_weight: 1.0,
            time_in_mesh_weight: 0.01,
            time_in_mesh_quantum: heartbeat.max(Duration::from_millis(100)),
            time_in_mesh_cap: 10.0,
            first_message_deliveries_weight: 1.0,
            first_message_deliveries_decay: 0.5,
            first_message_deliveries_cap: 10.0,
            mesh_message_deliveries_weight: 0.0,
            mesh_failure_penalty_weight: 0.0,
            invalid_message_deliveries_weight: -20.0,
            invalid_message_deliveries_decay: 0.5,
            ..TopicScoreParams::default()
        },
    );
    let whitelist: HashSet<IpAddr> = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]
    .into_iter()
    .collect();
    PeerScoreParams {
        topics,
        app_specific_weight: 1.0,
        ip_colocation_factor_whitelist: whitelist,
        ..PeerScoreParams::default()
    }
}

fn score_thresholds() -> PeerScoreThresholds {
    PeerScoreThresholds {
        gossip_threshold: -20.0,
        publish_threshold: -40.0,
        graylist_threshold: -60.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 5.0,
    }
}

impl Behaviour {
    /// Every behaviour for the node with `keypair`, its gossip topic `topic`, its `[swarm]`
    /// configuration and the relay client the transport was built with.
    pub fn new(
        keypair: &Keypair,
        topic: &IdentTopic,
        config: &SwarmConfig,
        relay_client: relay::client::Behaviour,
    ) -> Result<Self, SwarmError> {
        let local = PeerId::from(keypair.public());
        let heartbeat = config.heartbeat();
        let limits = &config.limits;

        let connection_limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(limits.max_connections))
            .with_max_established_per_peer(Some(limits.max_connections_per_peer))
            .with_max_pending_incoming(Some(limits.max_pending))
            .with_max_pending_outgoing(Some(limits.max_pending));

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.into(), keypair.public())
                .with_agent_version(format!("gaia/{}", env!("CARGO_PKG_VERSION"))),
        );

        let mut kad_config = kad::Config::new(StreamProtocol::new(protocols::KAD));
        kad_config
            .set_query_timeout(Duration::from_secs(30))
            .set_record_ttl(Some(Duration::from_secs(3600)))
            .set_provider_record_ttl(Some(Duration::from_secs(3600)))
            .set_provider_publication_interval(Some(Duration::from_secs(600)))
            .set_max_packet_size(64 * 1024);
        let store = kad::store::MemoryStore::with_config(
            local,
            kad::store::MemoryStoreConfig {
                max_records: 1024,
                max_value_bytes: 16 * 1024,
                max_providers_per_key: 20,
                max_provided_keys: 64,
            },
        );
        let mut kad = kad::Behaviour::with_config(local, store, kad_config);
        kad.set_mode(Some(kad::Mode::Server));

        // Messages are not signed by libp2p: every payload (advert, certificate, revocation)
        // carries its own signature, checked once per message by the membership machine, while
        // libp2p's would be checked on every copy received, before de-duplication. With 50
        // nodes on two cores that doubled verification was the largest single CPU cost and
        // pushed advert delivery past the silence timeout. `source` is therefore only a claim;
        // penalties go to the peer that delivered a message (see the actor).
        let gossip_config = gossipsub::ConfigBuilder::default()
            .validation_mode(ValidationMode::Permissive)
            .validate_messages()
            .message_id_fn(message_id)
            .max_transmit_size(MAX_GOSSIP_BYTES + 1024)
            .heartbeat_interval(Duration::from_millis(500).min(heartbeat))
            .duplicate_cache_time(Duration::from_secs(120))
            .mesh_n_low(2)
            .mesh_n(4)
            .mesh_n_high(8)
            .mesh_outbound_min(1)
            .build()
            .map_err(|e| SwarmError::Behaviour(format!("gossipsub configuration: {e}")))?;
        let mut gossipsub =
            gossipsub::Behaviour::new(MessageAuthenticity::Author(local), gossip_config)
                .map_err(|e| SwarmError::Behaviour(format!("gossipsub: {e}")))?;
        gossipsub
            .with_peer_score(score_params(topic, heartbeat), score_thresholds())
            .map_err(|e| SwarmError::Behaviour(format!("gossipsub peer scoring: {e}")))?;

        // Version 3 first (what this node asks in); versions 2 and 1 still answered.
        let control = request_response::Behaviour::new(
            [
                (
                    StreamProtocol::new(protocols::CONTROL),
                    request_response::ProtocolSupport::Full,
                ),
                (
                    StreamProtocol::new(protocols::CONTROL_V2),
                    request_response::ProtocolSupport::Full,
                ),
                (
                    StreamProtocol::new(protocols::CONTROL_V1),
                    request_response::ProtocolSupport::Full,
                ),
            ],
            request_response::Config::default()
                .with_request_timeout(Duration::from_millis(limits.rpc_timeout_ms))
                .with_max_concurrent_streams(limits.max_concurrent_rpcs),
        );

        // Probes start one heartbeat after start and repeat every three until AutoNAT is
        // sure. Only peers observed at global addresses serve as probes and only global
        // addresses are confirmed: a neighbour on the same LAN can always dial back, which
        // says nothing about the internet (so on loopback or a LAN AutoNAT stays undecided).
        let autonat = autonat::v1::Behaviour::new(
            local,
            autonat::v1::Config {
                boot_delay: heartbeat.min(Duration::from_secs(15)),
                retry_interval: (heartbeat * 3).min(Duration::from_secs(90)),
                refresh_interval: Duration::from_secs(15 * 60),
                throttle_server_period: Duration::from_secs(1),
                ..autonat::v1::Config::default()
            },
        );
        let relay = config.relay_server.then(|| {
            let mut relay = relay::Behaviour::new(local, relay_config(limits));
            // Off until this node is known to be publicly reachable: a relayed address of
            // its own must not make a node behind NAT offer to relay for others.
            relay.set_status(Some(relay::Status::Disable));
            relay
        });
        let mdns = if config.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), local)
                    .map_err(|e| SwarmError::Behaviour(format!("mDNS: {e}")))?,
            )
        } else {
            None
        };

        Ok(Self {
            limits: connection_limits::Behaviour::new(connection_limits),
            identify,
            ping: ping::Behaviour::new(ping::Config::new()),
            kad,
            gossipsub,
            control,
            stream: libp2p_stream::Behaviour::new(),
            autonat,
            relay: Toggle::from(relay),
            relay_client,
            dcutr: Toggle::from(config.hole_punching.then(|| dcutr::Behaviour::new(local))),
            mdns: Toggle::from(mdns),
        })
    }
}

/// The relay server's limits: `limits.relay_*`, at most 4 circuits and 2 slots per peer, one
/// new slot per peer per 10 s.
fn relay_config(limits: &SwarmLimits) -> relay::Config {
    let per_peer = std::num::NonZeroU32::new(6).unwrap_or(std::num::NonZeroU32::MIN);
    relay::Config {
        max_reservations: limits.relay_reservations,
        max_reservations_per_peer: 2,
        reservation_duration: Duration::from_secs(3600),
        max_circuits: limits.relay_circuits,
        max_circuits_per_peer: 4,
        max_circuit_duration: Duration::from_secs(limits.relay_circuit_secs),
        max_circuit_bytes: limits.relay_circuit_bytes,
        reservation_rate_limiters: Vec::new(),
        circuit_src_rate_limiters: Vec::new(),
    }
    .reservation_rate_per_peer(per_peer, Duration::from_secs(60))
    .circuit_src_per_peer(
        std::num::NonZeroU32::new(30).unwrap_or(std::num::NonZeroU32::MIN),
        Duration::from_secs(60),
    )
}
