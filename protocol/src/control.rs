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
use crate::payment::{Escrow, SignedVoucher};
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
/// The most vouchers in one voucher page.
pub const MAX_VOUCHERS_PER_PAGE: usize = 4096;

/// Where a voucher stands in a voucher page: its channel (payer, payee, entry node).
pub type VoucherKey = (NodeId, NodeId, NodeId);

/// The channel of `voucher`.
pub fn voucher_key(voucher: &SignedVoucher) -> VoucherKey {
    let v = &voucher.voucher;
    (v.payer, v.payee, v.entry)
}

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
    /// Send the latest voucher of every channel of `escrow` you know, ordered by channel,
    /// starting after `after` (version 3): an entry node that just joined (or restarted) learns
    /// what an access key spent through the others before it lets the key spend.
    Vouchers {
        /// The escrow.
        escrow: Escrow,
        /// Resume after this channel (the previous page's `next`); `None` for the first page.
        after: Option<VoucherKey>,
    },
}

impl ControlRequest {
    /// The first protocol version that has this request.
    pub fn min_version(&self) -> u32 {
        match self {
            ControlRequest::MemberSnapshot { .. } | ControlRequest::Ping => 1,
            ControlRequest::DomainState { .. } => 2,
            ControlRequest::Vouchers { .. } => 3,
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
///
/// Version 3 added [`ControlResponse::Members`] and [`ControlResponse::DomainState`] in the
/// newer layouts of adverts and manifests (with prices, [`crate::layouts`]); the variants
/// `MembersV1` and `DomainStateV2` hold the same in version 1's layouts, for peers of
/// versions 1 and 2. A node builds the version-3 variants; its codec writes the older ones on
/// older streams ([`ControlResponse::for_version`]) and reads them back as the newer
/// ([`ControlResponse::upgrade`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlResponse {
    /// A page of members in version 1's layout.
    MembersV1 {
        /// The domain.
        domain: DomainId,
        /// Members ordered by address.
        #[serde(with = "legacy_members")]
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
    /// A page of the domain's state in version 1's manifest layout (version 2).
    DomainStateV2 {
        /// The newest manifest the peer holds (the first page only).
        #[serde(with = "crate::layouts::legacy::option_box")]
        manifest: Option<Box<Signed<DomainManifest>>>,
        /// Revocations ordered by `(member, serial)`.
        #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_REVOCATIONS_PER_PAGE>")]
        revocations: Vec<Signed<Revocation>>,
        /// Ask for the next page after this revocation; `None` on the last page.
        next: Option<(NodeId, u64)>,
    },
    /// A page of members (version 3). Signatures are not checked by the decoder: verify each
    /// entry.
    Members {
        /// The domain.
        domain: DomainId,
        /// Members ordered by address.
        #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_MEMBERS_PER_PAGE>")]
        members: Vec<MemberEntry>,
        /// Ask for the next page after this address; `None` on the last page.
        next: Option<NodeId>,
    },
    /// A page of the domain's state (version 3). Signatures are not checked by the decoder.
    DomainState {
        /// The newest manifest the peer holds (the first page only).
        manifest: Option<Box<Signed<DomainManifest>>>,
        /// Revocations ordered by `(member, serial)`.
        #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_REVOCATIONS_PER_PAGE>")]
        revocations: Vec<Signed<Revocation>>,
        /// Ask for the next page after this revocation; `None` on the last page.
        next: Option<(NodeId, u64)>,
    },
    /// A page of vouchers (version 3). Signatures are not checked by the decoder: verify each
    /// for `escrow`.
    Vouchers {
        /// The escrow they are for.
        escrow: Escrow,
        /// The latest voucher of each channel, ordered by channel.
        #[serde(deserialize_with = "crate::bytes::bounded_vec::<_, _, MAX_VOUCHERS_PER_PAGE>")]
        vouchers: Vec<SignedVoucher>,
        /// Ask for the next page after this channel; `None` on the last page.
        next: Option<VoucherKey>,
    },
}

/// The members of a version-1 page: each advert in version 1's layout.
mod legacy_members {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{MAX_MEMBERS_PER_PAGE, MemberEntry};
    use crate::advert::Advert;
    use crate::domain::MembershipCertificate;
    use crate::signed::Signed;

    #[derive(Serialize, Deserialize)]
    struct EntryV1 {
        #[serde(with = "crate::layouts::legacy")]
        advert: Signed<Advert>,
        certificate: Option<Signed<MembershipCertificate>>,
    }

    pub(super) fn serialize<S: Serializer>(
        members: &[MemberEntry],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(members.iter().map(|entry| EntryV1 {
            advert: (*entry.advert).clone(),
            certificate: entry.certificate.as_ref().map(|c| (**c).clone()),
        }))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<MemberEntry>, D::Error> {
        let entries: Vec<EntryV1> =
            crate::bytes::bounded_vec::<_, _, MAX_MEMBERS_PER_PAGE>(deserializer)?;
        Ok(entries
            .into_iter()
            .map(|entry| MemberEntry {
                advert: entry.advert.into(),
                certificate: entry.certificate.map(Into::into),
            })
            .collect())
    }
}

impl ControlResponse {
    /// The first protocol version that has this response.
    pub fn min_version(&self) -> u32 {
        match self {
            ControlResponse::MembersV1 { .. }
            | ControlResponse::Pong
            | ControlResponse::Error { .. } => 1,
            ControlResponse::DomainStateV2 { .. } => 2,
            ControlResponse::Members { .. }
            | ControlResponse::DomainState { .. }
            | ControlResponse::Vouchers { .. } => 3,
        }
    }

    /// Builds the page answering `Vouchers { escrow, after }` from `vouchers` (the latest of
    /// each channel, any order): those after `after` in channel order, as many as a page holds.
    pub fn voucher_page(
        escrow: Escrow,
        vouchers: impl IntoIterator<Item = SignedVoucher>,
        after: Option<VoucherKey>,
    ) -> Self {
        let mut candidates: Vec<SignedVoucher> = vouchers
            .into_iter()
            .filter(|v| after.is_none_or(|after| voucher_key(v) > after))
            .collect();
        candidates.sort_by_key(voucher_key);
        candidates.dedup_by_key(|v| voucher_key(v));
        let next = (candidates.len() > MAX_VOUCHERS_PER_PAGE)
            .then(|| voucher_key(&candidates[MAX_VOUCHERS_PER_PAGE - 1]));
        candidates.truncate(MAX_VOUCHERS_PER_PAGE);
        ControlResponse::Vouchers {
            escrow,
            vouchers: candidates,
            next,
        }
    }

    /// The response as a node of protocol `version` reads it: members whose advert needs the
    /// newer layout are left out (that node could not verify them), and a manifest with prices
    /// becomes an error telling it to upgrade.
    pub fn for_version(self, version: u32) -> Self {
        if version >= 3 {
            return self;
        }
        match self {
            ControlResponse::Members {
                domain,
                members,
                next,
            } => ControlResponse::MembersV1 {
                domain,
                members: members
                    .into_iter()
                    .filter(|entry| entry.advert.payload.price().is_flat())
                    .collect(),
                next,
            },
            ControlResponse::DomainState {
                manifest,
                revocations,
                next,
            } => {
                if manifest
                    .as_ref()
                    .is_some_and(|m| m.payload.pricing.is_some())
                {
                    ControlResponse::Error {
                        code: ErrorCode::BadRequest,
                        message: "the domain's manifest sets prices, which this node's Gaia \
                                  (control protocol 2) cannot read: upgrade it"
                            .into(),
                    }
                } else {
                    ControlResponse::DomainStateV2 {
                        manifest,
                        revocations,
                        next,
                    }
                }
            }
            other => other,
        }
    }

    /// The response with its version-1 variants read as the newer ones.
    pub fn upgrade(self) -> Self {
        match self {
            ControlResponse::MembersV1 {
                domain,
                members,
                next,
            } => ControlResponse::Members {
                domain,
                members,
                next,
            },
            ControlResponse::DomainStateV2 {
                manifest,
                revocations,
                next,
            } => ControlResponse::DomainState {
                manifest,
                revocations,
                next,
            },
            other => other,
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
            ControlResponse::Members { members, .. }
            | ControlResponse::MembersV1 { members, .. } => {
                validate::max_count("members", members, MAX_MEMBERS_PER_PAGE)?;
                members.iter().try_for_each(Validate::validate)
            }
            ControlResponse::Pong => Ok(()),
            ControlResponse::Vouchers { vouchers, .. } => {
                validate::max_count("vouchers", vouchers, MAX_VOUCHERS_PER_PAGE)
            }
            ControlResponse::Error { message, .. } => {
                validate::max_len("error.message", message, MAX_ERROR_MESSAGE)
            }
            ControlResponse::DomainState {
                manifest,
                revocations,
                ..
            }
            | ControlResponse::DomainStateV2 {
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

    /// What the previous version's enum looked like, to check the bytes older peers get.
    #[derive(Serialize, Deserialize)]
    enum PreviousResponse {
        Members {
            domain: DomainId,
            members: Vec<(
                Signed<crate::advert::AdvertV1>,
                Option<Signed<MembershipCertificate>>,
            )>,
            next: Option<NodeId>,
        },
        Pong,
        Error {
            code: ErrorCode,
            message: String,
        },
        DomainState {
            manifest: Option<Box<Signed<crate::domain::DomainManifestV1>>>,
            revocations: Vec<Signed<Revocation>>,
            next: Option<(NodeId, u64)>,
        },
    }

    /// A page written on a version-1 or -2 stream is byte for byte what the previous version
    /// wrote, without the members it could not verify; read back, it is the newer page.
    #[test]
    fn older_peers_get_pages_in_their_layout() {
        let mut all = entries(4);
        let priced_node = key(9);
        let mut priced = sample_advert(&priced_node, DomainId([1; 32]));
        priced.completion_price = 3 * priced.prompt_price;
        all.push(MemberEntry {
            advert: Signed::sign(priced, &priced_node).unwrap().into(),
            certificate: None,
        });
        let page = ControlResponse::member_page(DomainId([1; 32]), &all, None).unwrap();
        assert_eq!(page.min_version(), 3);
        let old = page.clone().for_version(2);
        assert_eq!(old.min_version(), 1);
        let bytes = old.to_bytes().unwrap();
        let ControlResponse::Members { members, .. } =
            ControlResponse::from_bytes(&bytes).unwrap().upgrade()
        else {
            panic!("not a member page");
        };
        assert_eq!(members.len(), 4, "the priced member is left out");
        let previous = PreviousResponse::Members {
            domain: DomainId([1; 32]),
            members: members
                .iter()
                .map(|e| (crate::layouts::to_v1(&e.advert).unwrap(), None))
                .collect(),
            next: None,
        };
        assert_eq!(canonical_bytes("previous", &previous).unwrap(), bytes);
        for entry in &members {
            entry.advert.verify().unwrap();
        }

        // An unpriced manifest goes to a version-2 peer as it did; a priced one cannot.
        let operator = key(1);
        let mut manifest = crate::test_utils::sample_manifest(&operator);
        let unpriced = Signed::sign(manifest.clone(), &operator).unwrap();
        let page = ControlResponse::domain_state_page(&unpriced, [], None).unwrap();
        let bytes = page.clone().for_version(2).to_bytes().unwrap();
        let previous = PreviousResponse::DomainState {
            manifest: Some(Box::new(crate::layouts::to_v1(&unpriced).unwrap())),
            revocations: Vec::new(),
            next: None,
        };
        assert_eq!(canonical_bytes("previous", &previous).unwrap(), bytes);
        assert_eq!(ControlResponse::from_bytes(&bytes).unwrap().upgrade(), page);
        manifest.pricing = Some(crate::domain::Pricing {
            price: crate::payment::Price::flat(7),
            operator_share_bps: 100,
        });
        let priced = Signed::sign(manifest, &operator).unwrap();
        let page = ControlResponse::domain_state_page(&priced, [], None).unwrap();
        let ControlResponse::Error { message, .. } = page.clone().for_version(2) else {
            panic!("a priced manifest went to a version-2 peer");
        };
        assert!(message.contains("upgrade"), "{message}");
        assert_eq!(page.clone().for_version(3), page);
        let bytes = page.to_bytes().unwrap();
        assert_eq!(ControlResponse::from_bytes(&bytes).unwrap(), page);
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
            assert_eq!(page.min_version(), 3);
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

    /// Voucher pages walk every channel once, in order, and fit in a response.
    #[test]
    fn voucher_pages_walk_every_channel_once() {
        let escrow = Escrow {
            chain_id: 1337,
            contract: NodeId([0xec; 20]),
        };
        let payer = key(3);
        let vouchers: Vec<SignedVoucher> = (0..9_000u32)
            .map(|i| {
                let b = i.to_be_bytes();
                crate::payment::Voucher {
                    payer: payer.node_id(),
                    payee: NodeId([b[2]; 20]),
                    entry: NodeId([b[3]; 20]),
                    cumulative_amount: u128::from(i) + 1,
                    expires_at: u64::MAX,
                }
                .sign(&escrow, &payer)
                .unwrap()
            })
            .collect();
        let (mut seen, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let page = ControlResponse::voucher_page(escrow, vouchers.iter().rev().copied(), after);
            let bytes = page.to_bytes().unwrap();
            assert!(bytes.len() <= MAX_CONTROL_RESPONSE_BYTES);
            assert_eq!(ControlResponse::from_bytes(&bytes).unwrap(), page);
            let ControlResponse::Vouchers { vouchers, next, .. } = page else {
                panic!("not a voucher page");
            };
            seen.extend(vouchers.iter().map(voucher_key));
            pages += 1;
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        let mut expected: Vec<VoucherKey> = vouchers.iter().map(voucher_key).collect();
        expected.sort();
        expected.dedup();
        assert_eq!(seen, expected);
        let request = ControlRequest::Vouchers {
            escrow,
            after: Some((NodeId([1; 20]), NodeId([2; 20]), NodeId([3; 20]))),
        };
        assert_eq!(request.min_version(), 3);
        assert!(request.to_bytes().unwrap().len() < MAX_CONTROL_REQUEST_BYTES);
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
