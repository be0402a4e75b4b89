//! Adverts: what a node serves and how busy it is, signed by the node and gossiped in its domain.

use serde::{Deserialize, Serialize};

use crate::codec::impl_wire;
use crate::domain::{
    DomainId, MAX_CLOCK_SKEW_SECS, MAX_MULTIADDR_LEN, MembershipError, Requirements,
};
use crate::hash::ContentHash;
use crate::identity::NodeId;
use crate::payment::Price;
use crate::signature::MessageKind;
use crate::signed::Signable;
use crate::validate::{self, Validate, ValidationError};

/// A signed advert must encode to less than 16 KiB (gossip messages stay small).
pub const MAX_ADVERT_BYTES: usize = 16 * 1024 - 1;
/// The most listen addresses in an advert.
pub const MAX_ADVERT_ADDRS: usize = 16;
/// The longest model name, in bytes.
pub const MAX_MODEL_NAME_LEN: usize = 128;

/// What the node's model can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Whether it serves tool calls.
    pub tools: bool,
    /// Whether it serves constrained output (JSON schema, grammars).
    pub structured_output: bool,
    /// The context window, in tokens.
    pub context_length: u32,
    /// The most tokens it generates for one request.
    pub max_tokens: u32,
}

/// How busy the node is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Requests being generated now.
    pub in_flight: u32,
    /// Requests waiting for a slot.
    pub queued: u32,
    /// Recent decode throughput, tokens per second (finite, >= 0).
    pub tokens_per_s: f32,
}

/// A node's signed statement of what it serves in a domain.
///
/// Its fields are in wire order: `completion_price` came with protocol version 2 and is
/// appended; an advert whose two prices are equal keeps version 1's layout
/// ([`crate::layouts`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advert {
    /// The node; must be the signer.
    pub node: NodeId,
    /// The domain it serves.
    pub domain: DomainId,
    /// Increases with every advert the node sends; a receiver drops anything not newer than
    /// what it has.
    pub seq: u64,
    /// The model name clients use in the `model` field (e.g. `"SmolLM2-135M-Instruct"`).
    pub model_name: String,
    /// The model file it runs (sha256).
    pub model_hash: ContentHash,
    /// The knowledge-base snapshot it serves, if any.
    pub kb_hash: Option<ContentHash>,
    /// The system prompt it uses, if any.
    pub prompt_hash: Option<ContentHash>,
    /// What its model can do.
    pub capabilities: Capabilities,
    /// How busy it is.
    pub load: Load,
    /// Price per 1000 prompt tokens, in the smallest unit of the domain's currency (version
    /// 1: of all tokens).
    pub prompt_price: u64,
    /// Multiaddrs (as text) where it can be reached.
    #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_ADVERT_ADDRS>")]
    pub addrs: Vec<String>,
    /// When it was sent (unix seconds).
    pub sent_at: u64,
    /// True in the node's last advert before it leaves the domain.
    pub leaving: bool,
    /// Price per 1000 completion tokens (version 2).
    pub completion_price: u64,
}

/// An advert in protocol version 1's layout: one price for every token.
#[derive(Serialize, Deserialize)]
pub struct AdvertV1 {
    node: NodeId,
    domain: DomainId,
    seq: u64,
    model_name: String,
    model_hash: ContentHash,
    kb_hash: Option<ContentHash>,
    prompt_hash: Option<ContentHash>,
    capabilities: Capabilities,
    load: Load,
    price: u64,
    #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_ADVERT_ADDRS>")]
    addrs: Vec<String>,
    sent_at: u64,
    leaving: bool,
}

impl crate::layouts::Layouts for Advert {
    type V1 = AdvertV1;

    fn to_v1(&self) -> Option<AdvertV1> {
        self.price().is_flat().then(|| AdvertV1 {
            node: self.node,
            domain: self.domain,
            seq: self.seq,
            model_name: self.model_name.clone(),
            model_hash: self.model_hash,
            kb_hash: self.kb_hash,
            prompt_hash: self.prompt_hash,
            capabilities: self.capabilities.clone(),
            load: self.load.clone(),
            price: self.prompt_price,
            addrs: self.addrs.clone(),
            sent_at: self.sent_at,
            leaving: self.leaving,
        })
    }

    fn from_v1(v1: AdvertV1) -> Self {
        Self {
            node: v1.node,
            domain: v1.domain,
            seq: v1.seq,
            model_name: v1.model_name,
            model_hash: v1.model_hash,
            kb_hash: v1.kb_hash,
            prompt_hash: v1.prompt_hash,
            capabilities: v1.capabilities,
            load: v1.load,
            prompt_price: v1.price,
            addrs: v1.addrs,
            sent_at: v1.sent_at,
            leaving: v1.leaving,
            completion_price: v1.price,
        }
    }
}

impl Advert {
    /// The prices it asks.
    pub fn price(&self) -> Price {
        Price {
            prompt: self.prompt_price,
            completion: self.completion_price,
        }
    }

