//! `decode(encode(x)) == x` for every wire type, and JSON round trips for the types people edit.

use gaia_protocol::Wire;
use gaia_protocol::codec::{FrameDecoder, encode_frame};
use gaia_protocol::domain::DomainManifest;
use gaia_protocol::identity::NodeId;
use gaia_protocol::signed::Signed;
use gaia_protocol::test_utils::*;
use proptest::prelude::*;

fn round_trip<T: Wire + PartialEq + std::fmt::Debug>(value: &T) -> Result<(), TestCaseError> {
    let bytes = value
        .to_bytes()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(bytes.len() <= T::MAX_BYTES);
    let back = T::from_bytes(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, value);
    // The encoding is canonical: encoding again gives the same bytes.
    prop_assert_eq!(
        back.to_bytes()
            .map_err(|e| TestCaseError::fail(e.to_string()))?,
        bytes
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn manifest(value in arb_manifest()) { round_trip(&value)?; }

    #[test]
    fn signed_manifest(value in arb_signed(arb_manifest())) { round_trip(&value)?; }

    #[test]
    fn certificate(value in arb_certificate()) { round_trip(&value)?; }

    #[test]
    fn signed_certificate(value in arb_signed(arb_certificate())) { round_trip(&value)?; }

    #[test]
    fn revocation(value in arb_revocation()) { round_trip(&value)?; }

    #[test]
    fn signed_revocation(value in arb_signed(arb_revocation())) { round_trip(&value)?; }

    #[test]
    fn advert(value in arb_advert()) { round_trip(&value)?; }

    #[test]
    fn signed_advert(value in arb_signed(arb_advert())) { round_trip(&value)?; }

    #[test]
    fn receipt(value in arb_receipt()) { round_trip(&value)?; }

    #[test]
    fn signed_receipt(value in arb_signed(arb_receipt())) { round_trip(&value)?; }

    #[test]
    fn voucher(value in arb_voucher()) { round_trip(&value)?; }

    #[test]

    #[test]
    fn control_request(value in arb_control_request()) { round_trip(&value)?; }

    #[test]
    fn control_response(value in arb_control_response()) { round_trip(&value)?; }

    #[test]
    fn stream_frame(value in arb_stream_frame()) { round_trip(&value)?; }

    #[test]
    fn stream_frames_through_the_frame_codec(
        frames in proptest::collection::vec(arb_stream_frame(), 1..8),
        chunk in 1usize..64,
    ) {
        let mut wire = Vec::new();
        for frame in &frames {
            wire.extend(encode_frame(frame).map_err(|e| TestCaseError::fail(e.to_string()))?);
        }
        let mut decoder = FrameDecoder::new();
        let mut out: Vec<gaia_protocol::stream::StreamFrame> = Vec::new();
        for piece in wire.chunks(chunk) {
            let mut input = piece;
            while let Some(frame) = decoder
                .decode(&mut input)
                .map_err(|e| TestCaseError::fail(e.to_string()))?
            {
                out.push(frame);
            }
        }
        prop_assert_eq!(out, frames);
        prop_assert!(decoder.finish().is_ok());
    }

    #[test]
    fn manifest_json(value in arb_signed(arb_manifest())) {
        let json = serde_json::to_string(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: Signed<DomainManifest> =
            serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, value);
    }

    #[test]
    fn node_id_text(id in arb_node_id()) {
        let text = id.to_string();
        prop_assert_eq!(text.len(), 42);
        prop_assert_eq!(text.parse::<NodeId>().ok(), Some(id));
        prop_assert_eq!(text.to_lowercase().parse::<NodeId>().ok(), Some(id));
        prop_assert_eq!(text[2..].to_uppercase().parse::<NodeId>().ok(), Some(id));
    }
}
