//! The Gaia wire protocol.
//!
//! This crate is the leaf of the workspace and stays pure: no async runtime, no sockets, no libp2p
//! swarm. It holds what two nodes must agree on byte for byte (content hashes, node identities,
//! signatures, the wire types and their codecs) and what every node decides about its domain
//! ([`machine`]).
//!
//! - [`identity`]: the node's secp256k1 key and its Ethereum address ([`NodeId`]).
//! - [`keystore`]: the key at rest, as an Ethereum keystore v3 file.
//! - [`signature`]: Ethereum-style recoverable signatures, EIP-712 per message kind and EIP-191.
//! - [`signed`]: the [`Signed`] envelope every signed wire message travels in.
//! - [`domain`], [`advert`], [`control`], [`stream`], [`payment`], [`content`]: the wire types.
//! - [`codec`]: bounded bincode encoding ([`Wire`]) and the length-prefixed frame codec.
//! - [`layouts`]: the version-1 layouts of adverts, receipts and manifests, kept while they
//!   hold a value so nodes of the previous version understand it.
//! - [`validate`]: the static checks every wire value passes.
//! - [`gossip`]: the messages on a domain's gossip topic.
//! - [`machine`]: the domain's whole decision logic as sans-IO state machines (membership,
//!   routing, failover, the guard of budgets, authorisation and bans), driven by the node's
//!   swarm actor and by the simulator.
#![deny(missing_docs, unreachable_pub)]

mod bytes;

pub mod advert;
pub mod codec;
pub mod content;
pub mod control;
pub mod domain;
pub mod gossip;
pub mod hash;
pub mod identity;
pub mod keystore;
pub mod layouts;
pub mod machine;
pub mod payment;
pub mod signature;
pub mod signed;
pub mod stream;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod validate;

pub use codec::Wire;
pub use hash::ContentHash;
pub use identity::{NodeId, PublicKey, SecretKey};
pub use signature::{MessageKind, Signature};
pub use signed::{Signable, Signed};
pub use validate::Validate;

/// libp2p protocol names of the Gaia swarm. Ours, so Gaia nodes never mix with other networks.
pub mod protocols {
    /// Kademlia DHT.
    pub const KAD: &str = "/gaia/kad/1.0.0";
    /// Control RPC ([`crate::control`]), version 3: adverts and manifests with prices
    /// ([`crate::layouts`]).
    pub const CONTROL: &str = "/gaia/control/3.0.0";
    /// Control RPC version 2 (adds the domain-state request), still answered.
    pub const CONTROL_V2: &str = "/gaia/control/2.0.0";
    /// Control RPC version 1, still answered (member snapshots and pings only).
    pub const CONTROL_V1: &str = "/gaia/control/1.0.0";
    /// Completion streams ([`crate::stream`]), version 3: the serving node's retrieval
    /// sources and the prompt tokens its prefix cache held.
    pub const STREAM: &str = "/gaia/stream/3.0.0";
    /// Completion streams version 2 (receipts with two prices), still answered.
    pub const STREAM_V2: &str = "/gaia/stream/2.0.0";
    /// Completion streams version 1, still answered.
    pub const STREAM_V1: &str = "/gaia/stream/1.0.0";
    /// Content fetch ([`crate::content`]): models and knowledge-base snapshots by hash, in
    /// verified chunks. A node without it answers "unsupported protocol", which a fetcher
    /// reports as a seeder of an older version.
    pub const CONTENT: &str = "/gaia/content/1.0.0";
}
