//! The signed envelope: a payload, the address that signed it, and the signature.
//!
//! The signature covers the payload's canonical bincode encoding, hashed as EIP-712 typed data
//! of the payload's [`MessageKind`] (see [`crate::signature`]). The signing bytes are recomputed
//! from the decoded payload when verifying, so how the envelope travelled does not matter.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::codec::{EncodeError, canonical_bytes};
use crate::identity::{NodeId, SecretKey};
use crate::signature::{self, MessageKind, Signature, SignatureError};
use crate::validate::{Validate, ValidationError};

/// A payload type that can be signed.
pub trait Signable: Serialize + Validate {
    /// The kind its signatures are made for.
    const KIND: MessageKind;
    /// A human name for error messages.
    const NAME: &'static str;

    /// The address the payload names as its author, if it names one (an advert names its node,
    /// a manifest its operator). A signature by anyone else is rejected.
    fn author(&self) -> Option<NodeId>;

    /// The bytes the signature covers: the payload's canonical encoding (a type with two
    /// layouts signs its version-1 layout while that holds the value, see [`crate::layouts`]).
    fn signing_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        canonical_bytes(Self::NAME, self)
    }
}

/// A signed message could not be made or checked.
#[derive(Debug, thiserror::Error)]
pub enum SignedError {
    /// The payload breaks a protocol rule.
    #[error("invalid {what}: {source}")]
    Invalid {
        /// The payload type.
        what: &'static str,
        /// The rule it breaks.
        source: ValidationError,
    },
    /// The payload could not be encoded for signing.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The signature is malformed or from another key.
    #[error("bad signature on {what}: {source}")]
    Signature {
        /// The payload type.
        what: &'static str,
        /// What is wrong with it.
        source: SignatureError,
    },
    /// The payload names another author than its signer.
    #[error("{what} names {author} as its author but is signed by {signer}")]
    NotAuthor {
        /// The payload type.
        what: &'static str,
        /// The author the payload names.
        author: NodeId,
        /// The address that signed it.
        signer: NodeId,
    },
}

/// A payload with its signer and signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed<T> {
    /// The signed content.
    pub payload: T,
    /// The address that claims to have signed it.
    pub signer: NodeId,
    /// The signature over the payload.
    pub signature: Signature,
}

impl<T: Signable> Signed<T> {
    /// Validates `payload` and signs it with `key`.
    pub fn sign(payload: T, key: &SecretKey) -> Result<Self, SignedError> {
        payload.validate().map_err(|source| SignedError::Invalid {
            what: T::NAME,
            source,
        })?;
        let bytes = payload.signing_bytes()?;
        let signature =
            signature::sign(key, T::KIND, &bytes).map_err(|source| SignedError::Signature {
                what: T::NAME,
                source,
            })?;
        let signed = Self {
            payload,
            signer: key.node_id(),
            signature,
        };
        signed.check_author()?;
        Ok(signed)
    }

    /// The EIP-712 digest the signature covers; unique per payload, so it also serves as a
    /// message id (e.g. for gossip de-duplication).
    pub fn digest(&self) -> Result<[u8; 32], SignedError> {
        let bytes = self.payload.signing_bytes()?;
        Ok(signature::typed_digest(T::KIND, &bytes))
    }

    /// Checks that `signer` signed the payload and that the payload names no other author.
    /// Returns the payload.
    pub fn verify(&self) -> Result<&T, SignedError> {
        let digest = self.digest()?;
        let recovered = signature::recover_digest(&digest, &self.signature).map_err(|source| {
            SignedError::Signature {
                what: T::NAME,
                source,
            }
        })?;
        if recovered != self.signer {
            return Err(SignedError::Signature {
                what: T::NAME,
                source: SignatureError::WrongSigner {
                    expected: self.signer,
                    recovered,
                },
            });
        }
        self.check_author()?;
        Ok(&self.payload)
    }

