//! Control RPC: small request/response exchanges between nodes (member snapshots, the domain's
//! state, pings).
//!
//! A joining node asks a bootstrap peer for the domain's members with
//! [`ControlRequest::MemberSnapshot`]; the answer comes in pages ordered by node address, each
//! below [`MAX_CONTROL_RESPONSE_BYTES`]: ask again with `after` set to the page's `next` until
//! `next` is `None`.
//!
//! Since `/gaia/control/2.0.0` ([`crate::protocols::CONTROL`]) a node also asks for the
//! domain's state with [`ControlRequest::DomainState`]: the newest operator-signed manifest the
//! peer holds and the revocations it has verified, in pages ordered by `(member, serial)`. The
//! variants of version 1 are unchanged, so a node still answers `/gaia/control/1.0.0` peers;
//! version 2's variants are never sent to them.

use serde::{Deserialize, Serialize};

use crate::advert::Advert;
use crate::codec::{EncodeError, MAX_FRAME, canonical_bytes, impl_wire};
use crate::domain::{DomainId, DomainManifest, MembershipCertificate, Revocation};
use crate::identity::NodeId;
use crate::signed::Signed;
use crate::stream::{ErrorCode, MAX_ERROR_MESSAGE};
use crate::validate::{self, Validate, ValidationError};

/// The largest encoded control request.
pub const MAX_CONTROL_REQUEST_BYTES: usize = 256;
/// The largest encoded control response (one member page).
pub const MAX_CONTROL_RESPONSE_BYTES: usize = MAX_FRAME;
/// The most members in one page.
pub const MAX_MEMBERS_PER_PAGE: usize = 1024;
/// The most revocations in one domain-state page.
pub const MAX_REVOCATIONS_PER_PAGE: usize = 2048;

/// The encoded bytes a page fills with entries: three quarters of the limit, leaving room for
/// the response's own fields and for the decoder's accounting (bincode's limit counts the
/// in-memory size of integers, which can exceed their variable-length encoding).
const PAGE_BUDGET: usize = MAX_CONTROL_RESPONSE_BYTES / 4 * 3;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Send the members of `domain` you know, ordered by address, starting after `after`.
    MemberSnapshot {
        /// The domain.
        domain: DomainId,
        /// Resume after this address (the previous page's `next`); `None` for the first page.
        after: Option<NodeId>,
    },
    /// Are you alive?
    Ping,
    /// Send the newest manifest of `domain` you hold and the revocations you verified, ordered
    /// by `(member, serial)`, starting after `after` (version 2).
    DomainState {
        /// The domain.
        domain: DomainId,
        /// Resume after this revocation (the previous page's `next`); `None` for the first page.
        after: Option<(NodeId, u64)>,
    },
}

impl ControlRequest {
    /// The first protocol version that has this request.
    pub fn min_version(&self) -> u32 {
        match self {
            ControlRequest::MemberSnapshot { .. } | ControlRequest::Ping => 1,
            ControlRequest::DomainState { .. } => 2,
        }
    }
}

/// One member: its latest advert and, in domains that are not open, its certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberEntry {
    /// The member's latest signed advert.
    pub advert: SharedAdvert,
    /// The member's certificate (`None` in open domains).
    pub certificate: Option<SharedCertificate>,
}

/// A signed advert shared by every table that holds it (it is immutable once signed; on the
/// wire it is the advert itself).
pub type SharedAdvert = crate::signed::Shared<Advert>;

/// A signed certificate shared by every table that holds it (on the wire: the certificate).
pub type SharedCertificate = crate::signed::Shared<MembershipCertificate>;

impl MemberEntry {
    /// The member's address.
    pub fn node(&self) -> NodeId {
        self.advert.payload.node
    }
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlResponse {
    /// A page of members. Signatures are not checked by the decoder: verify each entry.
    Members {
        /// The domain.
        domain: DomainId,
        /// Members ordered by address.
        #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_MEMBERS_PER_PAGE>")]
        members: Vec<MemberEntry>,
        /// Ask for the next page after this address; `None` on the last page.
        next: Option<NodeId>,
    },
    /// Alive.
    Pong,
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A message for the user.
        message: String,
    },
    /// A page of the domain's state (version 2). Signatures are not checked by the decoder.
    DomainState {
        /// The newest manifest the peer holds (the first page only).
        manifest: Option<Box<Signed<DomainManifest>>>,
        /// Revocations ordered by `(member, serial)`.
        #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_REVOCATIONS_PER_PAGE>")]
        revocations: Vec<Signed<Revocation>>,
        /// Ask for the next page after this revocation; `None` on the last page.
        next: Option<(NodeId, u64)>,
    },
}

