//! Builders and proptest strategies for tests in this and other crates (feature `test-utils`).

use proptest::collection::vec;
use proptest::prelude::*;

use crate::advert::{Advert, Capabilities, Load};
use crate::control::{ControlRequest, ControlResponse, MemberEntry};
use crate::domain::{
    Admission, DomainId, DomainManifest, MembershipCertificate, Pricing, Requirements, Revocation,
};
use crate::hash::ContentHash;
use crate::identity::{NodeId, SecretKey};
use crate::payment::{Price, Receipt, SignedVoucher, Voucher};
use crate::signature::Signature;
use crate::signed::{Signable, Signed};
use crate::stream::{ErrorCode, FinishReason, RequestId, Resume, StreamFrame, TopLogprob, Usage};

/// A deterministic key for `seed`: the scalar `[seed; 32]` with its top byte capped at 0x7f
/// (so it is always below the curve order) and seed 0 read as 1.
pub fn key(seed: u8) -> SecretKey {
    let mut bytes = [seed.max(1); 32];
    bytes[0] = bytes[0].min(0x7f);
    match SecretKey::from_bytes(&bytes) {
        Ok(key) => key,
        Err(err) => unreachable!("a non-zero scalar below 2^255 is a valid key: {err}"),
    }
}

/// A plausible manifest run by `operator`, open admission.
pub fn sample_manifest(operator: &SecretKey) -> DomainManifest {
    DomainManifest {
        name: "rust-tutor".into(),
        topic: "/gaia/domain/rust-tutor/adverts".into(),
        operator: operator.node_id(),
        requirements: Requirements {
            accepted_model_hashes: vec![ContentHash::of(b"model")],
            kb_hash: Some(ContentHash::of(b"kb")),
            prompt_hash: None,
        },
        bootstrap: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        admission: Admission::Open,
        created_at: 1_700_000_000,
        version: 1,
        pricing: None,
    }
}

/// A plausible advert of `node` in `domain`, meeting [`sample_manifest`]'s requirements.
pub fn sample_advert(node: &SecretKey, domain: DomainId) -> Advert {
    Advert {
        node: node.node_id(),
        domain,
        seq: 1,
        model_name: "SmolLM2-135M-Instruct".into(),
        model_hash: ContentHash::of(b"model"),
        kb_hash: Some(ContentHash::of(b"kb")),
        prompt_hash: None,
        capabilities: Capabilities {
            tools: true,
            structured_output: true,
            context_length: 8192,
            max_tokens: 2048,
        },
        load: Load {
            in_flight: 1,
            queued: 0,
            tokens_per_s: 95.5,
        },
        prompt_price: 10,
        addrs: vec!["/ip4/127.0.0.1/tcp/4002".into()],
        sent_at: 1_700_000_100,
        leaving: false,
        completion_price: 10,
    }
}

/// A certificate for `member` valid from `issued_at` for a day.
pub fn sample_certificate(
    domain: DomainId,
    member: NodeId,
    issued_at: u64,
) -> MembershipCertificate {
    MembershipCertificate {
        domain,
        member,
        issued_at,
        expires_at: issued_at + 86_400,
        serial: 1,
    }
}

/// A receipt of `node` serving `client`.
pub fn sample_receipt(node: &SecretKey, client: NodeId, domain: DomainId) -> Receipt {
    Receipt {
        request_id: RequestId([9; 16]),
        domain,
        node: node.node_id(),
        client,
        model_hash: ContentHash::of(b"model"),
        prompt_tokens: 120,
        completion_tokens: 80,
        prompt_price: 10,
        timestamp: 1_700_000_200,
        completion_price: 10,
    }
}

/// Any node address.
pub fn arb_node_id() -> impl Strategy<Value = NodeId> {
    any::<[u8; 20]>().prop_map(NodeId)
}

/// Any content hash.
pub fn arb_hash() -> impl Strategy<Value = ContentHash> {
    any::<[u8; 32]>().prop_map(ContentHash)
}

/// Any domain id.
pub fn arb_domain_id() -> impl Strategy<Value = DomainId> {
    any::<[u8; 32]>().prop_map(DomainId)
}

/// Any 65 bytes as a signature (not a valid one: for codec tests).
pub fn arb_signature() -> impl Strategy<Value = Signature> {
    vec(any::<u8>(), 65).prop_map(|bytes| {
        let mut out = [0u8; 65];
        out.copy_from_slice(&bytes);
        Signature(out)
    })
}

/// Any request id.
pub fn arb_request_id() -> impl Strategy<Value = RequestId> {
    any::<[u8; 16]>().prop_map(RequestId)
}

