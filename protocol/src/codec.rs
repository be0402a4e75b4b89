//! Bounded binary encoding of wire values, and the length-prefixed frame codec for streams.
//!
//! Every wire type implements [`Wire`]: bincode 2 (standard configuration: little-endian,
//! variable-length integers) with a per-type byte limit that bincode enforces while decoding,
//! so a hostile length prefix inside a message can never make the decoder allocate past the
//! limit. A message must be consumed exactly: trailing bytes are an error. Values are checked
//! with [`Validate`] before encoding and after decoding.
//!
//! On streams, each message travels in a frame: a big-endian `u32` body length, then the body.
//! [`FrameDecoder`] checks the announced length against the frame limit before it allocates
//! anything, and consumes only the bytes of the frame it is reading.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::validate::{Validate, ValidationError};

/// The largest frame body on a stream: 1 MiB.
pub const MAX_FRAME: usize = 1 << 20;

/// The bytes of a frame header (the big-endian `u32` body length).
pub const FRAME_HEADER_LEN: usize = 4;

/// A value could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The value breaks a protocol rule.
    #[error("cannot encode {what}: {source}")]
    Invalid {
        /// The type being encoded.
        what: &'static str,
        /// The rule it breaks.
        source: ValidationError,
    },
    /// The encoding is larger than the protocol allows for this type.
    #[error(
        "cannot encode {what}: {size} bytes is above the limit of {limit} bytes; make it smaller"
    )]
    TooLarge {
        /// The type being encoded.
        what: &'static str,
        /// Its encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// bincode failed.
    #[error("cannot encode {what}: {source}")]
    Bincode {
        /// The type being encoded.
        what: &'static str,
        /// The bincode error.
        source: bincode::error::EncodeError,
    },
}

/// Bytes could not be decoded into a value.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// More bytes than the protocol allows for this type.
    #[error("{what} of {size} bytes is above the limit of {limit} bytes")]
    TooLarge {
        /// The type being decoded.
        what: &'static str,
        /// The size received.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The bytes are not an encoding of this type (or claim more memory than the limit).
    #[error("malformed {what}: {source}")]
    Malformed {
        /// The type being decoded.
        what: &'static str,
        /// The bincode error.
        source: bincode::error::DecodeError,
    },
    /// The value ended before the bytes did.
    #[error("malformed {what}: {extra} trailing bytes after the value")]
    TrailingBytes {
        /// The type being decoded.
        what: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
    /// The value decoded but breaks a protocol rule.
    #[error("invalid {what}: {source}")]
    Invalid {
        /// The type being decoded.
        what: &'static str,
        /// The rule it breaks.
        source: ValidationError,
    },
}

/// A value that travels between nodes.
///
/// Implemented for every wire type of this crate; the byte limit is part of the protocol.
pub trait Wire: Sized + Serialize + DeserializeOwned + Validate {
    /// A human name of the type for error messages, e.g. `"signed advert"`.
    const NAME: &'static str;
    /// The largest encoding allowed, in bytes.
    const MAX_BYTES: usize;

    /// Validates and encodes the value; fails if the encoding is above [`Wire::MAX_BYTES`].
    fn to_bytes(&self) -> Result<Vec<u8>, EncodeError>;

    /// Decodes exactly one value from `bytes` and validates it. Never allocates more than about
    /// [`Wire::MAX_BYTES`], whatever the bytes claim.
    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError>;
}

/// Implements [`Wire`] for a type with a given name and byte limit.
macro_rules! impl_wire {
    ($ty:ty, $name:literal, $max:expr) => {
        impl $crate::codec::Wire for $ty {
            const NAME: &'static str = $name;
            const MAX_BYTES: usize = $max;

            fn to_bytes(&self) -> Result<Vec<u8>, $crate::codec::EncodeError> {
                $crate::codec::encode_limited::<Self, { $max }>(self)
            }

            fn from_bytes(bytes: &[u8]) -> Result<Self, $crate::codec::DecodeError> {
                $crate::codec::decode_limited::<Self, { $max }>(bytes)
            }
        }
    };
}

pub(crate) use impl_wire;

/// The canonical bincode encoding without a limit: what signatures are computed over.
pub(crate) fn canonical_bytes<T: Serialize + ?Sized>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, EncodeError> {
    // Signed payloads are a few hundred bytes: one allocation instead of a growing vector
    // (this runs for every signature a node checks).
    let mut bytes = Vec::with_capacity(512);
    bincode::serde::encode_into_std_write(value, &mut bytes, bincode::config::standard())
        .map_err(|source| EncodeError::Bincode { what, source })?;
    Ok(bytes)
}

pub(crate) fn encode_limited<T: Wire, const N: usize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    value.validate().map_err(|source| EncodeError::Invalid {
        what: T::NAME,
        source,
    })?;
    encode_unchecked::<T, N>(T::NAME, value)
}

