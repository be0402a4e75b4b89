//! Two wire layouts of one signed value, so that nodes of the previous protocol version keep
//! understanding everything they can.
//!
//! Prices came to adverts, receipts and manifests after nodes were already running: an advert
//! carries a prompt and a completion price where it carried one price, a receipt likewise, and a
//! manifest may state the domain's prices. Each of these types has a *version-1 layout* (what
//! the previous version encodes and signs) and its own, newer layout: the version-1 fields in
//! their order with the new fields appended. A value is encoded, and signed, in the version-1
//! layout whenever that layout can hold it (one price for prompt and completion, a manifest
//! without prices), so an unpriced domain looks exactly as it did and a node of the previous
//! version verifies the same signatures; only a value that needs the new fields takes the new
//! layout, under message kinds and protocol versions the previous version reports as newer
//! (gossip kinds 6 and 7, `/gaia/control/3.0.0`, `/gaia/stream/2.0.0`).
//!
//! On its own (a file, a gossip message, a ledger record) a signed value's length tells the two
//! layouts apart: the new layout of a value is its version-1 layout with bytes appended before
//! the signer and signature, so the encoding of a value in one layout leaves bytes over, or
//! runs out, when read in the other. (Bytes cut or added can parse in the other layout, with
//! the signer and signature shifted: the signature then does not verify.) Nested in a larger message the layout is the message's: the
//! version-1 variants of control responses and stream frames hold version-1 layouts
//! ([`legacy`]), their newer variants the new ones.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec::{DecodeError, EncodeError, canonical_bytes, decode_unchecked, encode_unchecked};
use crate::signed::{Signable, Signed};
use crate::validate::Validate;

/// A type with a version-1 layout besides its own.
pub trait Layouts: Signable + DeserializeOwned {
    /// The version-1 layout.
    type V1: Serialize + DeserializeOwned;

    /// The value in the version-1 layout, when that layout can hold it.
    fn to_v1(&self) -> Option<Self::V1>;

    /// The value a version-1 layout held.
    fn from_v1(v1: Self::V1) -> Self;
}

/// The bytes a signature over `value` covers: its version-1 layout when that holds it, so that
/// nodes of the previous version verify the same signature; its own layout otherwise.
pub(crate) fn signing_bytes<T: Layouts>(value: &T) -> Result<Vec<u8>, EncodeError> {
    match value.to_v1() {
        Some(v1) => canonical_bytes(T::NAME, &v1),
        None => canonical_bytes(T::NAME, value),
    }
}

/// `signed` in the version-1 layout, when that layout can hold it.
pub fn to_v1<T: Layouts>(signed: &Signed<T>) -> Option<Signed<T::V1>> {
    signed.payload.to_v1().map(|payload| Signed {
        payload,
        signer: signed.signer,
        signature: signed.signature,
    })
}

fn from_v1<T: Layouts>(signed: Signed<T::V1>) -> Signed<T> {
    Signed {
        payload: T::from_v1(signed.payload),
        signer: signed.signer,
        signature: signed.signature,
    }
}

/// Encodes `signed` (at most `N` bytes) in the version-1 layout when that holds it, else in its
/// own.
pub(crate) fn encode<T: Layouts, const N: usize>(
    what: &'static str,
    signed: &Signed<T>,
) -> Result<Vec<u8>, EncodeError> {
    signed
        .validate()
        .map_err(|source| EncodeError::Invalid { what, source })?;
    match to_v1(signed) {
        Some(v1) => encode_unchecked::<_, N>(what, &v1),
        None => encode_unchecked::<_, N>(what, signed),
    }
}

/// Decodes a signed value of either layout (told apart by length, see the module docs).
pub(crate) fn decode<T: Layouts, const N: usize>(
    what: &'static str,
    bytes: &[u8],
) -> Result<Signed<T>, DecodeError> {
    let signed = match decode_unchecked::<Signed<T::V1>, N>(what, bytes) {
        Ok(v1) => from_v1(v1),
        Err(v1_error) => match decode_unchecked::<Signed<T>, N>(what, bytes) {
            Ok(signed) => signed,
            // Bytes over after a version-1 value: the newer layout's error says more.
            Err(error) if matches!(v1_error, DecodeError::TrailingBytes { .. }) => {
                return Err(error);
            }
            Err(_) => return Err(v1_error),
        },
    };
    signed
        .validate()
        .map_err(|source| DecodeError::Invalid { what, source })?;
    Ok(signed)
}

/// Implements [`crate::Wire`] for `Signed<$ty>` with both layouts.
macro_rules! impl_layered_wire {
    ($ty:ty, $name:literal, $max:expr) => {
        impl $crate::codec::Wire for $crate::signed::Signed<$ty> {
            const NAME: &'static str = $name;
            const MAX_BYTES: usize = $max;

            fn to_bytes(&self) -> Result<Vec<u8>, $crate::codec::EncodeError> {
                $crate::layouts::encode::<$ty, { $max }>($name, self)
            }

            fn from_bytes(bytes: &[u8]) -> Result<Self, $crate::codec::DecodeError> {
                $crate::layouts::decode::<$ty, { $max }>($name, bytes)
            }
        }
    };
}

pub(crate) use impl_layered_wire;

/// Serde adapters that write and read version-1 layouts inside a version-1 message (a value
/// the layout cannot hold fails to encode: the caller sends the newer message instead).
pub(crate) mod legacy {
    use super::*;

