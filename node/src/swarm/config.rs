//! The `[swarm]` section of `gaia.toml`: how the node joins the peer-to-peer network.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the node takes part in the swarm. Every field has a default, so an empty `[swarm]`
/// section (or none) gives a node that listens on TCP and QUIC port 4001 of every interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwarmConfig {
    /// Multiaddrs to listen on: TCP (`/ip4/…/tcp/<port>`, Noise and Yamux) or QUIC
    /// (`/ip4/…/udp/<port>/quic-v1`). Default `["/ip4/0.0.0.0/tcp/4001",
    /// "/ip4/0.0.0.0/udp/4001/quic-v1"]`; port 0 picks a free port.
    pub listen: Vec<String>,
    /// Extra peers to join through, as multiaddrs ending in `/p2p/<peer id>` (or without it),
    /// tried besides the bootstrap addresses of the domain manifest. Default none.
    pub bootstrap: Vec<String>,
    /// The domain to join: the path of a signed manifest file (written by `gaia domain
    /// create`). Default none: the node serves only itself.
    pub domain: Option<PathBuf>,
    /// This node's membership certificate for the domain (written by `gaia domain admit`);
    /// needed unless the domain's admission is open. Default none.
    pub certificate: Option<PathBuf>,
    /// Run without a model: only route requests to the domain. Default false.
    pub gateway: bool,
    /// How often this node publishes its advert, in milliseconds; a member silent for three
    /// intervals leaves the member table. Default 10 000.
    pub heartbeat_ms: u64,
    /// Addresses at which this node is reachable from the internet (a public IP, a port
    /// forwarded by the router), as multiaddrs without `/p2p/`. Default none: AutoNAT finds
    /// out by asking peers to dial back the addresses they observe.
    pub external_addrs: Vec<String>,
    /// Relay circuits for members behind NAT when this node is publicly reachable (circuit
    /// relay v2, bounded by `limits.relay_*`). Default true.
    pub relay_server: bool,
    /// When this node is not publicly reachable (AutoNAT says private, or has not decided
    /// within three heartbeats), reserve a slot on publicly reachable members and advertise
    /// the relayed address; DCUtR then tries to punch a direct connection. Default true.
    pub relay_client: bool,
    /// Try to turn relayed connections into direct ones by hole punching (DCUtR). Default
    /// true.
    pub hole_punching: bool,
    /// Find peers on the local network with mDNS, with no bootstrap address. Default false.
    pub mdns: bool,
    /// Send a chat's next turn to the node that served its earlier turns (it holds the
    /// history in its prefix cache), unless that node is more than twice as busy as the
    /// best other choice. Default true.
    pub prefix_affinity: bool,
    /// Connection, stream and message limits.
    pub limits: SwarmLimits,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        Self {
            listen: listen_addrs(DEFAULT_PORT),
            bootstrap: Vec::new(),
            domain: None,
            certificate: None,
            gateway: false,
            heartbeat_ms: 10_000,
            external_addrs: Vec::new(),
            relay_server: true,
            relay_client: true,
            hole_punching: true,
            mdns: false,
            prefix_affinity: true,
            limits: SwarmLimits::default(),
        }
    }
}

/// The default peer-to-peer port (TCP and UDP).
pub const DEFAULT_PORT: u16 = 4001;

/// TCP and QUIC listen addresses on `port` of every IPv4 interface.
fn listen_addrs(port: u16) -> Vec<String> {
    vec![
        format!("/ip4/0.0.0.0/tcp/{port}"),
        format!("/ip4/0.0.0.0/udp/{port}/quic-v1"),
    ]
}

impl SwarmConfig {
    /// The config with every listen address replaced by TCP and QUIC ones on `port` of every
    /// interface (0 for free ones, picked separately for TCP and UDP).
    pub fn with_port(mut self, port: u16) -> Self {
        self.listen = listen_addrs(port);
        self
    }

    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// Checks the values a typo could make unusable.
    pub fn check(&self) -> Result<(), String> {
        if self.listen.is_empty() {
            return Err(
                "swarm.listen is empty: give at least one multiaddr, such as \
                        \"/ip4/0.0.0.0/tcp/4001\""
                    .into(),
            );
        }
        if self.heartbeat_ms < 100 {
            return Err(format!(
                "swarm.heartbeat_ms is {}: use at least 100 (milliseconds)",
                self.heartbeat_ms
            ));
        }
        for addr in &self.external_addrs {
            let parsed: libp2p::Multiaddr = addr
                .parse()
                .map_err(|e| format!("swarm.external_addrs: {addr:?} is not a multiaddr ({e})"))?;
            if parsed.iter().any(|p| {
                matches!(
                    p,
                    libp2p::multiaddr::Protocol::P2p(_) | libp2p::multiaddr::Protocol::P2pCircuit
                )
            }) {
                return Err(format!(
                    "swarm.external_addrs: {addr:?} names a peer or a relay circuit; give the \
                     address alone, such as \"/ip4/203.0.113.7/tcp/4001\""
                ));
            }
        }
        self.limits.check()
    }
}