/// Encodes `value` within `N` bytes without validating it (the caller has).
pub(crate) fn encode_unchecked<V: Serialize + DeserializeOwned, const N: usize>(
    what: &'static str,
    value: &V,
) -> Result<Vec<u8>, EncodeError> {
    let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard().with_limit::<N>())
        .map_err(|source| EncodeError::Bincode { what, source })?;
    if bytes.len() > N {
        return Err(EncodeError::TooLarge {
            what,
            size: bytes.len(),
            limit: N,
        });
    }
    let check: Result<(V, usize), _> =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard().with_limit::<N>());
    if let Err(bincode::error::DecodeError::LimitExceeded) = check {
        return Err(EncodeError::TooLarge {
            what,
            size: bytes.len(),
            limit: N,
        });
    }
    Ok(bytes)
}

pub(crate) fn decode_limited<T: Wire, const N: usize>(bytes: &[u8]) -> Result<T, DecodeError> {
    let value: T = decode_unchecked::<T, N>(T::NAME, bytes)?;
    value.validate().map_err(|source| DecodeError::Invalid {
        what: T::NAME,
        source,
    })?;
    Ok(value)
}

/// Decodes exactly one value of at most `N` bytes, without validating it.
pub(crate) fn decode_unchecked<V: DeserializeOwned, const N: usize>(
    what: &'static str,
    bytes: &[u8],
) -> Result<V, DecodeError> {
    if bytes.len() > N {
        return Err(DecodeError::TooLarge {
            what,
            size: bytes.len(),
            limit: N,
        });
    }
    let (value, used): (V, usize) =
        bincode::serde::decode_from_slice(bytes, bincode::config::standard().with_limit::<N>())
            .map_err(|source| DecodeError::Malformed { what, source })?;
    if used != bytes.len() {
        return Err(DecodeError::TrailingBytes {
            what,
            extra: bytes.len() - used,
        });
    }
    Ok(value)
}

/// A frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header announced an empty body.
    #[error("peer sent a frame with a zero length: protocol violation, close the stream")]
    Empty,
    /// The header announced a body above the limit.
    #[error("peer announced a frame of {len} bytes, above the limit of {limit}: close the stream")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame: {have} of {need} bytes received")]
    Truncated {
        /// Bytes of the frame (header included) received.
        have: usize,
        /// Bytes the frame needed (header included, or just the header if it was incomplete).
        need: usize,
    },
    /// The body is not a valid message.
    #[error("bad frame body: {0}")]
    Decode(#[from] DecodeError),
    /// The decoder failed earlier and the stream is unusable.
    #[error("frame decoder already failed on this stream: close it")]
    Failed,
}

/// Encodes `value` as one frame: big-endian `u32` length, then the body.
pub fn encode_frame<T: Wire>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let body = value.to_bytes()?;
    if body.len() > MAX_FRAME {
        return Err(EncodeError::TooLarge {
            what: T::NAME,
            size: body.len(),
            limit: MAX_FRAME,
        });
    }
    let len = u32::try_from(body.len()).map_err(|_| EncodeError::TooLarge {
        what: T::NAME,
        size: body.len(),
        limit: MAX_FRAME,
    })?;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks a frame header against `max_frame` and returns the body length. For readers that
/// read the header and then `read_exact` the body themselves.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN], max_frame: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    match usize::try_from(len) {
        Ok(len) if len <= max_frame => Ok(len),
        _ => Err(FrameError::TooLarge {
            len: u64::from(len),
            limit: max_frame,
        }),
    }
}

