//! Byte formats of the swarm's protocols, on top of [`gaia_protocol::codec`].
//!
//! - Control RPCs ([`ControlCodec`]): one length-prefixed frame each way, the request at most
//!   [`MAX_CONTROL_REQUEST_BYTES`], the response at most [`MAX_CONTROL_RESPONSE_BYTES`].
//! - Chat streams ([`read_frame`], [`write_frame`]): a sequence of length-prefixed
//!   [`StreamFrame`]s, each at most [`MAX_FRAME`].
//! - Gossip ([`GossipMessage`]): adverts with the publisher's certificate, certificates,
//!   revocations and manifests, each at most [`MAX_GOSSIP_BYTES`]. A message of a kind this
//!   build does not know ([`GossipDecodeError::UnknownKind`]) comes from a newer node: it is
//!   ignored with a log line, not held against the peer.
//! - Control RPCs speak `/gaia/control/2.0.0` and still answer `/gaia/control/1.0.0`; a
//!   request or response of version 2 is never written on a version-1 stream.
//!
//! Every reader checks the announced length before it allocates, and every value passes the
//! protocol's static checks when decoded; signatures are checked by the caller (membership).

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use gaia_protocol::Wire;
use gaia_protocol::advert::{Advert, MAX_ADVERT_BYTES};
use gaia_protocol::codec::{FRAME_HEADER_LEN, FrameError, MAX_FRAME, encode_frame, frame_len};
use gaia_protocol::control::{
    ControlRequest, ControlResponse, MAX_CONTROL_REQUEST_BYTES, MAX_CONTROL_RESPONSE_BYTES,
    MemberEntry,
};
use gaia_protocol::domain::{
    DomainManifest, MAX_CERTIFICATE_BYTES, MAX_MANIFEST_BYTES, MembershipCertificate, Revocation,
};
use gaia_protocol::stream::StreamFrame;
use gaia_protocol::{Signed, codec::DecodeError};
use libp2p::StreamProtocol;

/// The largest gossip message: a tag and a manifest (an advert with its certificate is
/// smaller).
pub const MAX_GOSSIP_BYTES: usize = 1 + MAX_MANIFEST_BYTES;
const _: () = assert!(1 + 2 + MAX_ADVERT_BYTES + MAX_CERTIFICATE_BYTES <= MAX_GOSSIP_BYTES);

/// The version of the control protocol a stream speaks.
fn control_version(protocol: &StreamProtocol) -> u32 {
    if protocol.as_ref() == gaia_protocol::protocols::CONTROL_V1 {
        1
    } else {
        2
    }
}

fn newer_than(what: &str, version: u32, protocol: &StreamProtocol) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("a {what} of control protocol version {version} cannot go over {protocol}"),
    )
}

/// Reads one frame body of at most `limit` bytes; `Ok(None)` on a clean end of stream before
/// the first header byte.
async fn read_body<R: AsyncRead + Unpin>(
    io: &mut R,
    limit: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut have = 0;
    while have < FRAME_HEADER_LEN {
        let n = io
            .read(&mut header[have..])
            .await
            .map_err(|_| FrameError::Truncated {
                have,
                need: FRAME_HEADER_LEN,
            })?;
        if n == 0 {
            if have == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated {
                have,
                need: FRAME_HEADER_LEN,
            });
        }
        have += n;
    }
    let len = frame_len(header, limit)?;
    let mut body = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = io
            .read(&mut body[filled..])
            .await
            .map_err(|_| FrameError::Truncated {
                have: FRAME_HEADER_LEN + filled,
                need: FRAME_HEADER_LEN + len,
            })?;
        if n == 0 {
            return Err(FrameError::Truncated {
                have: FRAME_HEADER_LEN + filled,
                need: FRAME_HEADER_LEN + len,
            });
        }
        filled += n;
    }
    Ok(Some(body))
}

/// Reads the next chat-stream frame; `Ok(None)` when the stream ended cleanly between frames.
///
/// Not cancel-safe: dropping the future mid-frame loses the bytes read so far, so the stream
/// must then be closed (which every caller does on a timeout).
pub async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<Option<StreamFrame>, FrameError> {
    match read_body(io, MAX_FRAME).await? {
        None => Ok(None),
        Some(body) => Ok(Some(StreamFrame::from_bytes(&body)?)),
    }
}

/// Writes one chat-stream frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(io: &mut W, frame: &StreamFrame) -> io::Result<()> {
    let bytes = encode_frame(frame).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(&bytes).await?;
    io.flush().await
}

fn invalid_data(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err)
}

