//! Signature properties over random payloads: round trips, tampering, replay across kinds.

use gaia_protocol::Wire;
use gaia_protocol::advert::Advert;
use gaia_protocol::domain::MembershipCertificate;
use gaia_protocol::signature::{self, MessageKind};
use gaia_protocol::signed::Signed;
use gaia_protocol::test_utils::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn signed_adverts_verify_and_tampering_is_caught(
        seed in 1u8..=255, advert in arb_advert(),
        flip in any::<prop::sample::Index>(), xor in 1u8..=255,
    ) {
        let node = key(seed);
        let advert = Advert { node: node.node_id(), ..advert };
        let signed = really_signed(advert, &node);
        prop_assert!(signed.verify().is_ok());
        let bytes = signed.to_bytes().map_err(|e| TestCaseError::fail(e.to_string()))?;

        let mut mutated = bytes.clone();
        let at = flip.index(mutated.len());
        mutated[at] ^= xor;
        if let Ok(decoded) = Signed::<Advert>::from_bytes(&mutated) {
            // A change that survives decoding either left the value as it was or breaks the
            // signature.
            prop_assert!(decoded == signed || decoded.verify().is_err());
        }
    }

    #[test]
    fn raw_signatures_recover_their_signer_only_for_their_kind(
        seed in 1u8..=255, payload in proptest::collection::vec(any::<u8>(), 0..256),
        kind in 0usize..MessageKind::ALL.len(),
    ) {
        let key = key(seed);
        let kind = MessageKind::ALL[kind];
        let sig = signature::sign(&key, kind, &payload).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(signature::recover(kind, &payload, &sig).ok(), Some(key.node_id()));
        for other in MessageKind::ALL {
            if other != kind {
                prop_assert_ne!(signature::recover(other, &payload, &sig).ok(), Some(key.node_id()));
            }
        }
        prop_assert_ne!(signature::recover_personal(&payload, &sig).ok(), Some(key.node_id()));
        let personal = signature::sign_personal(&key, &payload).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(signature::recover_personal(&payload, &personal).ok(), Some(key.node_id()));
        prop_assert_ne!(signature::recover(kind, &payload, &personal).ok(), Some(key.node_id()));
    }

    #[test]
    fn random_signature_bytes_are_errors_or_other_signers(
        bytes in proptest::collection::vec(any::<u8>(), 65), payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut raw = [0u8; 65];
        raw.copy_from_slice(&bytes);
        // Must not panic; any recovered address is someone's, never checked as ours here.
        let _ = signature::recover(MessageKind::Advert, &payload, &signature::Signature(raw));
        let _ = signature::Signature::from_slice(&bytes);
    }

    #[test]
    fn certificates_signed_by_the_operator_verify(seed in 1u8..=255, cert in arb_certificate()) {
        let operator = key(seed);
        let signed = really_signed::<MembershipCertificate>(cert, &operator);
        prop_assert!(signed.verify_signed_by(operator.node_id()).is_ok());
        let other = key(seed.wrapping_add(1).max(1));
        prop_assert!(signed.verify_signed_by(other.node_id()).is_err());
    }
}
