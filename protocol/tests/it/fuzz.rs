//! Hostile bytes: every decoder and the frame decoder get random, truncated, mutated and
//! oversized input. They must return errors, never panic, and never allocate much more than
//! the type's byte limit.

use gaia_protocol::Wire;
use gaia_protocol::advert::Advert;
use gaia_protocol::codec::{DecodeError, FrameDecoder, FrameError, MAX_FRAME};
use gaia_protocol::control::{ControlRequest, ControlResponse};
use gaia_protocol::domain::{DomainManifest, MembershipCertificate, Revocation};
use gaia_protocol::payment::{Receipt, SignedVoucher};
use gaia_protocol::signed::Signed;
use gaia_protocol::stream::StreamFrame;
use gaia_protocol::test_utils::*;
use proptest::prelude::*;

use crate::alloc_meter::peak_during;

/// What a decoder may allocate for `T`: its input limit three times over (strings claimed from
/// the limit, the lists' entries, the value returned) plus a little fixed overhead.
fn budget<T: Wire>() -> usize {
    3 * T::MAX_BYTES + 64 * 1024
}

/// Decodes `bytes` as a `T` under the allocation meter.
fn decode_metered<T: Wire>(bytes: &[u8]) -> Result<Result<T, DecodeError>, TestCaseError> {
    let (result, peak) = peak_during(|| T::from_bytes(bytes));
    prop_assert!(
        peak <= budget::<T>(),
        "{} decoder allocated {} bytes for {} input bytes (budget {})",
        T::NAME,
        peak,
        bytes.len(),
        budget::<T>()
    );
    Ok(result)
}

/// Feeds `bytes` to every decoder.
fn every_decoder(bytes: &[u8]) -> Result<(), TestCaseError> {
    decode_metered::<DomainManifest>(bytes)?.ok();
    decode_metered::<Signed<DomainManifest>>(bytes)?.ok();
    decode_metered::<MembershipCertificate>(bytes)?.ok();
    decode_metered::<Signed<MembershipCertificate>>(bytes)?.ok();
    decode_metered::<Revocation>(bytes)?.ok();
    decode_metered::<Signed<Revocation>>(bytes)?.ok();
    decode_metered::<Advert>(bytes)?.ok();
    decode_metered::<Signed<Advert>>(bytes)?.ok();
    decode_metered::<Receipt>(bytes)?.ok();
    decode_metered::<Signed<Receipt>>(bytes)?.ok();
    decode_metered::<SignedVoucher>(bytes)?.ok();
    decode_metered::<ControlRequest>(bytes)?.ok();
    decode_metered::<ControlResponse>(bytes)?.ok();
    decode_metered::<StreamFrame>(bytes)?.ok();
    Ok(())
}

/// Checks that every strict prefix of a valid encoding fails, that a mutated one does not
/// panic, and that extra bytes are refused.
fn hostile_variants<T: Wire + PartialEq + std::fmt::Debug>(
    value: &T,
    cut: prop::sample::Index,
    flip: prop::sample::Index,
    xor: u8,
) -> Result<(), TestCaseError> {
    hostile(value, cut, flip, xor, false)
}

/// [`hostile_variants`] for a signed value with two layouts (`gaia_protocol::layouts`): a cut
/// or extended encoding may parse in the other layout, with its signer and signature shifted,
/// but never as the value itself (whose signature then does not verify).
fn hostile_layered_variants<T: Wire + PartialEq + std::fmt::Debug>(
    value: &T,
    cut: prop::sample::Index,
    flip: prop::sample::Index,
    xor: u8,
) -> Result<(), TestCaseError> {
    hostile(value, cut, flip, xor, true)
}

