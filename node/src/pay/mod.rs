//! `gaia pay ...`: the domain's escrow contract on an EVM chain.
//!
//! The operator deploys the escrow (protocol/contracts/GaiaEscrow.sol) and registers the nodes
//! it pays; users deposit for an access key, which signs cumulative EIP-712 vouchers
//! ([`gaia_protocol::payment::Voucher`]) that the paid nodes redeem; the operator's share and
//! the nodes' payouts are withdrawn, and an expired account's remainder refunded. Every
//! command takes the chain from `--rpc-url`, `--chain-id` and `--contract` (or
//! `GAIA_PAY_RPC_URL`, `GAIA_PAY_CHAIN_ID`, `GAIA_PAY_CONTRACT`) and signs transactions with the
//! node key (or `--key`), and prints the gas each transaction used.

pub mod accounts;
pub mod chain;
pub mod ledger;
pub mod log;
pub mod vouchers;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use gaia_protocol::payment::{SignedVoucher, Voucher};
use gaia_protocol::{NodeId, SecretKey, Wire};

pub use chain::{ChainError, Escrow};

use crate::domain_cli::{KeyArgs, load_key};

/// The prefix of an access key (an API key backed by an escrow account).
pub const ACCESS_KEY_PREFIX: &str = "gaia-sk-";

/// `gaia pay ...`
#[derive(Debug, Subcommand)]
pub enum PayCommand {
    /// Deploy a new escrow for a domain; the signing key becomes its operator.
    Deploy(DeployArgs),
    /// Admit (or with --remove, drop) a node for payment (the operator only).
    Payee(PayeeArgs),
    /// Deposit for an access key: a new one (written to <data_dir>/access-keys/ and printed as
    /// an API key) or an existing account's address.
    Deposit(DepositArgs),
    /// Show an account: its balance, expiry and depositor.
    Account(AccountArgs),
    /// Sign a voucher with an access key (what the domain's nodes do for each payee).
    Voucher(VoucherArgs),
    /// Redeem voucher files on chain (anyone may submit; the money goes to the payee).
    Redeem(RedeemArgs),
    /// Redeem the latest vouchers this node signed for its paying clients (its voucher book,
    /// <data_dir>/payments/) that pay more than the escrow has paid; the signing key pays the
    /// gas. Safe while the node runs.
    Settle(ChainOnly),
    /// Withdraw what the signing key has been paid.
    Withdraw(ChainOnly),
    /// Return an expired account's remainder to its depositor.
    Refund(RefundArgs),
}

/// The chain and the escrow on it.
#[derive(Debug, Args)]
pub struct ChainArgs {
    /// The chain's JSON-RPC endpoint.
    #[arg(long, env = "GAIA_PAY_RPC_URL", value_name = "URL")]
    pub rpc_url: String,
    /// The chain id the endpoint must report (vouchers are bound to it).
    #[arg(long, env = "GAIA_PAY_CHAIN_ID")]
    pub chain_id: u64,
}

/// The chain, the escrow's address and the signing key.
#[derive(Debug, Args)]
pub struct ChainOnly {
    /// The chain.
    #[command(flatten)]
    pub chain: ChainArgs,
    /// The escrow contract's address.
    #[arg(long, env = "GAIA_PAY_CONTRACT", value_name = "ADDRESS")]
    pub contract: String,
    /// The key that signs transactions and pays their gas.
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `gaia pay deploy`
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The chain.
    #[command(flatten)]
    pub chain: ChainArgs,
    /// The operator's share of every payout, in basis points (1/10 000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(0..=10_000))]
    pub share_bps: u16,
    /// How long a deposit keeps an account open, in seconds.
    #[arg(long, default_value_t = 30 * 86_400)]
    pub lock_seconds: u64,
    /// The operator key (pays for the deployment).
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `gaia pay payee`
#[derive(Debug, Args)]
pub struct PayeeArgs {
    /// The node's address (0x…).
    pub address: String,
    /// Remove it instead.
    #[arg(long)]
    pub remove: bool,
    /// Chain, contract and the operator key.
    #[command(flatten)]
    pub on: ChainOnly,
}

/// `gaia pay deposit`
#[derive(Debug, Args)]
pub struct DepositArgs {
    /// How much, in the chain's smallest unit (wei).
    #[arg(long)]
    pub amount: u128,
    /// Deposit for this account instead of a new access key.
    #[arg(long, value_name = "ADDRESS")]
    pub account: Option<String>,
    /// Chain, contract and the paying key.
    #[command(flatten)]
    pub on: ChainOnly,
}

/// `gaia pay account`
#[derive(Debug, Args)]
pub struct AccountArgs {
    /// The account's address.
    pub address: String,
    /// Chain, contract (and a key to query with).
    #[command(flatten)]
    pub on: ChainOnly,
}

/// `gaia pay voucher`
#[derive(Debug, Args)]
pub struct VoucherArgs {
    /// The access key's file (as `gaia pay deposit` wrote it) or the API key itself.
    #[arg(long, value_name = "FILE|KEY")]
    pub access_key: String,
    /// The node being paid.
    #[arg(long, value_name = "ADDRESS")]
    pub payee: String,
    /// The entry node whose channel the voucher counts on [default: the payee].
    #[arg(long, value_name = "ADDRESS")]
    pub entry: Option<String>,
    /// The total owed to it so far (smallest unit).
    #[arg(long)]
    pub cumulative: u128,
    /// When it stops being redeemable (unix seconds) [default: a day from now].
    #[arg(long)]
    pub expires_at: Option<u64>,
    /// Where to write it.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The chain id it is bound to.
    #[arg(long, env = "GAIA_PAY_CHAIN_ID")]
    pub chain_id: u64,
    /// The escrow's address it is bound to.
    #[arg(long, env = "GAIA_PAY_CONTRACT", value_name = "ADDRESS")]
    pub contract: String,
}

/// `gaia pay redeem`
#[derive(Debug, Args)]
pub struct RedeemArgs {
    /// Voucher files.
    #[arg(required = true)]
    pub vouchers: Vec<PathBuf>,
    /// Chain, contract and the key that pays the gas.
    #[command(flatten)]
    pub on: ChainOnly,
}

/// `gaia pay refund`
#[derive(Debug, Args)]
pub struct RefundArgs {
    /// The expired account's address.
    pub address: String,
    /// Chain, contract and the key that pays the gas.
    #[command(flatten)]
    pub on: ChainOnly,
}

/// Runs a `gaia pay` command.
pub fn run(data_dir: &Path, command: PayCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_async(data_dir, command))
}

