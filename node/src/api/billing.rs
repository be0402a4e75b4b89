//! Paid access on the HTTP API: who is calling ([`Caller`], set by the auth middleware), the
//! tab a paid generation opens before it runs ([`open_tab`]), and `GET /v1/balance`.
//!
//! With `[payments]` on, a bearer key starting `gaia-sk-` is an access key: generation routes
//! debit its escrow account ([`crate::pay::accounts`]) and answer 402 (OpenAI's error body,
//! type and code `insufficient_quota`) when what is left cannot cover a request. A key from
//! `server.api_keys` is the operator's and pays nothing; without either, generation routes
//! answer 401. Without `[payments]` nothing here applies.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use gaia_protocol::SecretKey;
use serde_json::json;

use super::error::ApiError;
use crate::agent::Shared;
use crate::agent::types::GenSettings;
use crate::config::Config;
use crate::pay::accounts::{PayError, Tab};

/// Who sent a request, as the auth middleware found out.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No key, on a node whose API is open.
    Anonymous,
    /// A key from `server.api_keys`.
    Operator,
    /// An access key (with `[payments]` on).
    Paying(SecretKey),
}

impl From<PayError> for ApiError {
    fn from(error: PayError) -> ApiError {
        match error {
            PayError::NoAccount { .. }
            | PayError::Expired { .. }
            | PayError::Insufficient { .. } => ApiError {
                code: Some("insufficient_quota"),
                ..ApiError::new(
                    StatusCode::PAYMENT_REQUIRED,
                    "insufficient_quota",
                    error.to_string(),
                )
            },
            PayError::Chain(_) | PayError::WrongEscrow(_) => ApiError {
                code: Some("payment_chain_unavailable"),
                ..ApiError::unavailable(error.to_string())
            },
            PayError::Book(_) => ApiError::internal(error.to_string()),
        }
    }
}

impl ApiError {
    /// 401 for a malformed access key.
    pub fn bad_access_key(why: &str) -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                format!(
                    "the access key is malformed ({why}): send the gaia-sk-… key `gaia pay deposit` printed"
                ),
            )
        }
    }

    /// 401 for a generation without a key on a node that charges.
    pub fn payment_key_needed() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "this node charges for generation: send `Authorization: Bearer gaia-sk-…` with an \
                 access key from `gaia pay deposit`",
            )
        }
    }
}

/// The tab of a generation of at most `tokens` (prompt, completion) tokens: `None` when nobody
/// pays (no `[payments]`, or the operator's key); 401 without a key, 402 when the account
/// cannot cover it, 503 when the chain cannot be asked (or is not the domain's escrow).
pub async fn open_tab(
    st: &Shared,
    caller: &Caller,
    (prompt, completion): (u64, u64),
) -> Result<Option<Tab>, ApiError> {
    let Some(payments) = &st.payments else {
        return Ok(None);
    };
    match caller {
        Caller::Operator => Ok(None),
        Caller::Anonymous => Err(ApiError::payment_key_needed()),
        Caller::Paying(key) => Ok(Some(
            payments.open_tab(key.clone(), prompt, completion).await?,
        )),
    }
}

/// What a generation is expected to use at most, reserved before it runs, as (prompt,
/// completion) tokens: half a token per byte of its body (tokenizers average three to four
/// bytes a token) and an allowance for the system prompt, the chat template and retrieved
/// context; `max_tokens` for each choice. A round that turns out larger is still debited in
/// full: what one request can overspend is its cost beyond this reservation (ARCHITECTURE.md
/// states the bound).
pub(crate) fn token_bound(
    body_bytes: usize,
    settings: &GenSettings,
    config: &Config,
) -> (u64, u64) {
    const ALLOWANCE: u64 = 256;
    let max_tokens = settings.max_tokens.unwrap_or(config.server.max_tokens) as u64;
    (
        (body_bytes as u64).div_ceil(2).saturating_add(ALLOWANCE),
        max_tokens.saturating_mul(settings.n as u64),
    )
}

/// The payments part of `/v1/info`: this node's price, and with `[payments]` on its escrow
/// and what its voucher book holds (amounts in wei, as decimal strings).
pub fn info(st: &crate::agent::AppState) -> serde_json::Value {
    let config = &st.config.payments;
    let Some(payments) = &st.payments else {
        return json!({"enabled": false, "price": config.prices()});
    };
    let vouchers = payments.book().latest();
    let debited: u128 = vouchers
        .iter()
        .fold(0, |sum, v| sum.saturating_add(v.voucher.cumulative_amount));
    let payers: std::collections::BTreeSet<_> = vouchers.iter().map(|v| v.voucher.payer).collect();
    json!({
        "enabled": true,
        "price": config.prices(),
        "max_price": payments.max_price(),
        "domain_pricing": payments.domain_pricing().map(|p| json!({
            "price": p.price,
            "operator_share_bps": p.operator_share_bps,
        })),
        "chain_id": payments.escrow().chain_id,
        "escrow": payments.escrow().contract.to_string(),
        "settle_secs": config.settle_secs,
        "paying_accounts": payers.len(),
        "debited": debited.to_string(),
    })
}

/// `GET /v1/balance`: what the calling access key's account has (amounts in wei, as decimal
/// strings: they pass 2^53).
pub async fn balance(
    State(st): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let Some(payments) = &st.payments else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "this node takes no payments ([payments] rpc_url is not set)",
        )
        .into_response();
    };
    let Caller::Paying(key) = caller else {
        return ApiError::payment_key_needed().into_response();
    };
    match payments.balance(key.node_id()).await {
        Ok(b) => axum::Json(json!({
            "object": "balance",
            "account": b.account.to_string(),
            "escrow": payments.escrow().contract.to_string(),
            "chain_id": payments.escrow().chain_id,
            "escrow_balance": b.escrow_balance.to_string(),
            "spent_here": b.spent.to_string(),
            "spent_elsewhere": b.spent_elsewhere.to_string(),
            "reserved": b.reserved.to_string(),
            "remaining": b.remaining.to_string(),
            "expires_at": b.expires_at,
            "max_price": payments.max_price(),
        }))
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
