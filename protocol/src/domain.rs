//! Domains: the operator-signed manifest, membership certificates and revocations.
//!
//! A domain is a set of nodes serving one agent. Its operator signs a [`DomainManifest`] that
//! names the agent (accepted model hashes, knowledge base, prompt), where to join (bootstrap
//! addresses) and who may join ([`Admission`]). The operator admits a node by signing a
//! [`MembershipCertificate`] and expels it by signing a [`Revocation`]. Every node checks these
//! itself: there is no central gateway.
//!
//! A domain is named by its [`DomainId`], derived from the operator and the domain name only, so
//! the operator can publish a new manifest version (new bootstrap peers, a new accepted model)
//! without invalidating the certificates already issued.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::impl_wire;
use crate::hash::{ContentHash, ParseHashError};
use crate::identity::NodeId;
use crate::payment::Price;
use crate::signature::MessageKind;
use crate::signed::{Signable, Signed, SignedError};
use crate::validate::{self, Validate, ValidationError};

/// The longest domain name, in bytes.
pub const MAX_DOMAIN_NAME_LEN: usize = 64;
/// The longest gossip topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 128;
/// The longest multiaddr text, in bytes.
pub const MAX_MULTIADDR_LEN: usize = 256;
/// The most bootstrap addresses in a manifest.
pub const MAX_BOOTSTRAP: usize = 32;
/// The most accepted model hashes in a manifest.
pub const MAX_ACCEPTED_MODELS: usize = 32;
/// The most entries in an allow or deny list.
pub const MAX_ADMISSION_LIST: usize = 10_000;
/// The largest encoded (signed) manifest.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;
/// The largest encoded (signed) certificate or revocation.
pub const MAX_CERTIFICATE_BYTES: usize = 512;
/// How far in the future a timestamp may be before it is rejected (clock skew between nodes).
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// The identity of a domain: `sha256("gaia/domain/v1" || 0x00 || operator || name)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainId(pub [u8; 32]);

crate::bytes::fixed_bytes_serde!(DomainId);

impl DomainId {
    /// The id of the domain `name` run by `operator`.
    pub fn derive(operator: &NodeId, name: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"gaia/domain/v1\0");
        hasher.update(operator.0);
        hasher.update(name.as_bytes());
        Self(hasher.finalize().into())
    }

    /// The conventional gossipsub topic of the domain's adverts.
    pub fn advert_topic(&self) -> String {
        format!("/gaia/domain/{self}/adverts")
    }
}

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DomainId({self})")
    }
}

impl FromStr for DomainId {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<ContentHash>().map(|h| Self(h.0))
    }
}

/// What a node must run to serve a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirements {
    /// The model files (sha256 of the file) the domain accepts; at least one.
    #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_ACCEPTED_MODELS>")]
    pub accepted_model_hashes: Vec<ContentHash>,
    /// The knowledge-base snapshot every member must serve, if any.
    pub kb_hash: Option<ContentHash>,
    /// The system prompt every member must use, if any.
    pub prompt_hash: Option<ContentHash>,
}

impl Requirements {
    /// Checks that a node running these hashes meets the requirements.
    pub fn check(
        &self,
        model_hash: &ContentHash,
        kb_hash: Option<&ContentHash>,
        prompt_hash: Option<&ContentHash>,
    ) -> Result<(), MembershipError> {
        if !self.accepted_model_hashes.contains(model_hash) {
            return Err(MembershipError::ModelNotAccepted { model: *model_hash });
        }
        if let Some(required) = &self.kb_hash
            && kb_hash != Some(required)
        {
            return Err(MembershipError::WrongKnowledgeBase {
                required: *required,
                got: kb_hash.copied(),
            });
        }
        if let Some(required) = &self.prompt_hash
            && prompt_hash != Some(required)
        {
            return Err(MembershipError::WrongPrompt {
                required: *required,
                got: prompt_hash.copied(),
            });
        }
        Ok(())
    }
}

/// Who may join a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Admission {
    /// Anyone who meets the requirements.
    Open,
    /// Only these nodes.
    AllowList(
        #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_ADMISSION_LIST>")]
        Vec<NodeId>,
    ),
    /// Anyone who meets the requirements except these nodes.
    DenyList(
        #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_ADMISSION_LIST>")]
        Vec<NodeId>,
    ),
}

impl Admission {
    /// Whether `node` may be a member.
    pub fn admits(&self, node: &NodeId) -> bool {
        match self {
            Admission::Open => true,
            Admission::AllowList(allowed) => allowed.contains(node),
            Admission::DenyList(denied) => !denied.contains(node),
        }
    }
}

