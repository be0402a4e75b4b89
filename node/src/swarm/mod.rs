//! The swarm: this node's part in the peer-to-peer network of its domain.
//!
//! # Actors
//!
//! - **The swarm actor** ([`actor`]) is one tokio task that owns the libp2p `Swarm` (TCP with
//!   Noise and Yamux; identify, ping, Kademlia under `/gaia/kad/1.0.0`, gossipsub with strict
//!   signing, application validation and peer scoring, a request-response control protocol,
//!   libp2p-stream chat streams, connection limits) and the domain's sans-IO state machines
//!   ([`gaia_protocol::machine::membership::Membership`] and [`gaia_protocol::machine::router::Router`]). It
//!   turns gossip messages and control RPC answers into membership events, and membership
//!   actions into gossip publications and RPCs. It never awaits a slow consumer: a full
//!   channel is answered with "busy".
//! - **[`SwarmHandle`]** is the `Clone` handle the rest of the node uses. It sends
//!   [`handle::Command`]s over a bounded channel, with oneshot replies, and opens chat streams
//!   itself (through libp2p-stream's `Control`, outside the actor's loop), one task per
//!   stream.
//! - **The stream acceptor** is a task that accepts inbound chat streams, asks the actor
//!   whether the peer may send requests (a valid member of the domain), and hands each request
//!   to the node's engine as an [`InboundChat`] on a bounded channel.
//!
//! # Identity
//!
//! The libp2p identity is the node's secp256k1 key ([`keypair`]): the `PeerId` and the
//! Ethereum address ([`NodeId`]) come from one key, and [`node_id_of`] maps a `PeerId` back to
//! the address, so a gossip message's authenticated source is a node address.
//!
//! # Joining a domain
//!
//! [`spawn`] listens, dials the manifest's bootstrap addresses and the configured extra peers,
//! subscribes to the domain's topic, asks the first peers it connects to for a member-table
//! snapshot (paged control RPC), and looks up the domain's key in the DHT (provider records are
//! a rendezvous) while it knows no member; it also provides that key itself.

pub mod actor;
pub mod behaviour;
pub mod codec;
pub mod config;
pub mod handle;
pub mod meter;
pub mod relay;
pub mod serve;
pub mod state;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use gaia_protocol::domain::{DomainManifest, MembershipCertificate};
use gaia_protocol::{NodeId, SecretKey, Signed};
use libp2p::Multiaddr;
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey, secp256k1};
use libp2p::multiaddr::Protocol;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use config::{SwarmConfig, SwarmLimits};
pub use handle::{
    ChatRequest, ChatStream, DomainTerms, InboundChat, MemberInfo, RelayError, SwarmHandle,
    SwarmStatus,
};
pub use relay::{RelayEvent, RelayStream};

use gaia_protocol::machine::Millis;
use gaia_protocol::machine::membership::LocalService;

/// The swarm could not start.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    /// The node key cannot be a libp2p identity.
    #[error("the node key cannot be used as a libp2p identity: {0}")]
    Identity(String),
    /// The configuration is unusable.
    #[error("invalid swarm configuration: {0}")]
    Config(String),
    /// A listen address is not a multiaddr or cannot be bound.
    #[error("cannot listen on {addr}: {reason}; choose another address or port in swarm.listen")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A behaviour could not be built.
    #[error("cannot build the swarm: {0}")]
    Behaviour(String),
    /// The transport could not be built.
    #[error("cannot build the transport: {0}")]
    Transport(String),
    /// The domain manifest or certificate is unusable.
    #[error("cannot join the domain: {0}")]
    Domain(String),
}

/// The libp2p identity of the node with `key` (the same secp256k1 key).
pub fn keypair(key: &SecretKey) -> Result<Keypair, SwarmError> {
    let mut bytes = *key.to_bytes();
    let secret = secp256k1::SecretKey::try_from_bytes(&mut bytes)
        .map_err(|e| SwarmError::Identity(e.to_string()))?;
    Ok(Keypair::from(secp256k1::Keypair::from(secret)))
}

/// The `PeerId` of the node with `key`.
pub fn peer_id(key: &SecretKey) -> Result<PeerId, SwarmError> {
    Ok(PeerId::from(keypair(key)?.public()))
}

/// The node address of `peer`, when its id inlines a secp256k1 public key (every Gaia node's
/// does); `None` for other peers.
pub fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    let multihash = peer.as_ref();
    if multihash.code() != 0 {
        return None;
    }
    let public = PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
    let secp = public.try_into_secp256k1().ok()?;
    NodeId::from_sec1_bytes(&secp.to_bytes()).ok()
}

/// The peer id at the end of `addr` (`/p2p/<id>`), if any.
pub fn peer_of_addr(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// The current time on the system clock, for the domain state machines.
pub fn now() -> Millis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Millis(ms)
}