    /// Checks that the advert is for `domain` and that the node meets `requirements`.
    pub fn check_requirements(
        &self,
        domain: &DomainId,
        requirements: &Requirements,
    ) -> Result<(), MembershipError> {
        if self.domain != *domain {
            return Err(MembershipError::WrongDomain {
                expected: *domain,
                got: self.domain,
            });
        }
        requirements.check(
            &self.model_hash,
            self.kb_hash.as_ref(),
            self.prompt_hash.as_ref(),
        )
    }

    /// Whether the advert is recent at `now`: sent at most `max_age_secs` ago and not more than
    /// [`MAX_CLOCK_SKEW_SECS`] in the future.
    pub fn is_fresh(&self, now: u64, max_age_secs: u64) -> bool {
        self.sent_at <= now.saturating_add(MAX_CLOCK_SKEW_SECS)
            && now.saturating_sub(self.sent_at) <= max_age_secs
    }
}

impl Validate for Advert {
    fn validate(&self) -> Result<(), ValidationError> {
        validate::non_empty("advert.model_name", &self.model_name, MAX_MODEL_NAME_LEN)?;
        validate::finite_non_negative("advert.load.tokens_per_s", self.load.tokens_per_s)?;
        validate::max_count("advert.addrs", &self.addrs, MAX_ADVERT_ADDRS)?;
        for addr in &self.addrs {
            validate::non_empty("advert.addrs[]", addr, MAX_MULTIADDR_LEN)?;
        }
        if self.capabilities.context_length == 0 {
            return Err(ValidationError::Invalid {
                field: "advert.capabilities.context_length",
                reason: "must be at least 1",
            });
        }
        Ok(())
    }
}

impl Signable for Advert {
    const KIND: MessageKind = MessageKind::Advert;
    const NAME: &'static str = "advert";

    fn author(&self) -> Option<NodeId> {
        Some(self.node)
    }

    fn signing_bytes(&self) -> Result<Vec<u8>, crate::codec::EncodeError> {
        crate::layouts::signing_bytes(self)
    }
}

impl_wire!(Advert, "advert", MAX_ADVERT_BYTES);
crate::layouts::impl_layered_wire!(Advert, "signed advert", MAX_ADVERT_BYTES);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{EncodeError, Wire};
    use crate::signed::Signed;
    use crate::test_utils::{key, sample_advert, sample_manifest};

    #[test]
    fn a_typical_signed_advert_is_small() {
        let node = key(1);
        let signed = Signed::sign(sample_advert(&node, DomainId([1; 32])), &node).unwrap();
        let bytes = signed.to_bytes().unwrap();
        assert!(bytes.len() < 400, "{} bytes", bytes.len());
    }

    #[test]
    fn the_largest_valid_signed_advert_stays_below_16_kib() {
        let node = key(1);
        let mut advert = sample_advert(&node, DomainId([1; 32]));
        advert.addrs = vec!["a".repeat(MAX_MULTIADDR_LEN); MAX_ADVERT_ADDRS];
        advert.model_name = "m".repeat(MAX_MODEL_NAME_LEN);
        advert.kb_hash = Some(ContentHash([0xff; 32]));
        advert.prompt_hash = Some(ContentHash([0xff; 32]));
        advert.seq = u64::MAX;
        advert.prompt_price = u64::MAX;
        advert.completion_price = u64::MAX;
        let signed = Signed::sign(advert, &node).unwrap();
        let size = signed.to_bytes().unwrap().len();
        assert!(size < 16 * 1024, "{size}");

        // One field past its limit is refused by the encoder ...
        let mut huge = signed.clone();
        huge.payload.addrs.push("b".into());
        assert!(matches!(huge.to_bytes(), Err(EncodeError::Invalid { .. })));
        // ... and 16 KiB of bytes are refused by the decoder before decoding.
        let bytes = vec![0u8; 16 * 1024];
        assert!(matches!(
            Signed::<Advert>::from_bytes(&bytes),
            Err(crate::codec::DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn freshness_and_requirements() {
        let node = key(1);
        let manifest = sample_manifest(&key(2));
        let advert = sample_advert(&node, manifest.id());
        advert
            .check_requirements(&manifest.id(), &manifest.requirements)
            .unwrap();
        assert!(
            advert
                .check_requirements(&DomainId([0; 32]), &manifest.requirements)
                .is_err()
        );
        assert!(advert.is_fresh(advert.sent_at + 30, 60));
        assert!(!advert.is_fresh(advert.sent_at + 61, 60));
        assert!(advert.is_fresh(advert.sent_at - MAX_CLOCK_SKEW_SECS, 60));
        assert!(!advert.is_fresh(advert.sent_at - MAX_CLOCK_SKEW_SECS - 1, 60));
    }

    #[test]
    fn non_finite_load_is_invalid() {
        let mut advert = sample_advert(&key(1), DomainId([1; 32]));
        for bad in [f32::NAN, f32::INFINITY, -1.0] {
            advert.load.tokens_per_s = bad;
            assert!(advert.validate().is_err());
        }
    }
}