/// What a domain charges: the most its members may ask per 1000 prompt and per 1000
/// completion tokens of a paid request, and the operator's share of every payout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pricing {
    /// The domain's price: paid requests go only to members asking no more.
    pub price: Price,
    /// The operator's share of every payout, in basis points (1/10 000); the domain's escrow
    /// contract must pay the same.
    pub operator_share_bps: u16,
}

/// The operator-signed description of a domain.
///
/// Its fields are in wire order: `pricing` came with protocol version 2 and is appended; a
/// manifest without prices keeps version 1's layout ([`crate::layouts`]), so every manifest
/// signed before stays valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainManifest {
    /// The domain's name, unique per operator (e.g. `"rust-tutor"`).
    pub name: String,
    /// The gossipsub topic its members publish adverts on.
    pub topic: String,
    /// The operator's address; the manifest, certificates and revocations are signed by it.
    pub operator: NodeId,
    /// What members must run.
    pub requirements: Requirements,
    /// Multiaddrs (as text) of nodes to join through.
    #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_BOOTSTRAP>")]
    pub bootstrap: Vec<String>,
    /// Who may join.
    pub admission: Admission,
    /// When this version was made (unix seconds).
    pub created_at: u64,
    /// The manifest version; a node keeps the highest version it has verified.
    pub version: u64,
    /// What the domain charges, when it is paid (version 2).
    pub pricing: Option<Pricing>,
}

/// A manifest in protocol version 1's layout: no prices.
#[derive(Serialize, Deserialize)]
pub struct DomainManifestV1 {
    name: String,
    topic: String,
    operator: NodeId,
    requirements: Requirements,
    #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_BOOTSTRAP>")]
    bootstrap: Vec<String>,
    admission: Admission,
    created_at: u64,
    version: u64,
}

impl crate::layouts::Layouts for DomainManifest {
    type V1 = DomainManifestV1;

    fn to_v1(&self) -> Option<DomainManifestV1> {
        self.pricing.is_none().then(|| DomainManifestV1 {
            name: self.name.clone(),
            topic: self.topic.clone(),
            operator: self.operator,
            requirements: self.requirements.clone(),
            bootstrap: self.bootstrap.clone(),
            admission: self.admission.clone(),
            created_at: self.created_at,
            version: self.version,
        })
    }

    fn from_v1(v1: DomainManifestV1) -> Self {
        Self {
            name: v1.name,
            topic: v1.topic,
            operator: v1.operator,
            requirements: v1.requirements,
            bootstrap: v1.bootstrap,
            admission: v1.admission,
            created_at: v1.created_at,
            version: v1.version,
            pricing: None,
        }
    }
}

impl DomainManifest {
    /// The domain's id (stable across manifest versions).
    pub fn id(&self) -> DomainId {
        DomainId::derive(&self.operator, &self.name)
    }

    /// Checks a membership certificate: signed by this operator, for this domain, admitted by
    /// the admission policy, and valid at `now` (with [`MAX_CLOCK_SKEW_SECS`] of tolerance for
    /// its start).
    pub fn verify_certificate(
        &self,
        certificate: &Signed<MembershipCertificate>,
        now: u64,
    ) -> Result<(), MembershipError> {
        let cert = certificate.verify_signed_by(self.operator)?;
        if cert.domain != self.id() {
            return Err(MembershipError::WrongDomain {
                expected: self.id(),
                got: cert.domain,
            });
        }
        if !self.admission.admits(&cert.member) {
            return Err(MembershipError::NotAdmitted {
                member: cert.member,
            });
        }
        cert.check_time(now)
    }

    /// Checks a revocation: signed by this operator, for this domain.
    pub fn verify_revocation(
        &self,
        revocation: &Signed<Revocation>,
    ) -> Result<(), MembershipError> {
        let rev = revocation.verify_signed_by(self.operator)?;
        if rev.domain != self.id() {
            return Err(MembershipError::WrongDomain {
                expected: self.id(),
                got: rev.domain,
            });
        }
        Ok(())
    }
}