/// What the swarm needs to start.
#[derive(Debug, Clone)]
pub struct SwarmParams {
    /// The node's key (its libp2p identity and the key that signs its adverts).
    pub key: SecretKey,
    /// The `[swarm]` configuration.
    pub config: SwarmConfig,
    /// The signed manifest of the domain to join (`None`: no domain).
    pub manifest: Option<Signed<DomainManifest>>,
    /// This node's membership certificate, when the domain requires one.
    pub certificate: Option<Signed<MembershipCertificate>>,
    /// What this node serves, when it runs a model (`None` for a gateway); its `addrs` are
    /// filled in by the swarm.
    pub service: Option<LocalService>,
    /// Seed of the membership and router random choices (jitter, power of two choices).
    pub seed: u64,
    /// Where the domain's state (the newest manifest and the verified revocations) is kept
    /// across restarts, one directory per domain; `None` keeps it in memory only.
    pub state_dir: Option<std::path::PathBuf>,
    /// Where vouchers other entry nodes publish on the domain's topic go (signatures checked;
    /// dropped when full). `None`: nowhere (a node that takes no payments still passes them
    /// on).
    pub vouchers: Option<mpsc::Sender<gaia_protocol::payment::VoucherShare>>,
    /// The vouchers this node knows, for entry nodes that catch up, and the escrow whose
    /// vouchers it asks its peers for when it joins (`None`: it takes no payments).
    pub voucher_source: Option<Arc<dyn VoucherSource>>,
    /// What this node seeds to members that fetch content by hash (`None`: it refuses every
    /// content stream).
    pub content: Option<Arc<crate::content::seed::Seeder>>,
}

/// What an entry node knows of an escrow's vouchers (`crate::pay::Payments`).
pub trait VoucherSource: Send + Sync + std::fmt::Debug {
    /// The escrow.
    fn escrow(&self) -> gaia_protocol::payment::Escrow;
    /// The latest voucher of each channel after `after`, in channel order, at most `limit`.
    fn vouchers_after(
        &self,
        after: Option<gaia_protocol::control::VoucherKey>,
        limit: usize,
    ) -> Vec<gaia_protocol::payment::SignedVoucher>;
}

impl SwarmParams {
    /// The parameters the `[swarm]` section describes: reads and verifies the manifest and
    /// certificate files it names. `service` is what the node serves (ignored, and `None`, in
    /// gateway mode); the seed is random.
    pub fn from_config(
        key: SecretKey,
        config: SwarmConfig,
        service: Option<LocalService>,
    ) -> Result<Self, SwarmError> {
        let manifest = config
            .domain
            .as_deref()
            .map(crate::domain_cli::read_manifest)
            .transpose()
            .map_err(|e| SwarmError::Domain(format!("{e:#}")))?;
        let certificate = match (&config.certificate, &manifest) {
            (Some(path), Some(manifest)) => Some(
                crate::domain_cli::read_certificate(path, &manifest.payload)
                    .map_err(|e| SwarmError::Domain(format!("{e:#}")))?,
            ),
            (Some(path), None) => {
                return Err(SwarmError::Config(format!(
                    "swarm.certificate is set ({}) but swarm.domain is not: name the domain's \
                     manifest file",
                    path.display()
                )));
            }
            (None, _) => None,
        };
        let service = if config.gateway { None } else { service };
        Ok(Self {
            key,
            config,
            manifest,
            certificate,
            service,
            seed: rand::random(),
            state_dir: None,
            vouchers: None,
            voucher_source: None,
            content: None,
        })
    }
}

/// A running swarm: its handle, the inbound chat requests for the node's engine, and the
/// actor's task (ends after [`SwarmHandle::shutdown`] or when every handle is dropped).
pub struct Running {
    /// The handle.
    pub handle: SwarmHandle,
    /// Chat requests from peers (and from this node's own router when it picks itself), for
    /// the engine to serve. Bounded: when the engine does not keep up, peers get `Busy`.
    pub inbound: mpsc::Receiver<InboundChat>,
    /// The actor task.
    pub task: JoinHandle<()>,
}

/// Starts the swarm actor and the stream acceptor on the current tokio runtime.
///
/// Must be called from within a tokio runtime. Fails when the configuration, the key, the
/// manifest or a listen address is unusable.
pub async fn spawn(params: SwarmParams) -> Result<Running, SwarmError> {
    actor::spawn(params).await
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Signed wire values for the swarm's unit tests.

    use gaia_protocol::domain::{DomainId, Revocation};
    use gaia_protocol::{NodeId, SecretKey, Signed};

    pub(crate) fn key(seed: u8) -> SecretKey {
        let mut bytes = [seed.clamp(1, 0x7f); 32];
        bytes[31] = 0x33;
        SecretKey::from_bytes(&bytes).expect("a small non-zero scalar is a valid key")
    }

    pub(crate) fn revocation(
        operator: &SecretKey,
        domain: DomainId,
        member: NodeId,
        serial: u64,
    ) -> Signed<Revocation> {
        let rev = Revocation {
            domain,
            member,
            serial,
            revoked_at: 1_700_000_100,
        };
        Signed::sign(rev, operator).expect("valid revocation")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_and_node_id_come_from_one_key() {
        let key = test_support::key(9);
        let peer = peer_id(&key).unwrap();
        assert_eq!(node_id_of(&peer), Some(key.node_id()));
        // A peer id of another key type has no node address.
        let ed = PeerId::random();
        assert_eq!(node_id_of(&ed), None);
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/5/p2p/{peer}").parse().unwrap();
        assert_eq!(peer_of_addr(&addr), Some(peer));
        assert_eq!(peer_of_addr(&"/ip4/127.0.0.1/tcp/5".parse().unwrap()), None);
    }
}