    fn unrepresentable<E: serde::ser::Error>(what: &str) -> E {
        E::custom(format!(
            "this {what} needs a newer protocol version than the peer's"
        ))
    }

    /// One signed value.
    pub(crate) fn serialize<T: Layouts, S: Serializer>(
        value: &Signed<T>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        to_v1(value)
            .ok_or_else(|| unrepresentable(T::NAME))?
            .serialize(serializer)
    }

    /// One signed value.
    pub(crate) fn deserialize<'de, T: Layouts, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Signed<T>, D::Error> {
        Signed::<T::V1>::deserialize(deserializer).map(from_v1)
    }

    /// `None`, or the version-1 layout of the value.
    fn serialize_optional<T: Layouts, S: Serializer>(
        value: Option<&Signed<T>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value
            .map(|v| to_v1(v).ok_or_else(|| unrepresentable(T::NAME)))
            .transpose()?
            .serialize(serializer)
    }

    /// An optional signed value.
    pub(crate) mod option {
        use super::*;

        /// Writes `None` or the value's version-1 layout.
        pub(crate) fn serialize<T: Layouts, S: Serializer>(
            value: &Option<Signed<T>>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            serialize_optional(value.as_ref(), serializer)
        }

        /// Reads `None` or a version-1 layout.
        pub(crate) fn deserialize<'de, T: Layouts, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Signed<T>>, D::Error> {
            Option::<Signed<T::V1>>::deserialize(deserializer).map(|v| v.map(from_v1))
        }
    }

    /// An optional boxed signed value.
    pub(crate) mod option_box {
        use super::*;

        /// Writes `None` or the value's version-1 layout.
        pub(crate) fn serialize<T: Layouts, S: Serializer>(
            value: &Option<Box<Signed<T>>>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            serialize_optional(value.as_deref(), serializer)
        }

        /// Reads `None` or a version-1 layout.
        pub(crate) fn deserialize<'de, T: Layouts, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Box<Signed<T>>>, D::Error> {
            super::option::deserialize(deserializer).map(|v| v.map(Box::new))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Wire;
    use crate::advert::Advert;
    use crate::domain::{DomainManifest, Pricing};
    use crate::payment::{Price, Receipt};
    use crate::test_utils::{key, really_signed, sample_advert, sample_manifest, sample_receipt};

    /// A value the version-1 layout holds is encoded and signed exactly as version 1 did, and
    /// one that needs the new fields round-trips in the new layout; each verifies.
    fn both_layouts<T: Layouts + Clone + PartialEq + std::fmt::Debug>(
        flat: T,
        priced: T,
        signer: &crate::SecretKey,
    ) where
        Signed<T>: Wire,
    {
        let v1 = flat
            .to_v1()
            .expect("the version-1 layout holds a flat value");
        assert!(
            priced.to_v1().is_none(),
            "a priced value needs the new layout"
        );
        let flat = really_signed(flat, signer);
        // The bytes are version 1's: the version-1 layout signed and encoded as it was.
        let old = Signed {
            payload: v1,
            signer: flat.signer,
            signature: flat.signature,
        };
        let old_bytes = encode_unchecked::<_, { 1 << 20 }>("old", &old).unwrap();
        assert_eq!(flat.to_bytes().unwrap(), old_bytes);
        assert_eq!(
            canonical_bytes("old", &old.payload).unwrap(),
            signing_bytes(&flat.payload).unwrap()
        );
        let back = Signed::<T>::from_bytes(&old_bytes).unwrap();
        assert_eq!(back, flat);
        back.verify().unwrap();

        let priced = really_signed(priced, signer);
        let bytes = priced.to_bytes().unwrap();
        assert!(bytes.len() > old_bytes.len());
        let back = Signed::<T>::from_bytes(&bytes).unwrap();
        assert_eq!(back, priced);
        back.verify().unwrap();
        // A truncated or extended message may parse in the other layout (its signer and
        // signature shifted), but then it does not verify.
        let mut longer = bytes.clone();
        longer.push(0);
        for changed in [
            &bytes[..bytes.len() - 1],
            &bytes[..bytes.len() - 2],
            &longer[..],
        ] {
            if let Ok(parsed) = Signed::<T>::from_bytes(changed) {
                assert!(parsed.verify().is_err());
            }
        }
    }

    #[test]
    fn adverts_receipts_and_manifests_keep_version_1_bytes_until_they_need_more() {
        let node = key(1);
        let operator = key(2);
        let manifest = sample_manifest(&operator);
        let domain = manifest.id();

        let flat = sample_advert(&node, domain);
        let mut priced = flat.clone();
        priced.completion_price = flat.prompt_price * 3;
        both_layouts::<Advert>(flat, priced, &node);

        let flat = sample_receipt(&node, key(3).node_id(), domain);
        let mut priced = flat.clone();
        priced.completion_price += 1;
        both_layouts::<Receipt>(flat, priced, &node);

        let mut priced = manifest.clone();
        priced.pricing = Some(Pricing {
            price: Price {
                prompt: 5,
                completion: 20,
            },
            operator_share_bps: 1_000,
        });
        both_layouts::<DomainManifest>(manifest, priced, &operator);
    }

    #[test]
    fn a_signature_over_one_layout_does_not_verify_the_other() {
        let node = key(1);
        let domain = sample_manifest(&key(2)).id();
        let flat = really_signed(sample_advert(&node, domain), &node);
        // Raising the completion price changes the layout and the signed bytes.
        let mut forged = flat.clone();
        forged.payload.completion_price += 1;
        assert!(forged.verify().is_err());
    }
}