async fn run_async(data_dir: &Path, command: PayCommand) -> anyhow::Result<()> {
    match command {
        PayCommand::Deploy(args) => {
            let key = load_key(data_dir, &args.key)?;
            let (escrow, sent) = Escrow::deploy(
                &args.chain.rpc_url,
                args.chain.chain_id,
                &key,
                args.share_bps,
                args.lock_seconds,
            )
            .await?;
            println!("contract {}", escrow.domain().contract);
            println!("operator {}", key.node_id());
            print_sent("deploy", &sent);
        }
        PayCommand::Payee(args) => {
            let payee = parse_address(&args.address)?;
            let escrow = connect(data_dir, &args.on).await?;
            let sent = escrow.set_payee(payee, !args.remove).await?;
            println!(
                "payee {payee} {}",
                if args.remove { "removed" } else { "added" }
            );
            print_sent("setPayee", &sent);
        }
        PayCommand::Deposit(args) => {
            if args.amount == 0 {
                // Refused before an access key is made for a deposit the contract would refuse.
                bail!("a deposit must be above zero");
            }
            let escrow = connect(data_dir, &args.on).await?;
            let account = match &args.account {
                Some(address) => parse_address(address)?,
                None => {
                    let key = SecretKey::generate();
                    let path = save_access_key(data_dir, &key)?;
                    println!("api key {}", access_key_text(&key));
                    println!("saved {}", path.display());
                    key.node_id()
                }
            };
            let sent = escrow.deposit(account, args.amount).await?;
            let state = escrow.account(account).await?;
            println!("account {account}");
            println!("balance {}", state.balance);
            println!("expires_at {}", state.expires_at);
            print_sent("deposit", &sent);
        }
        PayCommand::Account(args) => {
            let account = parse_address(&args.address)?;
            let escrow = connect(data_dir, &args.on).await?;
            let state = escrow.account(account).await?;
            println!("account {account}");
            println!("balance {}", state.balance);
            println!("expires_at {}", state.expires_at);
            println!("refund_to {}", state.refund_to);
        }
        PayCommand::Voucher(args) => {
            let key = read_access_key(&args.access_key)?;
            let escrow = gaia_protocol::payment::Escrow {
                chain_id: args.chain_id,
                contract: parse_address(&args.contract)?,
            };
            let expires_at = args.expires_at.unwrap_or_else(|| unix_now() + 86_400);
            let payee = parse_address(&args.payee)?;
            let voucher = Voucher {
                payer: key.node_id(),
                payee,
                entry: args.entry.as_deref().map_or(Ok(payee), parse_address)?,
                cumulative_amount: args.cumulative,
                expires_at,
            }
            .sign(&escrow, &key)?;
            let bytes = voucher.to_bytes()?;
            std::fs::write(&args.out, bytes)
                .with_context(|| format!("cannot write {}", args.out.display()))?;
            println!("voucher {}", args.out.display());
        }
        PayCommand::Redeem(args) => {
            let escrow = connect(data_dir, &args.on).await?;
            let mut failed = 0;
            for path in &args.vouchers {
                let outcome = async {
                    let bytes = std::fs::read(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    let voucher = SignedVoucher::from_bytes(&bytes)
                        .with_context(|| format!("{} is not a voucher", path.display()))?;
                    anyhow::Ok(escrow.redeem(&voucher).await?)
                }
                .await;
                match outcome {
                    Ok(sent) => {
                        println!("redeemed {}", path.display());
                        print_sent("redeem", &sent);
                    }
                    Err(err) => {
                        failed += 1;
                        eprintln!("refused {}: {err:#}", path.display());
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} vouchers were refused", args.vouchers.len());
            }
        }
        PayCommand::Settle(on) => {
            let escrow = connect(data_dir, &on).await?;
            let book = vouchers::VoucherBook::read(
                &data_dir.join(crate::start::PAYMENTS_DIR),
                escrow.domain(),
            )?;
            let settled = accounts::settle(&escrow, &book.latest()).await?;
            if settled.is_empty() {
                println!("nothing to settle");
            }
            let mut failed = 0;
            for s in &settled {
                let v = s.voucher;
                match &s.outcome {
                    Ok(sent) => {
                        println!(
                            "redeemed {} from {} to {} via {} ({} in all)",
                            s.paid, v.payer, v.payee, v.entry, v.cumulative_amount
                        );
                        if s.paid < s.due {
                            println!(
                                "short {} from {}: the account held less than its entry nodes \
                                 debited; the rest is redeemed after a top-up",
                                s.due - s.paid,
                                v.payer
                            );
                        }
                        print_sent("redeem", sent);
                    }
                    Err(err) => {
                        failed += 1;
                        eprintln!("refused: {} to {}: {err}", v.payer, v.payee);
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} vouchers were refused", settled.len());
            }
        }
        PayCommand::Withdraw(on) => {
            let escrow = connect(data_dir, &on).await?;
            let amount = escrow.withdrawable(escrow.signer()).await?;
            let sent = escrow.withdraw().await?;
            println!("withdrew {amount} to {}", escrow.signer());
            print_sent("withdraw", &sent);
        }
        PayCommand::Refund(args) => {
            let account = parse_address(&args.address)?;
            let escrow = connect(data_dir, &args.on).await?;
            let state = escrow.account(account).await?;
            let sent = escrow.refund(account).await?;
            println!("refunded {} to {}", state.balance, state.refund_to);
            print_sent("refund", &sent);
        }
    }
    Ok(())
}

async fn connect(data_dir: &Path, on: &ChainOnly) -> anyhow::Result<Escrow> {
    let key = load_key(data_dir, &on.key)?;
    let contract = parse_address(&on.contract)?;
    Ok(Escrow::connect(&on.chain.rpc_url, on.chain.chain_id, contract, &key).await?)
}

fn print_sent(what: &str, sent: &chain::Sent) {
    println!("tx {} gas {} ({what})", sent.hash, sent.gas_used);
}

fn parse_address(text: &str) -> anyhow::Result<NodeId> {
    text.parse()
        .map_err(|e| anyhow::anyhow!("`{text}` is not an address: {e}"))
}

/// The API key form of an access key.
pub fn access_key_text(key: &SecretKey) -> String {
    format!(
        "{ACCESS_KEY_PREFIX}{}",
        hex::encode(key.to_bytes().as_slice())
    )
}

/// Parses an API key of the form [`ACCESS_KEY_PREFIX`] + 64 hex digits.
pub fn parse_access_key(text: &str) -> anyhow::Result<SecretKey> {
    let Some(hex) = text.trim().strip_prefix(ACCESS_KEY_PREFIX) else {
        bail!("an access key starts with {ACCESS_KEY_PREFIX}");
    };
    SecretKey::from_hex(hex).map_err(|e| anyhow::anyhow!("not an access key: {e}"))
}

fn read_access_key(file_or_key: &str) -> anyhow::Result<SecretKey> {
    if file_or_key.starts_with(ACCESS_KEY_PREFIX) {
        return parse_access_key(file_or_key);
    }
    let text = std::fs::read_to_string(file_or_key)
        .with_context(|| format!("cannot read the access key {file_or_key}"))?;
    parse_access_key(&text)
}

/// Writes a new access key to `<data_dir>/access-keys/<address>.key`, readable by its owner
/// only.
fn save_access_key(data_dir: &Path, key: &SecretKey) -> anyhow::Result<PathBuf> {
    let dir = data_dir.join("access-keys");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{}.key", key.node_id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::io::Write::write_all(&mut file, format!("{}\n", access_key_text(key)).as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_keys_round_trip_and_bad_ones_are_errors() {
        let key = SecretKey::generate();
        let text = access_key_text(&key);
        assert_eq!(parse_access_key(&text).unwrap().node_id(), key.node_id());
        assert!(parse_access_key("sk-something").is_err());
        assert!(parse_access_key(&format!("{ACCESS_KEY_PREFIX}zz")).is_err());
        assert!(parse_access_key(&format!("{ACCESS_KEY_PREFIX}{}", "0".repeat(64))).is_err());
    }
}
