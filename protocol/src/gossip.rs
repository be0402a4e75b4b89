//! Messages on a domain's gossip topic ([`GossipMessage`]): adverts with the publisher's
//! certificate, certificates, revocations, manifests and (since kind 5) the vouchers entry
//! nodes signed, each at most [`MAX_GOSSIP_BYTES`].
//!
//! Since protocol version 2, an advert with two prices travels as kind 7 and a manifest with
//! prices as kind 6 (in their newer layouts, [`crate::layouts`]); adverts and manifests the
//! version-1 layout holds keep kinds 1 and 4, so a node of the previous version reads them and
//! reports the others as a newer node's.
//!
//! A message of a kind this build does not know ([`GossipDecodeError::UnknownKind`]) comes from
//! a newer node: the caller ignores it with a log line and does not hold it against the peer.
//! Every value passes the protocol's static checks when decoded; signatures are checked by
//! the membership machine ([`crate::machine::membership`]).

use crate::Signed;
use crate::Wire;
use crate::advert::{Advert, MAX_ADVERT_BYTES};
use crate::codec::DecodeError;
use crate::control::MemberEntry;
use crate::domain::{
    DomainManifest, MAX_CERTIFICATE_BYTES, MAX_MANIFEST_BYTES, MembershipCertificate, Revocation,
};
use crate::payment::{MAX_VOUCHER_SHARE_BYTES, VoucherShare};

/// The largest gossip message: a tag and a manifest (an advert with its certificate is
/// smaller).
pub const MAX_GOSSIP_BYTES: usize = 1 + MAX_MANIFEST_BYTES;
const _: () = assert!(1 + 2 + MAX_ADVERT_BYTES + MAX_CERTIFICATE_BYTES <= MAX_GOSSIP_BYTES);
const _: () = assert!(MAX_VOUCHER_SHARE_BYTES < MAX_GOSSIP_BYTES);

/// The most vouchers in one gossip message.
pub const MAX_VOUCHERS_PER_MESSAGE: usize = crate::payment::MAX_VOUCHERS_PER_SHARE;

/// A message on a domain's gossip topic.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "messages are decoded and handled one at a time, never stored in bulk"
)]
pub enum GossipMessage {
    /// A member's advert, with its certificate when the domain is not open.
    Advert(MemberEntry),
    /// A membership certificate, re-published by its holder (a gateway that publishes no
    /// advert) so that members accept its requests. `sent_at` only makes each publication a
    /// distinct message for gossip's duplicate filter.
    Certificate {
        /// The certificate.
        certificate: Signed<MembershipCertificate>,
        /// When it was published (unix milliseconds).
        sent_at: u64,
    },
    /// A revocation issued by the operator.
    Revocation(Signed<Revocation>),
    /// A version of the domain's manifest, signed by the operator (members adopt a newer one).
    Manifest(Signed<DomainManifest>),
    /// An entry node's latest vouchers (kind 5; a node before it ignores them with a message).
    Vouchers(VoucherShare),
}

/// A gossip message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum GossipDecodeError {
    /// The message is empty or too short for its header.
    #[error("malformed gossip message: {0}")]
    Malformed(&'static str),
    /// A kind of message this build does not know: sent by a newer node.
    #[error(
        "gossip message of kind {0}, which this build does not know: a peer runs a newer Gaia; \
         upgrade this node"
    )]
    UnknownKind(u8),
    /// The message is above [`MAX_GOSSIP_BYTES`].
    #[error("gossip message of {0} bytes is above the limit of {MAX_GOSSIP_BYTES}")]
    TooLarge(usize),
    /// A value inside does not decode.
    #[error(transparent)]
    Value(#[from] DecodeError),
}

const TAG_ADVERT: u8 = 1;
const TAG_CERTIFICATE: u8 = 2;
const TAG_REVOCATION: u8 = 3;
const TAG_MANIFEST: u8 = 4;
const TAG_VOUCHERS: u8 = 5;
const TAG_PRICED_MANIFEST: u8 = 6;
const TAG_PRICED_ADVERT: u8 = 7;