/// Reads one framed value of type `T` (at most `limit` bytes); a missing frame is an error.
async fn read_value<T: Wire, R: AsyncRead + Unpin>(io: &mut R, limit: usize) -> io::Result<T> {
    let body = read_body(io, limit)
        .await
        .map_err(invalid_data)?
        .ok_or_else(|| invalid_data(format!("stream ended before the {}", T::NAME)))?;
    T::from_bytes(&body).map_err(invalid_data)
}

async fn write_value<T: Wire, W: AsyncWrite + Unpin>(io: &mut W, value: &T) -> io::Result<()> {
    let bytes = encode_frame(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(&bytes).await?;
    io.flush().await
}

/// The request-response codec of the control protocol ([`gaia_protocol::protocols::CONTROL`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct ControlCodec;

impl libp2p::request_response::Codec for ControlCodec {
    type Protocol = StreamProtocol;
    type Request = ControlRequest;
    type Response = ControlResponse;

    async fn read_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Self::Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let request: ControlRequest = read_value(io, MAX_CONTROL_REQUEST_BYTES).await?;
        if request.min_version() > control_version(protocol) {
            return Err(invalid_data(format!(
                "a control request of version {} arrived over {protocol}",
                request.min_version()
            )));
        }
        Ok(request)
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Self::Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_value(io, MAX_CONTROL_RESPONSE_BYTES).await
    }

    async fn write_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        request: Self::Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        if request.min_version() > control_version(protocol) {
            return Err(newer_than("request", request.min_version(), protocol));
        }
        write_value(io, &request).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        response: Self::Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        if response.min_version() > control_version(protocol) {
            return Err(newer_than("response", response.min_version(), protocol));
        }
        write_value(io, &response).await?;
        io.close().await
    }
}

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

