//! The domain's escrow contract (protocol/contracts/GaiaEscrow.sol) over JSON-RPC, with alloy.
//!
//! [`Escrow`] holds a provider that signs with one key (the operator's, a depositor's or a
//! node's); every call checks that the chain answers with the chain id it was given, so a
//! voucher is never signed for one chain and sent to another. Reverts come back decoded into the
//! contract's named errors ("OverBalance(due, balance)"), not as raw bytes.

use alloy::network::{EthereumWallet, ReceiptResponse as _, TransactionBuilder as _};
use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::SolValue as _;
use gaia_protocol::payment::{self, SignedVoucher};
use gaia_protocol::{NodeId, SecretKey};

// The escrow's interface, generated from the ABI that solc-js writes for
// protocol/contracts/GaiaEscrow.sol (tests/run checks that the committed ABI is current).
sol!(
    #[sol(rpc)]
    GaiaEscrow,
    "../protocol/contracts/GaiaEscrow.abi.json"
);

/// The contract's creation code, compiled from protocol/contracts/GaiaEscrow.sol by solc-js
/// 0.8.28 with the optimizer (`npm run build` there; tests/run checks that it is current).
pub const CREATION_CODE_HEX: &str = include_str!("../../../protocol/contracts/GaiaEscrow.bin");

/// The longest a JSON-RPC call may take.
const RPC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The longest to wait for a sent transaction to be mined.
const RECEIPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// What went wrong talking to the chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The RPC URL does not parse.
    #[error("bad RPC URL {url}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The chain answered with another chain id than configured.
    #[error("the chain at {url} has chain id {actual}, not the configured {expected}")]
    WrongChain {
        /// The URL.
        url: String,
        /// Configured.
        expected: u64,
        /// Reported.
        actual: u64,
    },
    /// The contract reverted with one of its errors.
    #[error("the escrow refused: {0}")]
    Refused(String),
    /// No contract code at the address.
    #[error("no contract at {0} on this chain")]
    NoContract(NodeId),
    /// The transaction was mined but failed.
    #[error("transaction {0} failed on chain")]
    Failed(String),
    /// Transport, JSON-RPC or decoding trouble.
    #[error("JSON-RPC: {0}")]
    Rpc(String),
}

/// The outcome of one transaction.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Its hash (0x…).
    pub hash: String,
    /// Gas it used.
    pub gas_used: u64,
}

/// An account's funds in the escrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Deposited and not paid out.
    pub balance: u128,
    /// Who gets the remainder back.
    pub refund_to: NodeId,
    /// When it expires (unix seconds).
    pub expires_at: u64,
}

/// One escrow contract on one chain, reached with one signing key.
pub struct Escrow {
    provider: DynProvider,
    url: String,
    chain_id: u64,
    contract: Address,
    signer: NodeId,
}

impl Escrow {
    /// Connects to the chain at `url` (checking its chain id) to use the escrow at `contract`,
    /// signing transactions with `key`.
    pub async fn connect(
        url: &str,
        chain_id: u64,
        contract: NodeId,
        key: &SecretKey,
    ) -> Result<Self, ChainError> {
        let provider = provider(url, chain_id, key).await?;
        let escrow = Self {
            provider,
            url: url.to_string(),
            chain_id,
            contract: address(contract),
            signer: key.node_id(),
        };
        let code = escrow
            .provider
            .get_code_at(escrow.contract)
            .await
            .map_err(rpc)?;
        if code.is_empty() {
            return Err(ChainError::NoContract(contract));
        }
        Ok(escrow)
    }