fn hostile<T: Wire + PartialEq + std::fmt::Debug>(
    value: &T,
    cut: prop::sample::Index,
    flip: prop::sample::Index,
    xor: u8,
    layered: bool,
) -> Result<(), TestCaseError> {
    let bytes = value
        .to_bytes()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;

    let truncated = &bytes[..cut.index(bytes.len())];
    match decode_metered::<T>(truncated)? {
        Err(_) => {}
        Ok(other) => prop_assert!(
            layered && other != *value,
            "a strict prefix decoded as {other:?}"
        ),
    }

    let mut mutated = bytes.clone();
    let at = flip.index(mutated.len());
    mutated[at] ^= xor.max(1);
    decode_metered::<T>(&mutated)?.ok();

    let mut longer = bytes.clone();
    longer.push(0);
    let err = decode_metered::<T>(&longer)?;
    let refused = match &err {
        Err(DecodeError::TrailingBytes { extra: 1, .. }) | Err(DecodeError::TooLarge { .. }) => {
            true
        }
        Err(_) => layered,
        Ok(other) => layered && other != value,
    };
    prop_assert!(refused, "trailing byte accepted: {:?}", err.map(|_| ()));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic_or_overallocate(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        every_decoder(&bytes)?;
    }

    #[test]
    fn random_bytes_with_valid_looking_prefixes(
        tag in 0u8..8,
        len_prefix in prop_oneof![Just(0xfbu8), Just(0xfc), Just(0xfd), Just(0xfe), any::<u8>()],
        big in any::<u64>(),
        rest in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        // Enum tag, then a varint length marker followed by a huge length: the shape that makes
        // naive decoders allocate gigabytes.
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&[7u8; 16]);
        bytes.push(len_prefix);
        bytes.extend_from_slice(&big.to_le_bytes());
        bytes.extend_from_slice(&rest);
        every_decoder(&bytes)?;
        every_decoder(&bytes[1..])?;
        every_decoder(&bytes[17..])?;
    }

    #[test]
    fn truncated_mutated_and_extended_manifests(
        value in arb_signed(arb_manifest()), cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(), xor in any::<u8>(),
    ) {
        hostile_layered_variants(&value, cut, flip, xor)?;
    }

    #[test]
    fn truncated_mutated_and_extended_adverts(
        value in arb_signed(arb_advert()), cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(), xor in any::<u8>(),
    ) {
        hostile_layered_variants(&value, cut, flip, xor)?;
    }

    #[test]
    fn truncated_mutated_and_extended_certificates(
        cert in arb_signed(arb_certificate()), rev in arb_signed(arb_revocation()),
        cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), xor in any::<u8>(),
    ) {
        hostile_variants(&cert, cut, flip, xor)?;
        hostile_variants(&rev, cut, flip, xor)?;
    }

    #[test]
    fn truncated_mutated_and_extended_payments(
        receipt in arb_signed(arb_receipt()), voucher in arb_voucher(),
        cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), xor in any::<u8>(),
    ) {
        hostile_layered_variants(&receipt, cut, flip, xor)?;
        hostile_variants(&voucher, cut, flip, xor)?;
    }

    #[test]
    fn truncated_mutated_and_extended_control(
        request in arb_control_request(), response in arb_control_response(),
        cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), xor in any::<u8>(),
    ) {
        hostile_variants(&request, cut, flip, xor)?;
        hostile_variants(&response, cut, flip, xor)?;
    }

    #[test]
    fn truncated_mutated_and_extended_stream_frames(
        frame in arb_stream_frame(), cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(), xor in any::<u8>(),
    ) {
        hostile_variants(&frame, cut, flip, xor)?;
    }

    #[test]
    fn frame_decoder_survives_random_streams(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..32),
    ) {
        let mut decoder = FrameDecoder::new();
        let ((), peak) = peak_during(|| {
            'outer: for chunk in &chunks {
                let mut input = &chunk[..];
                loop {
                    match decoder.decode::<StreamFrame>(&mut input) {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
            }
            let _ = decoder.finish();
        });
        prop_assert!(peak <= MAX_FRAME + budget::<StreamFrame>(), "peak {peak}");
    }

    #[test]
    fn frame_decoder_rejects_bad_lengths(len in prop_oneof![Just(0u32), (MAX_FRAME as u32 + 1)..=u32::MAX]) {
        let mut decoder = FrameDecoder::new();
        let header = len.to_be_bytes();
        let (result, peak) = peak_during(|| decoder.decode_raw(&mut &header[..]));
        let rejected = matches!(result, Err(FrameError::Empty) | Err(FrameError::TooLarge { .. }));
        prop_assert!(rejected, "header {} was not rejected", len);
        prop_assert!(peak < 1024, "allocated {peak} bytes for a rejected header");
    }

    #[test]
    fn frame_with_random_body_is_an_error_not_a_panic(
        body in proptest::collection::vec(any::<u8>(), 1..512),
    ) {
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&body);
        let mut decoder = FrameDecoder::new();
        let _ = decoder.decode::<StreamFrame>(&mut &wire[..]);
        let mut decoder = FrameDecoder::new();
        let _ = decoder.decode::<ControlResponse>(&mut &wire[..]);
    }
}

#[test]
fn inputs_above_the_limit_are_refused_without_decoding() {
    fn check<T: Wire>() {
        let bytes = vec![0u8; T::MAX_BYTES + 1];
        let (result, peak) = peak_during(|| T::from_bytes(&bytes));
        assert!(
            matches!(result, Err(DecodeError::TooLarge { .. })),
            "{}",
            T::NAME
        );
        assert!(peak < 1024, "{} allocated {peak} bytes", T::NAME);
    }
    check::<Signed<DomainManifest>>();
    check::<Signed<MembershipCertificate>>();
    check::<Signed<Revocation>>();
    check::<Signed<Advert>>();
    check::<Signed<Receipt>>();
    check::<SignedVoucher>();
    check::<ControlRequest>();
    check::<ControlResponse>();
    check::<StreamFrame>();
}

#[test]
fn a_hostile_list_length_does_not_preallocate() {
    // ControlResponse::Members (variant 0), a domain id, then a list claiming 2^32 entries.
    let mut bytes = vec![0u8];
    bytes.extend_from_slice(&[1u8; 32]);
    bytes.push(0xfc); // varint marker: u32 follows
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    let (result, peak) = peak_during(|| ControlResponse::from_bytes(&bytes));
    assert!(result.is_err());
    assert!(peak < 16 * 1024, "allocated {peak} bytes");

    // The same with a plausible count but no entries behind it.
    let mut bytes = vec![0u8];
    bytes.extend_from_slice(&[1u8; 32]);
    bytes.push(0xfb); // varint marker: u16 follows
    bytes.extend_from_slice(&1000u16.to_le_bytes());
    let (result, peak) = peak_during(|| ControlResponse::from_bytes(&bytes));
    assert!(result.is_err());
    assert!(peak < 64 * 1024, "allocated {peak} bytes");
}