impl GossipMessage {
    /// The message's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, gaia_protocol::codec::EncodeError> {
        let mut out = Vec::new();
        match self {
            GossipMessage::Advert(entry) => {
                let advert = entry.advert.to_bytes()?;
                // An advert is below MAX_ADVERT_BYTES < 2^16, which `to_bytes` enforces.
                let len = u16::try_from(advert.len()).map_err(|_| {
                    gaia_protocol::codec::EncodeError::TooLarge {
                        what: "signed advert",
                        size: advert.len(),
                        limit: MAX_ADVERT_BYTES,
                    }
                })?;
                out.push(TAG_ADVERT);
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
                out.push(TAG_MANIFEST);
                out.extend_from_slice(&manifest.to_bytes()?);
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
            TAG_ADVERT => {
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
                    advert,
                    certificate,
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
            TAG_MANIFEST => Ok(GossipMessage::Manifest(
                Signed::<DomainManifest>::from_bytes(rest)?,
            )),
            // Kinds reserved for later versions: a newer node's message, not an attack.
            other @ 5..=15 => Err(GossipDecodeError::UnknownKind(other)),
            _ => Err(GossipDecodeError::Malformed("unknown message kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ControlRequest::Ping` as a version-1 node frames it.
    const V1_PING: &[u8] = &[0, 0, 0, 1, 1];
    /// `ControlRequest::MemberSnapshot { domain: [7; 32], after: None }` from a version-1 node.
    const V1_SNAPSHOT: &[u8] = &[
        0, 0, 0, 34, 0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
        7, 7, 7, 7, 7, 7, 7, 0,
    ];
    use crate::swarm::test_support::{advert, certificate, key, revocation};
    use gaia_protocol::domain::DomainId;
    use gaia_protocol::stream::{ErrorCode, RequestId};

    #[test]
    fn gossip_messages_round_trip() {
        let node = key(3);
        let operator = key(1);
        let domain = DomainId([7; 32]);
        let cert = certificate(&operator, domain, node.node_id(), 1);
        let messages = [
            GossipMessage::Advert(MemberEntry {
                advert: advert(&node, domain, 1),
                certificate: None,
            }),
            GossipMessage::Advert(MemberEntry {
                advert: advert(&node, domain, 2),
                certificate: Some(cert.clone()),
            }),
            GossipMessage::Certificate {
                certificate: cert,
                sent_at: 42,
            },
            GossipMessage::Revocation(revocation(&operator, domain, node.node_id(), 1)),
            GossipMessage::Manifest(
                Signed::sign(
                    gaia_protocol::test_utils::sample_manifest(&operator),
                    &operator,
                )
                .unwrap(),
            ),
        ];
        for message in messages {
            let bytes = message.encode().unwrap();
            assert!(bytes.len() <= MAX_GOSSIP_BYTES);
            assert_eq!(GossipMessage::decode(&bytes).unwrap(), message);
        }
    }

    /// Frames exactly as a version-1 node writes them (pinned bytes, not re-encoded here):
    /// they decode on a version-1 stream and on a version-2 one, and a version-2 request on a
    /// version-1 stream is refused as such (a clear error, not garbage).
    #[test]
    fn previous_version_control_frames_decode() {
        use futures::executor::block_on;
        use libp2p::request_response::Codec as _;
        let v1 = StreamProtocol::new(gaia_protocol::protocols::CONTROL_V1);
        let v2 = StreamProtocol::new(gaia_protocol::protocols::CONTROL);
        let domain = DomainId([7; 32]);
        // Ping, and MemberSnapshot { domain: [7; 32], after: None }, as version 1 framed them.
        let ping: Vec<u8> = V1_PING.to_vec();
        let snapshot: Vec<u8> = V1_SNAPSHOT.to_vec();
        for protocol in [&v1, &v2] {
            let mut codec = ControlCodec;
            let got = block_on(codec.read_request(protocol, &mut &ping[..])).unwrap();
            assert_eq!(got, ControlRequest::Ping);
            let got = block_on(codec.read_request(protocol, &mut &snapshot[..])).unwrap();
            assert_eq!(
                got,
                ControlRequest::MemberSnapshot {
                    domain,
                    after: None
                }
            );
        }
        // The encoder still writes those very bytes.
        let mut out = Vec::new();
        block_on(ControlCodec.write_request(
            &v1,
            &mut futures::io::Cursor::new(&mut out),
            ControlRequest::Ping,
        ))
        .unwrap();
        assert_eq!(out, ping);
        // A version-2 request cannot go over version 1, either way.
        let state = ControlRequest::DomainState {
            domain,
            after: None,
        };
        let mut out = Vec::new();
        let err = block_on(ControlCodec.write_request(
            &v1,
            &mut futures::io::Cursor::new(&mut out),
            state.clone(),
        ))
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert!(err.to_string().contains("version 2"), "{err}");
        let mut frame = Vec::new();
        block_on(ControlCodec.write_request(&v2, &mut futures::io::Cursor::new(&mut frame), state))
            .unwrap();
        let err = block_on(ControlCodec.read_request(&v1, &mut &frame[..])).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn malformed_gossip_is_an_error_not_a_panic() {
        let node = key(3);
        let good = GossipMessage::Advert(MemberEntry {
            advert: advert(&node, DomainId([7; 32]), 1),
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

    #[tokio::test]
    async fn frames_round_trip_and_bad_frames_fail() {
        let frame = StreamFrame::Request {
            id: RequestId([1; 16]),
            body_json: "{}".into(),
            resume: None,
            certificate: None,
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &frame).await.unwrap();
        let error = StreamFrame::Error {
            code: ErrorCode::Busy,
            message: "busy".into(),
        };
        write_frame(&mut buf, &error).await.unwrap();
        let mut reader = futures::io::Cursor::new(buf.clone());
        assert_eq!(read_frame(&mut reader).await.unwrap(), Some(frame));
        assert_eq!(read_frame(&mut reader).await.unwrap(), Some(error));
        assert_eq!(read_frame(&mut reader).await.unwrap(), None);

        // Truncated inside the header and inside the body.
        let mut reader = futures::io::Cursor::new(buf[..2].to_vec());
        assert!(read_frame(&mut reader).await.is_err());
        let mut reader = futures::io::Cursor::new(buf[..7].to_vec());
        assert!(read_frame(&mut reader).await.is_err());
        // Oversized announcement: refused before allocating.
        let mut reader = futures::io::Cursor::new(u32::MAX.to_be_bytes().to_vec());
        assert!(matches!(
            read_frame(&mut reader).await,
            Err(FrameError::TooLarge { .. })
        ));
        // Zero length and garbage bodies.
        let mut reader = futures::io::Cursor::new(vec![0, 0, 0, 0]);
        assert!(read_frame(&mut reader).await.is_err());
        let mut reader = futures::io::Cursor::new(vec![0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(read_frame(&mut reader).await.is_err());

        // Random bytes, with a plausible small length in front half of the time: an error or
        // a valid frame, never a panic.
        let mut seed = 0x9e37_79b9_u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        for i in 0..2_000 {
            let len = next() % 300;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 && bytes.len() >= 4 {
                let body = (bytes.len() - 4) as u32;
                bytes[..4].copy_from_slice(&body.to_be_bytes());
            }
            let mut reader = futures::io::Cursor::new(bytes);
            while let Ok(Some(_)) = read_frame(&mut reader).await {}
        }
    }
}