impl GossipMessage {
    /// The message's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, crate::codec::EncodeError> {
        let mut out = Vec::new();
        match self {
            GossipMessage::Advert(entry) => {
                let advert = entry.advert.to_bytes()?;
                // An advert is below MAX_ADVERT_BYTES < 2^16, which `to_bytes` enforces.
                let len = u16::try_from(advert.len()).map_err(|_| {
                    crate::codec::EncodeError::TooLarge {
                        what: "signed advert",
                        size: advert.len(),
                        limit: MAX_ADVERT_BYTES,
                    }
                })?;
                out.push(if entry.advert.payload.price().is_flat() {
                    TAG_ADVERT
                } else {
                    TAG_PRICED_ADVERT
                });
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&advert);
                if let Some(certificate) = &entry.certificate {
                    out.extend_from_slice(&certificate.to_bytes()?);
                }
            }
            GossipMessage::Certificate {
                certificate,
                sent_at,
            } => {
                out.push(TAG_CERTIFICATE);
                out.extend_from_slice(&sent_at.to_be_bytes());
                out.extend_from_slice(&certificate.to_bytes()?);
            }
            GossipMessage::Revocation(revocation) => {
                out.push(TAG_REVOCATION);
                out.extend_from_slice(&revocation.to_bytes()?);
            }
            GossipMessage::Manifest(manifest) => {
                out.push(if manifest.payload.pricing.is_none() {
                    TAG_MANIFEST
                } else {
                    TAG_PRICED_MANIFEST
                });
                out.extend_from_slice(&manifest.to_bytes()?);
            }
            GossipMessage::Vouchers(share) => {
                out.push(TAG_VOUCHERS);
                out.extend_from_slice(&share.to_bytes()?);
            }
        }
        Ok(out)
    }

    /// Decodes a message; signatures are not checked.
    pub fn decode(bytes: &[u8]) -> Result<Self, GossipDecodeError> {
        if bytes.len() > MAX_GOSSIP_BYTES {
            return Err(GossipDecodeError::TooLarge(bytes.len()));
        }
        let (&tag, rest) = bytes
            .split_first()
            .ok_or(GossipDecodeError::Malformed("empty message"))?;
        match tag {
            TAG_ADVERT | TAG_PRICED_ADVERT => {
                let (len, rest) = rest
                    .split_first_chunk::<2>()
                    .ok_or(GossipDecodeError::Malformed("advert length missing"))?;
                let len = usize::from(u16::from_be_bytes(*len));
                if len > rest.len() {
                    return Err(GossipDecodeError::Malformed(
                        "advert longer than the message",
                    ));
                }
                let (advert, certificate) = rest.split_at(len);
                let advert = Signed::<Advert>::from_bytes(advert)?;
                let certificate = if certificate.is_empty() {
                    None
                } else {
                    Some(Signed::<MembershipCertificate>::from_bytes(certificate)?)
                };
                Ok(GossipMessage::Advert(MemberEntry {
                    advert: advert.into(),
                    certificate: certificate.map(Into::into),
                }))
            }
            TAG_CERTIFICATE => {
                let (sent_at, rest) =
                    rest.split_first_chunk::<8>()
                        .ok_or(GossipDecodeError::Malformed(
                            "certificate timestamp missing",
                        ))?;
                Ok(GossipMessage::Certificate {
                    certificate: Signed::<MembershipCertificate>::from_bytes(rest)?,
                    sent_at: u64::from_be_bytes(*sent_at),
                })
            }
            TAG_REVOCATION => Ok(GossipMessage::Revocation(Signed::<Revocation>::from_bytes(
                rest,
            )?)),
            TAG_MANIFEST | TAG_PRICED_MANIFEST => {
                Ok(GossipMessage::Manifest(
                    Signed::<DomainManifest>::from_bytes(rest)?,
                ))
            }
            TAG_VOUCHERS => Ok(GossipMessage::Vouchers(VoucherShare::from_bytes(rest)?)),
            // Kinds reserved for later versions: a newer node's message, not an attack.
            other @ 8..=15 => Err(GossipDecodeError::UnknownKind(other)),
            _ => Err(GossipDecodeError::Malformed("unknown message kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DomainId;
    use crate::domain::Revocation;
    use crate::test_utils::{
        key, really_signed, sample_advert, sample_certificate, sample_manifest,
    };

    fn advert(node: &crate::SecretKey, domain: DomainId, seq: u64) -> Signed<Advert> {
        let mut advert = sample_advert(node, domain);
        advert.seq = seq;
        really_signed(advert, node)
    }

    fn certificate(
        operator: &crate::SecretKey,
        domain: DomainId,
        member: crate::NodeId,
        serial: u64,
    ) -> Signed<MembershipCertificate> {
        let mut cert = sample_certificate(domain, member, 1_700_000_000);
        cert.serial = serial;
        really_signed(cert, operator)
    }

    fn revocation(
        operator: &crate::SecretKey,
        domain: DomainId,
        member: crate::NodeId,
        serial: u64,
    ) -> Signed<Revocation> {
        really_signed(
            Revocation {
                domain,
                member,
                serial,
                revoked_at: 1_700_000_100,
            },
            operator,
        )
    }

    #[test]
    fn gossip_messages_round_trip() {
        let node = key(3);
        let operator = key(1);
        let domain = DomainId([7; 32]);
        let cert = certificate(&operator, domain, node.node_id(), 1);
        let messages = [
            GossipMessage::Advert(MemberEntry {
                advert: advert(&node, domain, 1).into(),
                certificate: None,
            }),
            GossipMessage::Advert(MemberEntry {
                advert: advert(&node, domain, 2).into(),
                certificate: Some(cert.clone().into()),
            }),
            GossipMessage::Certificate {
                certificate: cert,
                sent_at: 42,
            },
            GossipMessage::Revocation(revocation(&operator, domain, node.node_id(), 1)),
            GossipMessage::Manifest(Signed::sign(sample_manifest(&operator), &operator).unwrap()),
            GossipMessage::Vouchers(share(crate::payment::MAX_VOUCHERS_PER_SHARE)),
        ];
        for message in messages {
            let bytes = message.encode().unwrap();
            assert!(bytes.len() <= MAX_GOSSIP_BYTES);
            assert_eq!(GossipMessage::decode(&bytes).unwrap(), message);
        }
    }

    /// Priced adverts and manifests take kinds 7 and 6, which a node of the previous version
    /// (kinds 6 to 15 unknown to it) reports as a newer node's; flat ones keep kinds 1 and 4.
    #[test]
    fn priced_adverts_and_manifests_take_kinds_the_previous_version_reports_as_newer() {
        let node = key(3);
        let operator = key(1);
        let domain = DomainId([7; 32]);
        let flat = GossipMessage::Advert(MemberEntry {
            advert: advert(&node, domain, 1).into(),
            certificate: None,
        });
        assert_eq!(flat.encode().unwrap()[0], TAG_ADVERT);
        let mut priced = sample_advert(&node, domain);
        priced.completion_price = 4 * priced.prompt_price;
        let priced = GossipMessage::Advert(MemberEntry {
            advert: really_signed(priced, &node).into(),
            certificate: None,
        });
        let bytes = priced.encode().unwrap();
        assert_eq!(bytes[0], TAG_PRICED_ADVERT);
        assert_eq!(GossipMessage::decode(&bytes).unwrap(), priced);

        let mut manifest = sample_manifest(&operator);
        assert_eq!(
            GossipMessage::Manifest(really_signed(manifest.clone(), &operator))
                .encode()
                .unwrap()[0],
            TAG_MANIFEST
        );
        manifest.pricing = Some(crate::domain::Pricing {
            price: crate::payment::Price {
                prompt: 1_000,
                completion: 3_000,
            },
            operator_share_bps: 500,
        });
        let priced = GossipMessage::Manifest(really_signed(manifest, &operator));
        let bytes = priced.encode().unwrap();
        assert_eq!(bytes[0], TAG_PRICED_MANIFEST);
        assert_eq!(GossipMessage::decode(&bytes).unwrap(), priced);
    }

    fn share(count: usize) -> VoucherShare {
        let payer = key(5);
        let escrow = crate::payment::Escrow {
            chain_id: 1337,
            contract: key(6).node_id(),
        };
        let vouchers = (0..count)
            .map(|i| {
                crate::payment::Voucher {
                    payer: payer.node_id(),
                    payee: key(7).node_id(),
                    entry: key(8).node_id(),
                    cumulative_amount: u128::MAX - i as u128,
                    expires_at: u64::MAX,
                }
                .sign(&escrow, &payer)
                .unwrap()
            })
            .collect();
        VoucherShare { escrow, vouchers }
    }

    /// A share of more vouchers than allowed is refused by the encoder and by the decoder
    /// (whatever count its length prefix claims).
    #[test]
    fn a_share_of_too_many_vouchers_is_refused() {
        let too_many = share(crate::payment::MAX_VOUCHERS_PER_SHARE + 1);
        assert!(GossipMessage::Vouchers(too_many.clone()).encode().is_err());
        let mut bytes = vec![TAG_VOUCHERS];
        bytes.extend_from_slice(&crate::codec::canonical_bytes("share", &too_many).unwrap());
        assert!(matches!(
            GossipMessage::decode(&bytes),
            Err(GossipDecodeError::Value(_) | GossipDecodeError::TooLarge(_))
        ));
    }

    #[test]
    fn malformed_gossip_is_an_error_not_a_panic() {
        let node = key(3);
        let good = GossipMessage::Advert(MemberEntry {
            advert: advert(&node, DomainId([7; 32]), 1).into(),
            certificate: None,
        })
        .encode()
        .unwrap();
        for cut in 0..good.len() {
            assert!(GossipMessage::decode(&good[..cut]).is_err(), "prefix {cut}");
        }
        let mut flipped = good.clone();
        flipped[1] = 0xff;
        assert!(GossipMessage::decode(&flipped).is_err());
        assert!(matches!(
            GossipMessage::decode(&[9, 1, 2]),
            Err(GossipDecodeError::UnknownKind(9))
        ));
        assert!(GossipMessage::decode(&vec![1u8; MAX_GOSSIP_BYTES + 1]).is_err());
        let mut seed = 0x1234_5678_u64;
        for len in 0..400 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 56) as u8
                })
                .collect();
            let _ = GossipMessage::decode(&junk);
        }
    }
}
