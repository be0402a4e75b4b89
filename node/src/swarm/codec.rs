//! Byte formats of the swarm's protocols, on top of [`gaia_protocol::codec`].
//!
//! - Control RPCs ([`ControlCodec`]): one length-prefixed frame each way, the request at most
//!   [`MAX_CONTROL_REQUEST_BYTES`], the response at most [`MAX_CONTROL_RESPONSE_BYTES`].
//! - Chat streams ([`read_frame`], [`write_frame`]): a sequence of length-prefixed
//!   [`StreamFrame`]s, each at most [`MAX_FRAME`].
//! - Gossip messages are [`gaia_protocol::gossip::GossipMessage`]s (the protocol crate, so
//!   the simulator publishes the same bytes).
//! - Control RPCs speak `/gaia/control/3.0.0` and still answer versions 2 and 1: a response
//!   is written in the layout of the stream's version ([`ControlResponse::for_version`]: what
//!   an older peer could not read is left out or refused with a message) and read back as the
//!   newest ([`ControlResponse::upgrade`]); a request of a newer version never goes over an
//!   older stream.
//! - Chat streams speak `/gaia/stream/2.0.0` and still answer version 1 the same way.
//!
//! Every reader checks the announced length before it allocates, and every value passes the
//! protocol's static checks when decoded; signatures are checked by the caller (membership).

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use gaia_protocol::Wire;
use gaia_protocol::codec::{FRAME_HEADER_LEN, FrameError, MAX_FRAME, encode_frame, frame_len};
use gaia_protocol::control::{
    ControlRequest, ControlResponse, MAX_CONTROL_REQUEST_BYTES, MAX_CONTROL_RESPONSE_BYTES,
};
use gaia_protocol::stream::StreamFrame;
use libp2p::StreamProtocol;

/// The version of the control protocol a stream speaks.
fn control_version(protocol: &StreamProtocol) -> u32 {
    match protocol.as_ref() {
        gaia_protocol::protocols::CONTROL_V1 => 1,
        gaia_protocol::protocols::CONTROL_V2 => 2,
        _ => 3,
    }
}