impl ControlResponse {
    /// The first protocol version that has this response.
    pub fn min_version(&self) -> u32 {
        match self {
            ControlResponse::DomainState { .. } => 2,
            _ => 1,
        }
    }

    /// Builds the page answering `DomainState { after }` from `manifest` and `revocations`
    /// (any order): those after `after` in `(member, serial)` order, as many as fit in one
    /// response with the manifest (sent on the first page only).
    pub fn domain_state_page<'a>(
        manifest: &Signed<DomainManifest>,
        revocations: impl IntoIterator<Item = &'a Signed<Revocation>>,
        after: Option<(NodeId, u64)>,
    ) -> Result<Self, EncodeError> {
        let key = |r: &Signed<Revocation>| (r.payload.member, r.payload.serial);
        let mut candidates: Vec<&Signed<Revocation>> = revocations
            .into_iter()
            .filter(|r| after.is_none_or(|after| key(r) > after))
            .collect();
        candidates.sort_by_key(|r| key(r));
        candidates.dedup_by_key(|r| key(r));
        let manifest = after.is_none().then(|| Box::new(manifest.clone()));
        let mut size = match &manifest {
            Some(m) => canonical_bytes("manifest", m)?.len(),
            None => 0,
        };
        let mut page = Vec::new();
        let mut next = None;
        for revocation in candidates {
            let entry_size = canonical_bytes("revocation", revocation)?.len();
            if page.len() == MAX_REVOCATIONS_PER_PAGE || size + entry_size > PAGE_BUDGET {
                next = page.last().map(|r: &Signed<Revocation>| key(r));
                break;
            }
            size += entry_size;
            page.push(revocation.clone());
        }
        Ok(ControlResponse::DomainState {
            manifest,
            revocations: page,
            next,
        })
    }
}

impl ControlResponse {
    /// Builds the page answering `MemberSnapshot { domain, after }` from `entries`: those with
    /// an address above `after`, in address order, as many as fit in one response.
    pub fn member_page(
        domain: DomainId,
        entries: &[MemberEntry],
        after: Option<NodeId>,
    ) -> Result<Self, EncodeError> {
        let mut candidates: Vec<&MemberEntry> = entries
            .iter()
            .filter(|e| after.is_none_or(|after| e.node() > after))
            .collect();
        candidates.sort_by_key(|e| e.node());
        candidates.dedup_by_key(|e| e.node());

        let mut members = Vec::new();
        let mut size = 0;
        let mut next = None;
        for entry in candidates {
            let entry_size = canonical_bytes("member entry", entry)?.len();
            if members.len() == MAX_MEMBERS_PER_PAGE || size + entry_size > PAGE_BUDGET {
                next = members.last().map(MemberEntry::node);
                break;
            }
            size += entry_size;
            members.push(entry.clone());
        }
        Ok(ControlResponse::Members {
            domain,
            members,
            next,
        })
    }
}

impl Validate for ControlRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

impl Validate for MemberEntry {
    fn validate(&self) -> Result<(), ValidationError> {
        self.advert.validate()?;
        if let Some(certificate) = &self.certificate {
            certificate.validate()?;
        }
        Ok(())
    }
}

impl Validate for ControlResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            ControlResponse::Members { members, .. } => {
                validate::max_count("members", members, MAX_MEMBERS_PER_PAGE)?;
                members.iter().try_for_each(Validate::validate)
            }
            ControlResponse::Pong => Ok(()),
            ControlResponse::Error { message, .. } => {
                validate::max_len("error.message", message, MAX_ERROR_MESSAGE)
            }
            ControlResponse::DomainState {
                manifest,
                revocations,
                ..
            } => {
                validate::max_count("revocations", revocations, MAX_REVOCATIONS_PER_PAGE)?;
                if let Some(manifest) = manifest {
                    manifest.validate()?;
                }
                revocations.iter().try_for_each(Validate::validate)
            }
        }
    }
}