    /// Like [`Signed::verify`], and also requires the signer to be `expected` (e.g. the domain
    /// operator for a certificate).
    pub fn verify_signed_by(&self, expected: NodeId) -> Result<&T, SignedError> {
        if self.signer != expected {
            return Err(SignedError::Signature {
                what: T::NAME,
                source: SignatureError::WrongSigner {
                    expected,
                    recovered: self.signer,
                },
            });
        }
        self.verify()
    }

    /// Verifies, then gives up the envelope.
    pub fn into_verified(self) -> Result<T, SignedError> {
        self.verify()?;
        Ok(self.payload)
    }

    fn check_author(&self) -> Result<(), SignedError> {
        match self.payload.author() {
            Some(author) if author != self.signer => Err(SignedError::NotAuthor {
                what: T::NAME,
                author,
                signer: self.signer,
            }),
            _ => Ok(()),
        }
    }
}

/// A signed value shared by every table that holds it: immutable once made (there is no
/// mutable access), so a successful verification is remembered and the same value checked
/// again, by another table of the same process or after a round trip through a snapshot,
/// costs nothing. On the wire it is the signed value itself.
#[derive(Debug)]
pub struct Shared<T>(Arc<SharedInner<T>>);

#[derive(Debug)]
struct SharedInner<T> {
    signed: Signed<T>,
    verified: OnceLock<()>,
}

impl<T> Shared<T> {
    /// Shares `signed` (not yet verified).
    pub fn new(signed: Signed<T>) -> Self {
        Self(Arc::new(SharedInner {
            signed,
            verified: OnceLock::new(),
        }))
    }

    /// The signed value, cloned unless this is its last holder.
    pub fn unwrap_or_clone(this: Self) -> Signed<T>
    where
        T: Clone,
    {
        match Arc::try_unwrap(this.0) {
            Ok(inner) => inner.signed,
            Err(shared) => shared.signed.clone(),
        }
    }
}

impl<T: Signable> Shared<T> {
    /// [`Signed::verify`], done once for every holder of this value.
    pub fn verify(&self) -> Result<&T, SignedError> {
        if self.0.verified.get().is_none() {
            self.0.signed.verify()?;
            let _ = self.0.verified.set(());
        }
        Ok(&self.0.signed.payload)
    }

    /// [`Signed::verify_signed_by`], the signature checked once for every holder.
    pub fn verify_signed_by(&self, expected: NodeId) -> Result<&T, SignedError> {
        if self.0.signed.signer != expected {
            return self.0.signed.verify_signed_by(expected);
        }
        self.verify()
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = Signed<T>;

    fn deref(&self) -> &Signed<T> {
        &self.0.signed
    }
}

impl<T: PartialEq> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.signed == other.0.signed
    }
}

impl<T> From<Signed<T>> for Shared<T> {
    fn from(signed: Signed<T>) -> Self {
        Self::new(signed)
    }
}

impl<T: Serialize> Serialize for Shared<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.signed.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Shared<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Signed::deserialize(deserializer).map(Self::new)
    }
}