/// The version of the chat-stream protocol a stream speaks.
pub fn stream_version(protocol: &StreamProtocol) -> u32 {
    match protocol.as_ref() {
        gaia_protocol::protocols::STREAM_V1 => 1,
        gaia_protocol::protocols::STREAM_V2 => 2,
        _ => 3,
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
pub(crate) async fn read_body<R: AsyncRead + Unpin>(
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

/// Reads the next chat-stream frame (a version-1 final frame read as the newer one,
/// [`StreamFrame::upgrade`]); `Ok(None)` when the stream ended cleanly between frames.
///
/// Not cancel-safe: dropping the future mid-frame loses the bytes read so far, so the stream
/// must then be closed (which every caller does on a timeout).
pub async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<Option<StreamFrame>, FrameError> {
    match read_body(io, MAX_FRAME).await? {
        None => Ok(None),
        Some(body) => Ok(Some(StreamFrame::from_bytes(&body)?.upgrade())),
    }
}

/// Writes one chat-stream frame as a stream of protocol `version` carries it
/// ([`StreamFrame::for_version`]) and flushes it; a frame that version has no room for (sources
/// before version 3) is not written.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    frame: &StreamFrame,
    version: u32,
) -> io::Result<()> {
    let older;
    let frame = if version < 3
        && matches!(
            frame,
            StreamFrame::Done { .. } | StreamFrame::DoneV2 { .. } | StreamFrame::Sources { .. }
        ) {
        match frame.clone().for_version(version) {
            Some(frame) => {
                older = frame;
                &older
            }
            None => return Ok(()),
        }
    } else {
        frame
    };
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
        read_value::<ControlResponse, _>(io, MAX_CONTROL_RESPONSE_BYTES)
            .await
            .map(ControlResponse::upgrade)
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
        let version = control_version(protocol);
        let response = response.for_version(version);
        if response.min_version() > version {
            return Err(newer_than("response", response.min_version(), protocol));
        }
        write_value(io, &response).await?;
        io.close().await
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
    use gaia_protocol::domain::DomainId;
    use gaia_protocol::stream::{ErrorCode, RequestId};

    #[test]
    fn previous_version_control_frames_decode() {
        use futures::executor::block_on;
        use libp2p::request_response::Codec as _;
        let v1 = StreamProtocol::new(gaia_protocol::protocols::CONTROL_V1);
        let v2 = StreamProtocol::new(gaia_protocol::protocols::CONTROL_V2);
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

    /// A final frame goes to a version-1 entry node in version 1's layout; one whose receipt
    /// states two prices (which that layout cannot) becomes an error asking it to upgrade.
    #[tokio::test]
    async fn older_entry_nodes_get_final_frames_they_can_read() {
        use gaia_protocol::stream::{FinishReason, Usage};
        let node = gaia_protocol::test_utils::key(1);
        let receipt = |completion_price| {
            let mut receipt = gaia_protocol::test_utils::sample_receipt(
                &node,
                gaia_protocol::test_utils::key(2).node_id(),
                DomainId([1; 32]),
            );
            receipt.completion_price = completion_price;
            gaia_protocol::test_utils::really_signed(receipt, &node)
        };
        let done = |price, cached_tokens| StreamFrame::Done {
            usage: Usage {
                prompt_tokens: 120,
                completion_tokens: 80,
            },
            cached_tokens,
            finish_reason: FinishReason::Stop,
            receipt: Some(receipt(price)),
        };
        for (version, completion_price, kept) in
            [(1, 10, true), (1, 40, false), (2, 40, true), (3, 40, true)]
        {
            // The cached-token count travels on version 3 only (older entry nodes read 0).
            let cached = if version == 3 { 64 } else { 0 };
            let frame = done(completion_price, cached);
            let mut buf = Vec::new();
            write_frame(&mut buf, &frame, version).await.unwrap();
            let got = read_frame(&mut futures::io::Cursor::new(buf.clone()))
                .await
                .unwrap()
                .unwrap();
            if kept {
                assert_eq!(got, frame);
            } else {
                let StreamFrame::Error { message, .. } = got else {
                    panic!("a two-price receipt went over a version-1 stream");
                };
                assert!(message.contains("upgrade"), "{message}");
            }
            // The variant tag: 3 is the final frame as version 1 numbered it, 4 an error, 5
            // the final frame of version 2, 7 that of version 3.
            let tag = match (version, kept) {
                (_, false) => 4,
                (1, true) => 3,
                (2, true) => 5,
                _ => 7,
            };
            assert_eq!(buf[FRAME_HEADER_LEN], tag);
            // A version-3 frame with cached tokens reaches an older entry node without them.
            if version < 3 && kept {
                let mut buf = Vec::new();
                write_frame(&mut buf, &done(completion_price, 64), version)
                    .await
                    .unwrap();
                let got = read_frame(&mut futures::io::Cursor::new(buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(matches!(
                    got,
                    StreamFrame::Done {
                        cached_tokens: 0,
                        ..
                    }
                ));
            }
        }
        // Sources travel on version 3 and are left out before it (an older entry node would
        // not know the frame).
        let sources = StreamFrame::Sources {
            sources: vec![gaia_protocol::stream::Source {
                source: "guide.md".into(),
                title: "Guide".into(),
                heading: Some("Install".into()),
                score: 0.8,
                text: "Run the installer.".into(),
            }],
        };
        for version in [1, 2, 3] {
            let mut buf = Vec::new();
            write_frame(&mut buf, &sources, version).await.unwrap();
            if version < 3 {
                assert!(
                    buf.is_empty(),
                    "sources went over a version-{version} stream"
                );
            } else {
                let got = read_frame(&mut futures::io::Cursor::new(buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(got, sources);
            }
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
        write_frame(&mut buf, &frame, 2).await.unwrap();
        let error = StreamFrame::Error {
            code: ErrorCode::Busy,
            message: "busy".into(),
        };
        write_frame(&mut buf, &error, 2).await.unwrap();
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