impl Validate for DomainManifest {
    fn validate(&self) -> Result<(), ValidationError> {
        validate::non_empty("manifest.name", &self.name, MAX_DOMAIN_NAME_LEN)?;
        if self.name.chars().any(char::is_control) {
            return Err(ValidationError::Invalid {
                field: "manifest.name",
                reason: "contains control characters",
            });
        }
        validate::non_empty("manifest.topic", &self.topic, MAX_TOPIC_LEN)?;
        let models = &self.requirements.accepted_model_hashes;
        if models.is_empty() {
            return Err(ValidationError::Empty {
                field: "manifest.requirements.accepted_model_hashes",
            });
        }
        validate::max_count(
            "manifest.requirements.accepted_model_hashes",
            models,
            MAX_ACCEPTED_MODELS,
        )?;
        validate::max_count("manifest.bootstrap", &self.bootstrap, MAX_BOOTSTRAP)?;
        for addr in &self.bootstrap {
            validate::non_empty("manifest.bootstrap[]", addr, MAX_MULTIADDR_LEN)?;
        }
        match &self.admission {
            Admission::Open => {}
            Admission::AllowList(list) | Admission::DenyList(list) => {
                validate::max_count("manifest.admission", list, MAX_ADMISSION_LIST)?;
            }
        }
        if let Some(pricing) = &self.pricing
            && pricing.operator_share_bps > 10_000
        {
            return Err(ValidationError::Invalid {
                field: "manifest.pricing.operator_share_bps",
                reason: "above 10000 (100 %)",
            });
        }
        Ok(())
    }
}

impl Signable for DomainManifest {
    const KIND: MessageKind = MessageKind::DomainManifest;
    const NAME: &'static str = "domain manifest";

    fn author(&self) -> Option<NodeId> {
        Some(self.operator)
    }

    fn signing_bytes(&self) -> Result<Vec<u8>, crate::codec::EncodeError> {
        crate::layouts::signing_bytes(self)
    }
}

/// The operator's statement that a node is a member of the domain until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipCertificate {
    /// The domain.
    pub domain: DomainId,
    /// The member.
    pub member: NodeId,
    /// When it was issued (unix seconds).
    pub issued_at: u64,
    /// When it stops being valid (unix seconds, exclusive).
    pub expires_at: u64,
    /// The operator's serial number, which a [`Revocation`] names.
    pub serial: u64,
}

impl MembershipCertificate {
    /// Checks the validity period at `now`, tolerating [`MAX_CLOCK_SKEW_SECS`] on the start.
    pub fn check_time(&self, now: u64) -> Result<(), MembershipError> {
        if self.issued_at > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(MembershipError::NotYetValid {
                issued_at: self.issued_at,
                now,
            });
        }
        if now >= self.expires_at {
            return Err(MembershipError::Expired {
                expires_at: self.expires_at,
                now,
            });
        }
        Ok(())
    }

    /// Whether `revocation` revokes this certificate.
    pub fn is_revoked_by(&self, revocation: &Revocation) -> bool {
        revocation.domain == self.domain
            && revocation.member == self.member
            && revocation.serial == self.serial
    }

    /// Fails if any of `revocations` (already verified against the manifest) revokes this
    /// certificate.
    pub fn check_not_revoked<'a>(
        &self,
        revocations: impl IntoIterator<Item = &'a Revocation>,
    ) -> Result<(), MembershipError> {
        if revocations.into_iter().any(|r| self.is_revoked_by(r)) {
            return Err(MembershipError::Revoked {
                member: self.member,
                serial: self.serial,
            });
        }
        Ok(())
    }
}

impl Validate for MembershipCertificate {
    fn validate(&self) -> Result<(), ValidationError> {
        validate::strictly_after(
            "certificate.issued_at",
            self.issued_at,
            "certificate.expires_at",
            self.expires_at,
        )
    }
}

impl Signable for MembershipCertificate {
    const KIND: MessageKind = MessageKind::MembershipCertificate;
    const NAME: &'static str = "membership certificate";

    fn author(&self) -> Option<NodeId> {
        None
    }
}

/// The operator's statement that a certificate is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The domain.
    pub domain: DomainId,
    /// The member whose certificate is revoked.
    pub member: NodeId,
    /// The serial of the revoked certificate.
    pub serial: u64,
    /// When it was revoked (unix seconds).
    pub revoked_at: u64,
}

impl Validate for Revocation {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

impl Signable for Revocation {
    const KIND: MessageKind = MessageKind::Revocation;
    const NAME: &'static str = "revocation";