impl<T: Validate> Validate for Signed<T> {
    fn validate(&self) -> Result<(), ValidationError> {
        self.payload.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Wire;
    use crate::domain::DomainId;
    use crate::test_utils::{key, sample_advert, sample_certificate};

    #[test]
    fn sign_verify_round_trip_through_bytes() {
        let node = key(1);
        let advert = sample_advert(&node, DomainId([3; 32]));
        let signed = Signed::sign(advert.clone(), &node).unwrap();
        assert_eq!(signed.signer, node.node_id());
        let bytes = signed.to_bytes().unwrap();
        let back = Signed::<crate::advert::Advert>::from_bytes(&bytes).unwrap();
        assert_eq!(back.verify().unwrap(), &advert);
        assert_eq!(back.digest().unwrap(), signed.digest().unwrap());
        back.verify_signed_by(node.node_id()).unwrap();
        assert!(back.verify_signed_by(key(2).node_id()).is_err());
    }

    #[test]
    fn tampered_payload_signer_or_signature_is_rejected() {
        let node = key(1);
        let signed = Signed::sign(sample_advert(&node, DomainId([3; 32])), &node).unwrap();

        let mut tampered = signed.clone();
        tampered.payload.prompt_price += 1;
        assert!(matches!(
            tampered.verify(),
            Err(SignedError::Signature { .. })
        ));

        let mut tampered = signed.clone();
        tampered.signer = key(2).node_id();
        assert!(matches!(
            tampered.verify(),
            Err(SignedError::Signature { .. })
        ));

        let mut tampered = signed.clone();
        tampered.signature.0[10] ^= 0x40;
        assert!(tampered.verify().is_err());

        let mut tampered = signed;
        tampered.signature.0[64] = 99;
        let err = tampered.verify().unwrap_err();
        assert!(err.to_string().contains("recovery byte"), "{err}");
    }

    /// A shared value remembers its verification for every holder, travels as the signed
    /// value itself, and a tampered copy (only possible by taking the value out and sharing
    /// it anew) is checked afresh.
    #[test]
    fn shared_values_verify_once_and_tampering_needs_a_fresh_share() {
        let node = key(1);
        let signed = Signed::sign(sample_advert(&node, DomainId([3; 32])), &node).unwrap();
        let shared = Shared::new(signed.clone());
        let holder = shared.clone();
        assert_eq!(shared.verify().unwrap(), &signed.payload);
        assert!(
            holder.0.verified.get().is_some(),
            "the other holder sees it verified"
        );
        shared.verify_signed_by(node.node_id()).unwrap();
        assert!(shared.verify_signed_by(key(2).node_id()).is_err());
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&shared, config).unwrap();
        assert_eq!(
            bytes,
            bincode::serde::encode_to_vec(&signed, config).unwrap()
        );
        let (back, _): (Shared<crate::advert::Advert>, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, shared);
        assert!(
            back.0.verified.get().is_none(),
            "decoded values are checked afresh"
        );
        back.verify().unwrap();

        let mut tampered = Shared::unwrap_or_clone(holder);
        tampered.payload.prompt_price += 1;
        let tampered = Shared::new(tampered);
        assert!(tampered.verify().is_err());
        assert!(
            tampered.verify().is_err(),
            "a failure is not remembered as a success"
        );
        assert_ne!(tampered, shared);
    }

    #[test]
    fn a_node_cannot_sign_for_another_author() {
        let advert = sample_advert(&key(1), DomainId([3; 32]));
        let err = Signed::sign(advert, &key(2)).unwrap_err();
        assert!(matches!(err, SignedError::NotAuthor { .. }), "{err}");
    }

    #[test]
    fn cross_kind_replay_through_envelopes_is_rejected() {
        // A receipt and a voucher can share bytes in principle; make sure a signature over the
        // very same bytes made for another kind never verifies.
        let operator = key(1);
        let cert = sample_certificate(DomainId([3; 32]), key(2).node_id(), 100);
        let signed = Signed::sign(cert.clone(), &operator).unwrap();
        let bytes = crate::codec::canonical_bytes("cert", &cert).unwrap();
        let as_revocation_digest = crate::signature::typed_digest(MessageKind::Revocation, &bytes);
        let recovered =
            crate::signature::recover_digest(&as_revocation_digest, &signed.signature).ok();
        assert_ne!(recovered, Some(operator.node_id()));
    }

    #[test]
    fn invalid_payloads_are_not_signed() {
        let node = key(1);
        let mut advert = sample_advert(&node, DomainId([3; 32]));
        advert.load.tokens_per_s = f32::INFINITY;
        assert!(matches!(
            Signed::sign(advert, &node),
            Err(SignedError::Invalid { .. })
        ));
    }
}