/// Connection, stream and message limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwarmLimits {
    /// Established connections in all. Default 512.
    pub max_connections: u32,
    /// Established connections per peer (a relayed one, the direct one hole punching
    /// opens, AutoNAT's dial-back). Default 4.
    pub max_connections_per_peer: u32,
    /// Connections being set up, in each direction. Default 64.
    pub max_pending: u32,
    /// Yamux streams per connection. Default 256.
    pub max_streams_per_connection: usize,
    /// Chat streams this node serves at once; more are answered with `Busy`. Default 64.
    pub max_inbound_chats: usize,
    /// Control RPCs in flight per connection. Default 16.
    pub max_concurrent_rpcs: usize,
    /// Time allowed for one control RPC, in milliseconds. Default 10 000.
    pub rpc_timeout_ms: u64,
    /// Time allowed to open a chat stream and send the request, in milliseconds. Default 10 000.
    pub open_timeout_ms: u64,
    /// Time allowed between two frames of a chat stream, in milliseconds. Default 60 000.
    pub frame_timeout_ms: u64,
    /// Connections without traffic close after this many milliseconds. Default 120 000.
    pub idle_connection_ms: u64,
    /// Frames buffered per chat stream between the network and its reader. Default 64.
    pub chat_buffer: usize,
    /// Members behind NAT this node holds a relay slot for at once. Default 128.
    pub relay_reservations: usize,
    /// Relayed connections through this node at once (4 per source peer). Default 64.
    pub relay_circuits: usize,
    /// Bytes one relayed connection may carry (each way) before the relay closes it; the
    /// peers then dial again. Default 64 MiB.
    pub relay_circuit_bytes: u64,
    /// How long one relayed connection lasts, in seconds. Default 1 800.
    pub relay_circuit_secs: u64,
}

impl Default for SwarmLimits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_connections_per_peer: 4,
            max_pending: 64,
            max_streams_per_connection: 256,
            max_inbound_chats: 64,
            max_concurrent_rpcs: 16,
            rpc_timeout_ms: 10_000,
            open_timeout_ms: 10_000,
            frame_timeout_ms: 60_000,
            idle_connection_ms: 120_000,
            chat_buffer: 64,
            relay_reservations: 128,
            relay_circuits: 64,
            relay_circuit_bytes: 64 << 20,
            relay_circuit_secs: 1_800,
        }
    }
}

impl SwarmLimits {
    fn check(&self) -> Result<(), String> {
        let positive = [
            ("max_connections", self.max_connections as u64),
            (
                "max_connections_per_peer",
                self.max_connections_per_peer as u64,
            ),
            ("max_pending", self.max_pending as u64),
            (
                "max_streams_per_connection",
                self.max_streams_per_connection as u64,
            ),
            ("max_inbound_chats", self.max_inbound_chats as u64),
            ("max_concurrent_rpcs", self.max_concurrent_rpcs as u64),
            ("rpc_timeout_ms", self.rpc_timeout_ms),
            ("open_timeout_ms", self.open_timeout_ms),
            ("frame_timeout_ms", self.frame_timeout_ms),
            ("idle_connection_ms", self.idle_connection_ms),
            ("chat_buffer", self.chat_buffer as u64),
            ("relay_reservations", self.relay_reservations as u64),
            ("relay_circuits", self.relay_circuits as u64),
            ("relay_circuit_bytes", self.relay_circuit_bytes),
            ("relay_circuit_secs", self.relay_circuit_secs),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("swarm.limits.{name} is 0: it must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_section_gives_defaults() {
        let config: SwarmConfig = toml::from_str("").unwrap();
        assert_eq!(config, SwarmConfig::default());
        assert!(config.check().is_ok());
    }

    #[test]
    fn fields_parse_and_unknown_fields_fail() {
        let config: SwarmConfig = toml::from_str(
            "listen = [\"/ip4/127.0.0.1/tcp/0\"]\ngateway = true\nheartbeat_ms = 500\n\
             [limits]\nmax_inbound_chats = 3\n",
        )
        .unwrap();
        assert!(config.gateway);
        assert_eq!(config.heartbeat_ms, 500);
        assert_eq!(config.limits.max_inbound_chats, 3);
        assert_eq!(config.limits.max_connections, 512);
        assert!(toml::from_str::<SwarmConfig>("listn = []").is_err());
        assert!(toml::from_str::<SwarmConfig>("[limits]\nmax_conections = 1").is_err());
    }

    #[test]
    fn check_rejects_unusable_values() {
        let config = SwarmConfig {
            heartbeat_ms: 5,
            ..SwarmConfig::default()
        };
        assert!(config.check().unwrap_err().contains("heartbeat_ms"));
        let config = SwarmConfig {
            limits: SwarmLimits {
                chat_buffer: 0,
                ..SwarmLimits::default()
            },
            ..SwarmConfig::default()
        };
        assert!(config.check().unwrap_err().contains("chat_buffer"));
        let config = SwarmConfig {
            external_addrs: vec!["/ip4/203.0.113.7/tcp/4001/p2p-circuit".into()],
            ..SwarmConfig::default()
        };
        assert!(config.check().unwrap_err().contains("external_addrs"));
        let config = SwarmConfig {
            external_addrs: vec!["203.0.113.7:4001".into()],
            ..SwarmConfig::default()
        };
        assert!(config.check().unwrap_err().contains("not a multiaddr"));
        let config = SwarmConfig {
            external_addrs: vec!["/ip4/203.0.113.7/tcp/4001".into()],
            ..SwarmConfig::default()
        };
        assert!(config.check().is_ok());
        let listen = SwarmConfig::default().with_port(0).listen;
        assert_eq!(listen, ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]);
        assert_eq!(
            SwarmConfig::default().listen,
            ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
        );
    }
}