    fn author(&self) -> Option<NodeId> {
        None
    }
}

/// A node is not, or no longer, a valid member of a domain.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The signature is bad or not the operator's.
    #[error(transparent)]
    Signed(#[from] SignedError),
    /// The message is for another domain.
    #[error("message is for domain {got}, expected {expected}")]
    WrongDomain {
        /// The domain being checked.
        expected: DomainId,
        /// The domain the message names.
        got: DomainId,
    },
    /// The admission policy does not admit the node.
    #[error("{member} is not admitted by the domain's admission policy")]
    NotAdmitted {
        /// The node.
        member: NodeId,
    },
    /// The certificate starts in the future.
    #[error("certificate is not valid yet: issued at {issued_at}, now is {now} (check the clock)")]
    NotYetValid {
        /// Its start.
        issued_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// The certificate has expired.
    #[error("certificate expired at {expires_at}, now is {now}: ask the operator for a new one")]
    Expired {
        /// Its end.
        expires_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// The certificate was revoked.
    #[error("certificate {serial} of {member} was revoked by the operator")]
    Revoked {
        /// The member.
        member: NodeId,
        /// The revoked serial.
        serial: u64,
    },
    /// The node runs a model the domain does not accept.
    #[error("model {model} is not accepted by the domain")]
    ModelNotAccepted {
        /// The node's model hash.
        model: ContentHash,
    },
    /// The node serves another knowledge base than the domain requires.
    #[error("domain requires knowledge base {required}, node serves {got:?}")]
    WrongKnowledgeBase {
        /// The required snapshot.
        required: ContentHash,
        /// The node's snapshot.
        got: Option<ContentHash>,
    },
    /// The node uses another prompt than the domain requires.
    #[error("domain requires prompt {required}, node uses {got:?}")]
    WrongPrompt {
        /// The required prompt hash.
        required: ContentHash,
        /// The node's prompt hash.
        got: Option<ContentHash>,
    },
}

impl_wire!(DomainManifest, "domain manifest", MAX_MANIFEST_BYTES);
crate::layouts::impl_layered_wire!(DomainManifest, "signed domain manifest", MAX_MANIFEST_BYTES);
impl_wire!(
    MembershipCertificate,
    "membership certificate",
    MAX_CERTIFICATE_BYTES
);
impl_wire!(
    Signed<MembershipCertificate>,
    "signed membership certificate",
    MAX_CERTIFICATE_BYTES
);
impl_wire!(Revocation, "revocation", MAX_CERTIFICATE_BYTES);
impl_wire!(
    Signed<Revocation>,
    "signed revocation",
    MAX_CERTIFICATE_BYTES
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Wire;
    use crate::test_utils::{key, sample_certificate, sample_manifest};

    #[test]
    fn id_is_stable_across_versions_and_depends_on_operator_and_name() {
        let manifest = sample_manifest(&key(1));
        let mut v2 = manifest.clone();
        v2.version = 2;
        v2.bootstrap.push("/ip4/10.0.0.1/tcp/1".into());
        assert_eq!(manifest.id(), v2.id());
        let mut renamed = manifest.clone();
        renamed.name = "other".into();
        assert_ne!(manifest.id(), renamed.id());
        assert_ne!(manifest.id(), sample_manifest(&key(2)).id());
        assert_eq!(
            manifest.id().to_string().parse::<DomainId>().unwrap(),
            manifest.id()
        );
        assert!(manifest.id().advert_topic().starts_with("/gaia/domain/"));
    }

    #[test]
    fn manifest_is_signed_by_its_operator_only() {
        let operator = key(1);
        let manifest = sample_manifest(&operator);
        let signed = Signed::sign(manifest.clone(), &operator).unwrap();
        let back = Signed::<DomainManifest>::from_bytes(&signed.to_bytes().unwrap()).unwrap();
        assert_eq!(back.verify().unwrap(), &manifest);
        assert!(matches!(
            Signed::sign(manifest, &key(2)),
            Err(SignedError::NotAuthor { .. })
        ));
    }

    #[test]
    fn certificates_are_checked_against_the_manifest() {
        let operator = key(1);
        let member = key(2).node_id();
        let mut manifest = sample_manifest(&operator);
        let cert = sample_certificate(manifest.id(), member, 1_000);
        let signed = Signed::sign(cert.clone(), &operator).unwrap();

        manifest.verify_certificate(&signed, 1_000).unwrap();
        manifest
            .verify_certificate(&signed, 1_000 - MAX_CLOCK_SKEW_SECS)
            .unwrap();
        assert!(matches!(
            manifest.verify_certificate(&signed, 1_000 - MAX_CLOCK_SKEW_SECS - 1),
            Err(MembershipError::NotYetValid { .. })
        ));
        assert!(matches!(
            manifest.verify_certificate(&signed, cert.expires_at),
            Err(MembershipError::Expired { .. })
        ));

        // Signed by someone else than the operator.
        let forged = Signed::sign(cert.clone(), &key(3)).unwrap();
        assert!(matches!(
            manifest.verify_certificate(&forged, 1_000),
            Err(MembershipError::Signed(_))
        ));

        // For another domain.
        let other = Signed::sign(
            sample_certificate(DomainId([0; 32]), member, 1_000),
            &operator,
        )
        .unwrap();
        assert!(matches!(
            manifest.verify_certificate(&other, 1_000),
            Err(MembershipError::WrongDomain { .. })
        ));

        // Admission policy.
        manifest.admission = Admission::DenyList(vec![member]);
        assert!(matches!(
            manifest.verify_certificate(&signed, 1_000),
            Err(MembershipError::NotAdmitted { .. })
        ));
        manifest.admission = Admission::AllowList(vec![member]);
        manifest.verify_certificate(&signed, 1_000).unwrap();
        manifest.admission = Admission::AllowList(vec![]);
        assert!(manifest.verify_certificate(&signed, 1_000).is_err());
    }

    #[test]
    fn revocations_match_their_certificate() {
        let operator = key(1);
        let manifest = sample_manifest(&operator);
        let cert = sample_certificate(manifest.id(), key(2).node_id(), 1_000);
        let revocation = Revocation {
            domain: manifest.id(),
            member: cert.member,
            serial: cert.serial,
            revoked_at: 2_000,
        };
        let signed = Signed::sign(revocation.clone(), &operator).unwrap();
        manifest.verify_revocation(&signed).unwrap();
        assert!(cert.is_revoked_by(&revocation));
        assert!(matches!(
            cert.check_not_revoked([&revocation]),
            Err(MembershipError::Revoked { serial: 1, .. })
        ));
        cert.check_not_revoked(std::iter::empty()).unwrap();
        let other_serial = Revocation {
            serial: cert.serial + 1,
            ..revocation.clone()
        };
        assert!(!cert.is_revoked_by(&other_serial));
        let forged = Signed::sign(revocation, &key(2)).unwrap();
        assert!(manifest.verify_revocation(&forged).is_err());
    }

    #[test]
    fn validation_rejects_bad_manifests_and_certificates() {
        let operator = key(1);
        let mut manifest = sample_manifest(&operator);
        manifest.requirements.accepted_model_hashes.clear();
        assert!(matches!(
            manifest.validate(),
            Err(ValidationError::Empty { .. })
        ));
        let mut manifest = sample_manifest(&operator);
        manifest.name = "x".repeat(MAX_DOMAIN_NAME_LEN + 1);
        assert!(matches!(
            manifest.validate(),
            Err(ValidationError::TooLong { .. })
        ));
        let mut manifest = sample_manifest(&operator);
        manifest.name = "bad\nname".into();
        assert!(manifest.validate().is_err());
        let mut manifest = sample_manifest(&operator);
        manifest.admission = Admission::AllowList(vec![NodeId([0; 20]); MAX_ADMISSION_LIST + 1]);
        assert!(matches!(
            manifest.validate(),
            Err(ValidationError::TooMany { .. })
        ));

        let mut cert = sample_certificate(DomainId([1; 32]), NodeId([2; 20]), 10);
        cert.expires_at = 10;
        assert!(matches!(
            cert.validate(),
            Err(ValidationError::TimeOrder { .. })
        ));
        assert!(matches!(
            cert.to_bytes(),
            Err(crate::codec::EncodeError::Invalid { .. })
        ));
    }

    #[test]
    fn requirements_check_model_kb_and_prompt() {
        let model = ContentHash::of(b"model");
        let kb = ContentHash::of(b"kb");
        let requirements = Requirements {
            accepted_model_hashes: vec![model],
            kb_hash: Some(kb),
            prompt_hash: None,
        };
        requirements.check(&model, Some(&kb), None).unwrap();
        requirements
            .check(&model, Some(&kb), Some(&ContentHash::of(b"any prompt")))
            .unwrap();
        assert!(matches!(
            requirements.check(&ContentHash::of(b"other"), Some(&kb), None),
            Err(MembershipError::ModelNotAccepted { .. })
        ));
        assert!(matches!(
            requirements.check(&model, None, None),
            Err(MembershipError::WrongKnowledgeBase { .. })
        ));
    }

    #[test]
    fn manifest_json_is_readable() {
        let manifest = sample_manifest(&key(1));
        let json = serde_json::to_string_pretty(&manifest).unwrap();
        assert!(json.contains(&key(1).node_id().to_string()), "{json}");
        assert!(json.contains(&ContentHash::of(b"model").to_hex()), "{json}");
        let back: DomainManifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, manifest);
    }
}