/// Reassembles frames from the bytes of a stream, in chunks of any size.
///
/// It takes from the input only the bytes of the frame it is reading, so its memory is bounded
/// by one frame (header plus at most `max_frame` body bytes), and it checks the announced
/// length before allocating the body. After an error it stays failed: close the stream.
///
/// ```
/// use gaia_protocol::codec::{encode_frame, FrameDecoder};
/// use gaia_protocol::control::ControlRequest;
///
/// let mut bytes = encode_frame(&ControlRequest::Ping).unwrap();
/// bytes.extend(encode_frame(&ControlRequest::Ping).unwrap());
/// let mut decoder = FrameDecoder::new();
/// let mut input = &bytes[..];
/// let mut frames = Vec::new();
/// while let Some(frame) = decoder.decode::<ControlRequest>(&mut input).unwrap() {
///     frames.push(frame);
/// }
/// assert_eq!(frames, [ControlRequest::Ping, ControlRequest::Ping]);
/// decoder.finish().unwrap();
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    body: Option<(usize, Vec<u8>)>,
    failed: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder with the protocol's frame limit, [`MAX_FRAME`].
    pub fn new() -> Self {
        Self::with_max_frame(MAX_FRAME)
    }

    /// A decoder with a smaller frame limit (a larger one is clamped to [`MAX_FRAME`]).
    pub fn with_max_frame(max_frame: usize) -> Self {
        Self {
            max_frame: max_frame.min(MAX_FRAME),
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            body: None,
            failed: false,
        }
    }

    /// Takes bytes from the front of `input` and returns the next complete frame body, or
    /// `None` once `input` is used up without completing one.
    pub fn decode_raw(&mut self, input: &mut &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
        if self.failed {
            return Err(FrameError::Failed);
        }
        loop {
            if let Some((len, body)) = &mut self.body {
                let take = (*len - body.len()).min(input.len());
                body.extend_from_slice(&input[..take]);
                *input = &input[take..];
                if body.len() < *len {
                    return Ok(None);
                }
                let (_, body) = self.body.take().unwrap_or_default();
                self.header_len = 0;
                return Ok(Some(body));
            }
            if input.is_empty() {
                return Ok(None);
            }
            let take = (FRAME_HEADER_LEN - self.header_len).min(input.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
            self.header_len += take;
            *input = &input[take..];
            if self.header_len < FRAME_HEADER_LEN {
                return Ok(None);
            }
            match frame_len(self.header, self.max_frame) {
                Ok(len) => self.body = Some((len, Vec::with_capacity(len))),
                Err(err) => {
                    self.failed = true;
                    return Err(err);
                }
            }
        }
    }

    /// Like [`FrameDecoder::decode_raw`], then decodes the body as a `T`.
    pub fn decode<T: Wire>(&mut self, input: &mut &[u8]) -> Result<Option<T>, FrameError> {
        match self.decode_raw(input)? {
            None => Ok(None),
            Some(body) => match T::from_bytes(&body) {
                Ok(value) => Ok(Some(value)),
                Err(err) => {
                    self.failed = true;
                    Err(err.into())
                }
            },
        }
    }

    /// True when no partial frame is buffered (the stream may end cleanly here).
    pub fn is_idle(&self) -> bool {
        !self.failed && self.header_len == 0 && self.body.is_none()
    }

    /// Call when the stream ends: fails if it ended inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.failed {
            return Err(FrameError::Failed);
        }
        match &self.body {
            Some((len, body)) => Err(FrameError::Truncated {
                have: FRAME_HEADER_LEN + body.len(),
                need: FRAME_HEADER_LEN + len,
            }),
            None if self.header_len > 0 => Err(FrameError::Truncated {
                have: self.header_len,
                need: FRAME_HEADER_LEN,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ControlRequest;
    use crate::stream::{ErrorCode, StreamFrame};

    fn token(i: u32) -> StreamFrame {
        StreamFrame::Token {
            text: format!("tok{i}"),
            index: i,
            logprob: Some(-0.25),
            top_logprobs: Vec::new(),
        }
    }

    #[test]
    fn frames_reassemble_from_any_chunking() {
        let frames: Vec<StreamFrame> = (0..20).map(token).collect();
        let mut wire = Vec::new();
        for frame in &frames {
            wire.extend(encode_frame(frame).unwrap());
        }
        for chunk in [1usize, 2, 3, 4, 5, 7, 64, wire.len()] {
            let mut decoder = FrameDecoder::new();
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                let mut input = piece;
                while let Some(frame) = decoder.decode::<StreamFrame>(&mut input).unwrap() {
                    out.push(frame);
                }
                assert!(input.is_empty());
            }
            assert_eq!(out, frames, "chunk size {chunk}");
            assert!(decoder.is_idle());
            decoder.finish().unwrap();
        }
    }

    #[test]
    fn decoder_takes_only_its_frame() {
        let mut wire = encode_frame(&ControlRequest::Ping).unwrap();
        wire.extend_from_slice(b"rest");
        let mut decoder = FrameDecoder::new();
        let mut input = &wire[..];
        let frame = decoder.decode_raw(&mut input).unwrap().unwrap();
        assert_eq!(
            ControlRequest::from_bytes(&frame).unwrap(),
            ControlRequest::Ping
        );
        assert_eq!(input, b"rest");
    }

    #[test]
    fn zero_and_oversize_lengths_are_rejected_before_allocating() {
        let mut decoder = FrameDecoder::new();
        let mut input = &[0u8, 0, 0, 0][..];
        assert!(matches!(
            decoder.decode_raw(&mut input),
            Err(FrameError::Empty)
        ));
        // The decoder stays failed.
        assert!(matches!(
            decoder.decode_raw(&mut &[1u8][..]),
            Err(FrameError::Failed)
        ));

        let mut decoder = FrameDecoder::new();
        let too_big = u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes();
        assert!(matches!(
            decoder.decode_raw(&mut &too_big[..]),
            Err(FrameError::TooLarge { len, limit: MAX_FRAME }) if len == MAX_FRAME as u64 + 1
        ));
        let mut decoder = FrameDecoder::with_max_frame(16);
        assert!(matches!(
            decoder.decode_raw(&mut &[0u8, 0, 0, 17][..]),
            Err(FrameError::TooLarge { len: 17, limit: 16 })
        ));
        assert!(matches!(
            decoder.decode_raw(&mut &[0xffu8, 0xff, 0xff, 0xff][..]),
            Err(FrameError::Failed)
        ));
    }

    #[test]
    fn truncated_streams_and_trailing_garbage_are_errors() {
        let wire = encode_frame(&token(1)).unwrap();
        let mut decoder = FrameDecoder::new();
        let mut input = &wire[..wire.len() - 1];
        assert!(decoder.decode::<StreamFrame>(&mut input).unwrap().is_none());
        assert!(!decoder.is_idle());
        assert!(matches!(
            decoder.finish(),
            Err(FrameError::Truncated { have, need }) if have + 1 == need
        ));
        let mut decoder = FrameDecoder::new();
        decoder.decode_raw(&mut &wire[..2]).unwrap();
        assert!(matches!(
            decoder.finish(),
            Err(FrameError::Truncated { have: 2, need: 4 })
        ));

        // A frame whose body has a byte more than the message.
        let body = token(1).to_bytes().unwrap();
        let mut framed = u32::try_from(body.len() + 1)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        framed.extend_from_slice(&body);
        framed.push(0);
        let mut decoder = FrameDecoder::new();
        assert!(matches!(
            decoder.decode::<StreamFrame>(&mut &framed[..]),
            Err(FrameError::Decode(DecodeError::TrailingBytes {
                extra: 1,
                ..
            }))
        ));
    }

    #[test]
    fn invalid_values_are_refused_both_ways() {
        let bad = StreamFrame::Token {
            text: "x".into(),
            index: 0,
            logprob: Some(f32::NAN),
            top_logprobs: Vec::new(),
        };
        assert!(matches!(bad.to_bytes(), Err(EncodeError::Invalid { .. })));
        // Encode it anyway, bypassing validation, and check the decoder refuses it.
        let raw = canonical_bytes("frame", &bad).unwrap();
        let err = StreamFrame::from_bytes(&raw).unwrap_err();
        assert!(matches!(err, DecodeError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("token.logprob"), "{err}");

        let long = StreamFrame::Error {
            code: ErrorCode::Internal,
            message: "x".repeat(crate::stream::MAX_ERROR_MESSAGE + 1),
        };
        assert!(matches!(long.to_bytes(), Err(EncodeError::Invalid { .. })));
    }

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        let bytes = vec![0u8; crate::control::MAX_CONTROL_REQUEST_BYTES + 1];
        assert!(matches!(
            ControlRequest::from_bytes(&bytes),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn hostile_length_prefixes_fail_without_huge_allocations() {
        // A StreamFrame::Request whose body_json claims u64::MAX bytes.
        let mut bytes = vec![0u8]; // variant 0 = Request
        bytes.extend_from_slice(&[7u8; 16]); // id
        bytes.push(0xfd); // varint tag: u64 follows
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            StreamFrame::from_bytes(&bytes),
            Err(DecodeError::Malformed { .. })
        ));
    }
}