    /// Deploys a new escrow from `key` (the operator: it registers payees and receives
    /// `share_bps` / 10 000 of every payout); accounts stay open `lock_seconds` after a deposit.
    pub async fn deploy(
        url: &str,
        chain_id: u64,
        key: &SecretKey,
        share_bps: u16,
        lock_seconds: u64,
    ) -> Result<(Self, Sent), ChainError> {
        if share_bps > 10_000 {
            return Err(ChainError::Refused(format!(
                "an operator share of {share_bps} basis points is above 100 %"
            )));
        }
        let provider = provider(url, chain_id, key).await?;
        let mut code = hex::decode(CREATION_CODE_HEX.trim())
            .map_err(|e| ChainError::Rpc(format!("the compiled contract is not hex: {e}")))?;
        code.extend_from_slice(&(share_bps, lock_seconds).abi_encode_params());
        let request = TransactionRequest::default()
            .with_from(address(key.node_id()))
            .with_deploy_code(Bytes::from(code));
        let estimate = provider
            .estimate_gas(request.clone())
            .await
            .map_err(|e| ChainError::Rpc(e.to_string()))?;
        let request = request.with_gas_limit(with_margin(estimate));
        let pending = provider
            .send_transaction(request)
            .await
            .map_err(|e| ChainError::Rpc(e.to_string()))?;
        let (sent, contract) = mined(pending).await?;
        let contract = contract.ok_or_else(|| ChainError::Failed(sent.hash.clone()))?;
        let escrow = Self {
            provider,
            url: url.to_string(),
            chain_id,
            contract,
            signer: key.node_id(),
        };
        Ok((escrow, sent))
    }

    /// The chain and contract, as the vouchers' EIP-712 domain.
    pub fn domain(&self) -> payment::Escrow {
        payment::Escrow {
            chain_id: self.chain_id,
            contract: node_id(self.contract),
        }
    }

    /// The address transactions are signed by.
    pub fn signer(&self) -> NodeId {
        self.signer
    }

    /// The RPC URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn contract(&self) -> GaiaEscrow::GaiaEscrowInstance<&DynProvider> {
        GaiaEscrow::new(self.contract, &self.provider)
    }

    /// Deposits `amount` (smallest unit) for `payer`.
    pub async fn deposit(&self, payer: NodeId, amount: u128) -> Result<Sent, ChainError> {
        let contract = self.contract();
        let call = contract.deposit(address(payer)).value(U256::from(amount));
        send(call).await
    }

    /// Admits (or removes) `payee` for payment (the operator only).
    pub async fn set_payee(&self, payee: NodeId, allowed: bool) -> Result<Sent, ChainError> {
        send(self.contract().setPayee(address(payee), allowed)).await
    }

    /// Redeems a voucher; it must verify for this chain and contract first.
    pub async fn redeem(&self, voucher: &SignedVoucher) -> Result<Sent, ChainError> {
        voucher
            .verify(&self.domain())
            .map_err(|e| ChainError::Refused(format!("not submitted: {e}")))?;
        self.submit_unchecked(voucher).await
    }

    /// Redeems a voucher's channel up to `up_to` in all (below the voucher's amount when the
    /// account cannot cover all of it); it must verify for this chain and contract first.
    pub async fn redeem_part(
        &self,
        voucher: &SignedVoucher,
        up_to: u128,
    ) -> Result<Sent, ChainError> {
        voucher
            .verify(&self.domain())
            .map_err(|e| ChainError::Refused(format!("not submitted: {e}")))?;
        let contract = self.contract();
        let call = contract.redeemPart(
            sol_voucher(&voucher.voucher),
            Bytes::copy_from_slice(&voucher.signature.0),
            U256::from(up_to),
        );
        send(call).await
    }

    /// Submits a voucher without checking it here first: the contract checks it anyway (this is
    /// how the tests show that it does).
    pub async fn submit_unchecked(&self, voucher: &SignedVoucher) -> Result<Sent, ChainError> {
        let contract = self.contract();
        let call = contract.redeem(
            sol_voucher(&voucher.voucher),
            Bytes::copy_from_slice(&voucher.signature.0),
        );
        send(call).await
    }

    /// Returns an expired account's remainder to its depositor.
    pub async fn refund(&self, payer: NodeId) -> Result<Sent, ChainError> {
        send(self.contract().refund(address(payer))).await
    }

    /// Sends the signer what it has been paid.
    pub async fn withdraw(&self) -> Result<Sent, ChainError> {
        send(self.contract().withdraw()).await
    }

    /// `payer`'s account.
    pub async fn account(&self, payer: NodeId) -> Result<Account, ChainError> {
        let a = self
            .contract()
            .accounts(address(payer))
            .call()
            .await
            .map_err(refused)?;
        Ok(Account {
            balance: to_u128(a.balance)?,
            refund_to: node_id(a.refundTo),
            expires_at: a.expiresAt,
        })
    }

    /// What the channel (`payee`, `entry`) has been paid out of `payer`'s account so far (the
    /// cumulative amount of its last redeemed voucher).
    pub async fn redeemed(
        &self,
        payer: NodeId,
        payee: NodeId,
        entry: NodeId,
    ) -> Result<u128, ChainError> {
        let value = self
            .contract()
            .redeemed(address(payer), address(payee), address(entry))
            .call()
            .await
            .map_err(refused)?;
        to_u128(value)
    }

    /// The escrow's operator and the share of every payout it takes, in basis points (both
    /// fixed when it was deployed).
    pub async fn terms(&self) -> Result<(NodeId, u16), ChainError> {
        let contract = self.contract();
        let operator = contract.operator().call().await.map_err(refused)?;
        let share = contract.operatorShareBps().call().await.map_err(refused)?;
        Ok((node_id(operator), share))
    }

    /// Paid to `who` and not yet withdrawn.
    pub async fn withdrawable(&self, who: NodeId) -> Result<u128, ChainError> {
        let value = self
            .contract()
            .withdrawable(address(who))
            .call()
            .await
            .map_err(refused)?;
        to_u128(value)
    }

    /// Whether `payee` may be paid.
    pub async fn is_payee(&self, payee: NodeId) -> Result<bool, ChainError> {
        self.contract()
            .payees(address(payee))
            .call()
            .await
            .map_err(refused)
    }

    /// The digest the contract computes for `voucher` (to check ours against it).
    pub async fn voucher_digest(&self, voucher: &payment::Voucher) -> Result<[u8; 32], ChainError> {
        let digest = self
            .contract()
            .voucherDigest(sol_voucher(voucher))
            .call()
            .await
            .map_err(refused)?;
        Ok(digest.0)
    }

    /// The native balance of `who` (smallest unit).
    pub async fn balance_of(&self, who: NodeId) -> Result<u128, ChainError> {
        let value = self.provider.get_balance(address(who)).await.map_err(rpc)?;
        to_u128(value)
    }
}

