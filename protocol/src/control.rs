//! Control RPC: small request/response exchanges between nodes (member snapshots, pings).
//!
//! A joining node asks a bootstrap peer for the domain's members with
//! [`ControlRequest::MemberSnapshot`]; the answer comes in pages ordered by node address, each
//! below [`MAX_CONTROL_RESPONSE_BYTES`]: ask again with `after` set to the page's `next` until
//! `next` is `None`.

use serde::{Deserialize, Serialize};

use crate::advert::Advert;
use crate::codec::{EncodeError, MAX_FRAME, canonical_bytes, impl_wire};
use crate::domain::{DomainId, MembershipCertificate};
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
}

/// One member: its latest advert and, in domains that are not open, its certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberEntry {
    /// The member's latest signed advert.
    pub advert: Signed<Advert>,
    /// The member's certificate (`None` in open domains).
    pub certificate: Option<Signed<MembershipCertificate>>,
}

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
                    advert: Signed::sign(sample_advert(&node, DomainId([1; 32])), &node).unwrap(),
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
    fn pages_walk_every_member_once() {
        // 200 large entries (about 4.3 KiB each) need two pages.
        let all: Vec<MemberEntry> = (1..=200u8)
            .map(|i| {
                let node = key(i);
                let mut advert = sample_advert(&node, DomainId([1; 32]));
                advert.addrs = vec!["a".repeat(crate::domain::MAX_MULTIADDR_LEN); 16];
                advert.model_name = "m".repeat(crate::advert::MAX_MODEL_NAME_LEN);
                MemberEntry {
                    advert: Signed::sign(advert, &node).unwrap(),
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