/// Text of `min..=max` characters, any Unicode except control characters.
pub fn arb_text(min: usize, max: usize) -> impl Strategy<Value = String> {
    vec(
        any::<char>().prop_filter("no control characters", |c| !c.is_control()),
        min..=max,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn arb_multiaddr() -> impl Strategy<Value = String> {
    (any::<[u8; 4]>(), any::<u16>())
        .prop_map(|(ip, port)| format!("/ip4/{}.{}.{}.{}/tcp/{port}", ip[0], ip[1], ip[2], ip[3]))
}

fn arb_log_prob() -> impl Strategy<Value = f32> {
    (-1000.0f32..=0.0).prop_map(|v| if v == 0.0 { 0.0 } else { v })
}

/// Any valid manifest.
pub fn arb_manifest() -> impl Strategy<Value = DomainManifest> {
    let admission = prop_oneof![
        Just(Admission::Open),
        vec(arb_node_id(), 0..8).prop_map(Admission::AllowList),
        vec(arb_node_id(), 0..8).prop_map(Admission::DenyList),
    ];
    let pricing = proptest::option::of((arb_price(), 0u16..=10_000).prop_map(
        |(price, operator_share_bps)| Pricing {
            price,
            operator_share_bps,
        },
    ));
    (
        (
            arb_text(1, 16),
            arb_text(1, 30),
            arb_node_id(),
            vec(arb_hash(), 1..4),
            proptest::option::of(arb_hash()),
            proptest::option::of(arb_hash()),
            vec(arb_multiaddr(), 0..4),
            admission,
            any::<u64>(),
            any::<u64>(),
        ),
        pricing,
    )
        .prop_map(
            |(
                (
                    name,
                    topic,
                    operator,
                    models,
                    kb_hash,
                    prompt_hash,
                    bootstrap,
                    admission,
                    created_at,
                    version,
                ),
                pricing,
            )| {
                DomainManifest {
                    pricing,
                    name,
                    topic,
                    operator,
                    requirements: Requirements {
                        accepted_model_hashes: models,
                        kb_hash,
                        prompt_hash,
                    },
                    bootstrap,
                    admission,
                    created_at,
                    version,
                }
            },
        )
}

/// Any valid certificate.
pub fn arb_certificate() -> impl Strategy<Value = MembershipCertificate> {
    (
        arb_domain_id(),
        arb_node_id(),
        0..u64::MAX,
        1..=u64::MAX,
        any::<u64>(),
    )
        .prop_map(
            |(domain, member, issued_at, span, serial)| MembershipCertificate {
                domain,
                member,
                issued_at,
                expires_at: issued_at.saturating_add(span),
                serial,
            },
        )
}

/// Any revocation.
pub fn arb_revocation() -> impl Strategy<Value = Revocation> {
    (arb_domain_id(), arb_node_id(), any::<u64>(), any::<u64>()).prop_map(
        |(domain, member, serial, revoked_at)| Revocation {
            domain,
            member,
            serial,
            revoked_at,
        },
    )
}

/// Any valid advert.
pub fn arb_advert() -> impl Strategy<Value = Advert> {
    let capabilities = (any::<bool>(), any::<bool>(), 1..=u32::MAX, any::<u32>()).prop_map(
        |(tools, structured_output, context_length, max_tokens)| Capabilities {
            tools,
            structured_output,
            context_length,
            max_tokens,
        },
    );
    let load = (any::<u32>(), any::<u32>(), 0.0f32..1.0e6).prop_map(
        |(in_flight, queued, tokens_per_s)| Load {
            in_flight,
            queued,
            tokens_per_s,
        },
    );
    (
        (
            arb_node_id(),
            arb_domain_id(),
            any::<u64>(),
            arb_text(1, 40),
            arb_hash(),
        ),
        (
            proptest::option::of(arb_hash()),
            proptest::option::of(arb_hash()),
        ),
        (
            capabilities,
            load,
            arb_price(),
            vec(arb_multiaddr(), 0..4),
            any::<u64>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (node, domain, seq, model_name, model_hash),
                (kb_hash, prompt_hash),
                (capabilities, load, price, addrs, sent_at, leaving),
            )| Advert {
                node,
                domain,
                seq,
                model_name,
                model_hash,
                kb_hash,
                prompt_hash,
                capabilities,
                load,
                prompt_price: price.prompt,
                addrs,
                sent_at,
                leaving,
                completion_price: price.completion,
            },
        )
}

/// Any prices: flat (what protocol version 1 states) or not.
pub fn arb_price() -> impl Strategy<Value = Price> {
    prop_oneof![
        any::<u64>().prop_map(Price::flat),
        (any::<u64>(), any::<u64>()).prop_map(|(prompt, completion)| Price { prompt, completion }),
    ]
}

/// Any receipt.
pub fn arb_receipt() -> impl Strategy<Value = Receipt> {
    (
        (
            arb_request_id(),
            arb_domain_id(),
            arb_node_id(),
            arb_node_id(),
            arb_hash(),
        ),
        (any::<u64>(), any::<u64>(), arb_price(), any::<u64>()),
    )
        .prop_map(
            |(
                (request_id, domain, node, client, model_hash),
                (prompt_tokens, completion_tokens, price, timestamp),
            )| {
                Receipt {
                    request_id,
                    domain,
                    node,
                    client,
                    model_hash,
                    prompt_tokens,
                    completion_tokens,
                    prompt_price: price.prompt,
                    timestamp,
                    completion_price: price.completion,
                }
            },
        )
}

/// Any voucher (not necessarily signed by its payer).
pub fn arb_voucher() -> impl Strategy<Value = SignedVoucher> {
    (
        (arb_node_id(), arb_node_id(), arb_node_id()),
        any::<u128>(),
        any::<u64>(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        any::<u8>(),
    )
        .prop_map(
            |((payer, payee, entry), cumulative_amount, expires_at, r, s, v)| {
                let mut signature = [0u8; 65];
                signature[..32].copy_from_slice(&r);
                signature[32..64].copy_from_slice(&s);
                signature[64] = v;
                SignedVoucher {
                    voucher: Voucher {
                        payer,
                        payee,
                        entry,
                        cumulative_amount,
                        expires_at,
                    },
                    signature: Signature(signature),
                }
            },
        )
}

/// `payload` in an envelope with any signer and any 65 signature bytes (not a valid signature:
/// for codec tests).
pub fn arb_signed<T: std::fmt::Debug + Clone>(
    payload: impl Strategy<Value = T>,
) -> impl Strategy<Value = Signed<T>> {
    (payload, arb_node_id(), arb_signature()).prop_map(|(payload, signer, signature)| Signed {
        payload,
        signer,
        signature,
    })
}

/// `payload` signed by `signer`; panics if it cannot be (a test helper).
pub fn really_signed<T: Signable>(payload: T, signer: &SecretKey) -> Signed<T> {
    match Signed::sign(payload, signer) {
        Ok(signed) => signed,
        Err(err) => panic!("signing a valid payload failed: {err}"),
    }
}

/// Any valid stream frame.
pub fn arb_stream_frame() -> impl Strategy<Value = StreamFrame> {
    let resume = proptest::option::of(
        (arb_text(0, 64), any::<u32>())
            .prop_map(|(text, tokens_sent)| Resume { text, tokens_sent }),
    );
    let top = vec(
        (arb_text(0, 8), arb_log_prob()).prop_map(|(text, logprob)| TopLogprob { text, logprob }),
        0..5,
    );
    let finish = prop_oneof![
        Just(FinishReason::Stop),
        Just(FinishReason::Length),
        Just(FinishReason::ToolCalls),
        Just(FinishReason::ContentFilter),
    ];
    prop_oneof![
        (
            arb_request_id(),
            arb_text(1, 200),
            resume,
            proptest::option::of(arb_signed(arb_certificate()))
        )
            .prop_map(
                |(id, body_json, resume, certificate)| StreamFrame::Request {
                    id,
                    body_json,
                    resume,
                    certificate,
                }
            ),
        (
            arb_text(0, 16),
            any::<u32>(),
            proptest::option::of(arb_log_prob()),
            top
        )
            .prop_map(|(text, index, logprob, top_logprobs)| StreamFrame::Token {
                text,
                index,
                logprob,
                top_logprobs,
            }),
        (
            any::<u32>(),
            arb_text(1, 20),
            arb_text(1, 20),
            arb_text(0, 100)
        )
            .prop_map(|(index, id, name, arguments)| StreamFrame::ToolCall {
                index,
                id,
                name,
                arguments,
            }),
        (
            any::<u32>(),
            any::<u32>(),
            finish,
            proptest::option::of(arb_signed(arb_receipt()))
        )
            .prop_map(
                |(prompt_tokens, completion_tokens, finish_reason, receipt)| {
                    StreamFrame::Done {
                        usage: Usage {
                            prompt_tokens,
                            completion_tokens,
                        },
                        cached_tokens: prompt_tokens / 2,
                        finish_reason,
                        receipt,
                    }
                }
            ),
        (arb_error_code(), arb_text(0, 100))
            .prop_map(|(code, message)| StreamFrame::Error { code, message }),
    ]
}

fn arb_error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::Busy),
        Just(ErrorCode::NotServed),
        Just(ErrorCode::Unauthorized),
        Just(ErrorCode::TooLarge),
        Just(ErrorCode::Internal),
        Just(ErrorCode::ShuttingDown),
    ]
}

/// Any control request.
pub fn arb_control_request() -> impl Strategy<Value = ControlRequest> {
    prop_oneof![
        (arb_domain_id(), proptest::option::of(arb_node_id()))
            .prop_map(|(domain, after)| ControlRequest::MemberSnapshot { domain, after }),
        Just(ControlRequest::Ping),
    ]
}

/// Any valid control response.
pub fn arb_control_response() -> impl Strategy<Value = ControlResponse> {
    let entry = (
        arb_signed(arb_advert()),
        proptest::option::of(arb_signed(arb_certificate())),
    )
        .prop_map(|(advert, certificate)| MemberEntry {
            advert: advert.into(),
            certificate: certificate.map(Into::into),
        });
    prop_oneof![
        (
            arb_domain_id(),
            vec(entry, 0..4),
            proptest::option::of(arb_node_id())
        )
            .prop_map(|(domain, members, next)| ControlResponse::Members {
                domain,
                members,
                next
            }),
        Just(ControlResponse::Pong),
        (arb_error_code(), arb_text(0, 100))
            .prop_map(|(code, message)| ControlResponse::Error { code, message }),
    ]
}