async fn provider(url: &str, chain_id: u64, key: &SecretKey) -> Result<DynProvider, ChainError> {
    let parsed = url
        .parse::<alloy::transports::http::reqwest::Url>()
        .map_err(|e| ChainError::BadUrl {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    let signer = PrivateKeySigner::from_slice(key.to_bytes().as_slice())
        .map_err(|e| ChainError::Rpc(format!("the key cannot sign: {e}")))?;
    // An idle connection is dropped before the server would drop it (Node.js servers, such as
    // ganache and hardhat, close after 5 s): a request on a connection the server is closing
    // fails with "error sending request", and a read of an account would be a spurious 503.
    let http = alloy::transports::http::reqwest::Client::builder()
        .timeout(RPC_TIMEOUT)
        .pool_idle_timeout(std::time::Duration::from_secs(2))
        .build()
        .map_err(rpc)?;
    // The nonce is read from the chain for every transaction: alloy's default cache reserves
    // one before the transaction is known to go through, so one refused voucher (its gas
    // estimate reverts) would leave a gap and every later transaction of the node stuck.
    let provider = ProviderBuilder::new()
        .disable_recommended_fillers()
        .with_gas_estimation()
        .with_simple_nonce_management()
        .with_chain_id(chain_id)
        .wallet(EthereumWallet::from(signer))
        .connect_reqwest(http, parsed)
        .erased();
    let actual = provider.get_chain_id().await.map_err(rpc)?;
    if actual != chain_id {
        return Err(ChainError::WrongChain {
            url: url.to_string(),
            expected: chain_id,
            actual,
        });
    }
    Ok(provider)
}

/// Sends a contract call and waits for it to be mined; a revert comes back as the contract's
/// named error.
async fn send<P, D>(call: alloy::contract::CallBuilder<P, D>) -> Result<Sent, ChainError>
where
    P: Provider,
    D: alloy::contract::CallDecoder,
{
    // The gas limit is the node's estimate plus a margin: an estimate that is exact to the unit
    // can still run out (an SSTORE needs more than 2 300 gas left, EIP-2200; ganache's
    // estimator does not allow for it, and a second deposit into an account failed so).
    let estimate = call.estimate_gas().await.map_err(refused)?;
    let call = call.gas(with_margin(estimate));
    let pending = call.send().await.map_err(refused)?;
    Ok(mined(pending).await?.0)
}

/// A gas limit of `estimate` plus a fifth and 10 000 (what is not used is not paid).
fn with_margin(estimate: u64) -> u64 {
    estimate.saturating_add(estimate / 5).saturating_add(10_000)
}

/// Waits (a bounded time) for a sent transaction to be mined; it must have succeeded. Returns
/// it and the address of the contract it created, if any.
async fn mined(
    pending: alloy::providers::PendingTransactionBuilder<alloy::network::Ethereum>,
) -> Result<(Sent, Option<Address>), ChainError> {
    let receipt = pending
        .with_timeout(Some(RECEIPT_TIMEOUT))
        .get_receipt()
        .await
        .map_err(rpc)?;
    let hash = receipt.transaction_hash().to_string();
    if !receipt.status() {
        return Err(ChainError::Failed(hash));
    }
    let sent = Sent {
        hash,
        gas_used: receipt.gas_used(),
    };
    Ok((sent, receipt.contract_address()))
}

fn refused(error: alloy::contract::Error) -> ChainError {
    if let Some(decoded) = error.as_decoded_interface_error::<GaiaEscrow::GaiaEscrowErrors>() {
        return ChainError::Refused(describe(&decoded));
    }
    if error.as_revert_data().is_some() {
        return ChainError::Refused(error.to_string());
    }
    rpc(error)
}

fn describe(error: &GaiaEscrow::GaiaEscrowErrors) -> String {
    use GaiaEscrow::GaiaEscrowErrors as E;
    match error {
        E::NotOperator(_) => "only the operator may do that".into(),
        E::ZeroDeposit(_) => "a deposit must be above zero".into(),
        E::NotAPayee(e) => format!("{} is not a registered payee", node_id(e.payee)),
        E::VoucherExpired(e) => format!("expired at {}", e.expiresAt),
        E::BadSignature(_) => "the voucher is not signed by its payer".into(),
        E::NotNewer(e) => format!(
            "the voucher's cumulative amount {} is not above the {} already redeemed (a replay)",
            e.cumulativeAmount, e.alreadyRedeemed
        ),
        E::OverBalance(e) => format!(
            "the voucher asks {} more than the account holds ({}): redeem part of it",
            e.due, e.balance
        ),
        E::OverVoucher(e) => format!(
            "cannot redeem up to {}, above the voucher's {}",
            e.upTo, e.cumulativeAmount
        ),
        E::NotExpired(e) => format!("the account is open until {}", e.expiresAt),
        E::NothingToPay(_) => "nothing to pay".into(),
        E::TransferFailed(_) => "the transfer failed".into(),
    }
}

/// The error and its causes ("error sending request …: connection refused").
fn rpc(error: impl std::error::Error) -> ChainError {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    ChainError::Rpc(text)
}

fn to_u128(value: U256) -> Result<u128, ChainError> {
    u128::try_from(value).map_err(|_| ChainError::Rpc(format!("{value} does not fit in 128 bits")))
}

fn sol_voucher(v: &payment::Voucher) -> GaiaEscrow::Voucher {
    GaiaEscrow::Voucher {
        payer: address(v.payer),
        payee: address(v.payee),
        entry: address(v.entry),
        cumulativeAmount: U256::from(v.cumulative_amount),
        expiresAt: v.expires_at,
    }
}

fn address(node: NodeId) -> Address {
    Address::from(node.0)
}

fn node_id(address: Address) -> NodeId {
    NodeId(address.into_array())
}