impl_wire!(ControlRequest, "control request", MAX_CONTROL_REQUEST_BYTES);
impl_wire!(
    ControlResponse,
    "control response",
    MAX_CONTROL_RESPONSE_BYTES
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Wire;
    use crate::test_utils::{key, sample_advert};

    fn entries(n: u8) -> Vec<MemberEntry> {
        (1..=n)
            .map(|i| {
                let node = key(i);
                MemberEntry {
                    advert: Signed::sign(sample_advert(&node, DomainId([1; 32])), &node)
                        .unwrap()
                        .into(),
                    certificate: None,
                }
            })
            .collect()
    }

    #[test]
    fn small_member_sets_fit_in_one_page() {
        let all = entries(5);
        let page = ControlResponse::member_page(DomainId([1; 32]), &all, None).unwrap();
        let ControlResponse::Members { members, next, .. } = &page else {
            panic!("not a member page");
        };
        assert_eq!(members.len(), 5);
        assert!(next.is_none());
        assert!(members.windows(2).all(|w| w[0].node() < w[1].node()));
        let bytes = page.to_bytes().unwrap();
        assert_eq!(ControlResponse::from_bytes(&bytes).unwrap(), page);
    }

    #[test]
    fn domain_state_pages_walk_every_revocation_once_with_the_manifest_first() {
        let operator = key(1);
        let manifest =
            Signed::sign(crate::test_utils::sample_manifest(&operator), &operator).unwrap();
        let domain = manifest.payload.id();
        let revocations: Vec<Signed<Revocation>> = (0..5000u64)
            .map(|i| {
                Signed::sign(
                    Revocation {
                        domain,
                        member: key((i % 200) as u8 + 2).node_id(),
                        serial: i,
                        revoked_at: 1_700_000_000,
                    },
                    &operator,
                )
                .unwrap()
            })
            .collect();
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page =
                ControlResponse::domain_state_page(&manifest, revocations.iter().rev(), after)
                    .unwrap();
            let bytes = page.to_bytes().unwrap();
            assert!(bytes.len() <= MAX_CONTROL_RESPONSE_BYTES);
            assert_eq!(ControlResponse::from_bytes(&bytes).unwrap(), page);
            assert_eq!(page.min_version(), 2);
            let ControlResponse::DomainState {
                manifest: m,
                revocations: page_revocations,
                next,
            } = page
            else {
                panic!("not a domain-state page");
            };
            assert_eq!(
                m.is_some(),
                pages == 0,
                "the manifest comes on the first page only"
            );
            seen.extend(
                page_revocations
                    .iter()
                    .map(|r| (r.payload.member, r.payload.serial)),
            );
            pages += 1;
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert!(pages >= 2, "5000 revocations need more than one page");
        let mut expected: Vec<(NodeId, u64)> = revocations
            .iter()
            .map(|r| (r.payload.member, r.payload.serial))
            .collect();
        expected.sort();
        assert_eq!(seen, expected);
        assert_eq!(
            ControlRequest::DomainState {
                domain,
                after: None
            }
            .min_version(),
            2
        );
        assert_eq!(ControlRequest::Ping.min_version(), 1);
    }

    /// A request of version 1 encodes as it did: the new variants are appended.
    #[test]
    fn version_1_requests_keep_their_encoding() {
        let ping = ControlRequest::Ping.to_bytes().unwrap();
        let snapshot = ControlRequest::MemberSnapshot {
            domain: DomainId([3; 32]),
            after: None,
        }
        .to_bytes()
        .unwrap();
        assert_eq!(ping, vec![1]);
        assert_eq!(snapshot[0], 0);
        assert_eq!(snapshot.len(), 1 + 32 + 1);
    }

    #[test]
    fn pages_walk_every_member_once() {
        // 200 large entries (about 4.3 KiB each) need two pages.
        let all: Vec<MemberEntry> = (1..=200u8)
            .map(|i| {
                let node = key(i);
                let mut advert = sample_advert(&node, DomainId([1; 32]));
                advert.addrs = vec!["a".repeat(crate::domain::MAX_MULTIADDR_LEN); 16];
                advert.model_name = "m".repeat(crate::advert::MAX_MODEL_NAME_LEN);
                MemberEntry {
                    advert: Signed::sign(advert, &node).unwrap().into(),
                    certificate: None,
                }
            })
            .collect();
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = ControlResponse::member_page(DomainId([1; 32]), &all, after).unwrap();
            assert!(page.to_bytes().unwrap().len() <= MAX_CONTROL_RESPONSE_BYTES);
            let ControlResponse::Members { members, next, .. } = page else {
                panic!("not a member page");
            };
            pages += 1;
            seen.extend(members.iter().map(MemberEntry::node));
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(pages, 2);
        let mut expected: Vec<_> = all.iter().map(MemberEntry::node).collect();
        expected.sort();
        assert_eq!(seen, expected);
    }

    #[test]
    fn requests_are_tiny() {
        let request = ControlRequest::MemberSnapshot {
            domain: DomainId([1; 32]),
            after: Some(NodeId([2; 20])),
        };
        let bytes = request.to_bytes().unwrap();
        assert!(bytes.len() < 60, "{}", bytes.len());
        assert_eq!(ControlRequest::from_bytes(&bytes).unwrap(), request);
    }
}
