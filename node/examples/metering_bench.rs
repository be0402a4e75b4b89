//! Metering figures: what receipts add to a request, and how many a node records per second.
//!
//! For each concurrency level, `RECEIPTS` requests are metered end to end as a node does it,
//! with the ledgers on disk (a temporary directory, so the disk of the data directory's file
//! system may differ): the serving node signs the receipt and records it in its `issued`
//! ledger (synced), then the entry node checks it (signature, signer, counts) and records it
//! in its `received` ledger (synced); a paid request is then debited to its access key (a
//! cumulative voucher signed with the key and synced to the voucher book). Printed: the
//! latency receipts add per request (p50, p99), the latency of the whole paid path (receipts
//! and debit), and paid requests per second, with appends batched into one sync per batch.
//!
//! Run: `cargo run --release -p gaia-node --example metering_bench [RECEIPTS]` (default 2000).

use std::sync::Arc;
use std::time::Instant;

use gaia_node::pay::vouchers::VoucherBook;
use gaia_node::swarm::meter::Meter;
use gaia_protocol::advert::{Capabilities, Load};
use gaia_protocol::domain::DomainId;
use gaia_protocol::machine::membership::LocalService;
use gaia_protocol::payment;
use gaia_protocol::stream::RequestId;
use gaia_protocol::{ContentHash, NodeId, SecretKey};

fn service() -> LocalService {
    LocalService {
        model_name: "bench".into(),
        model_hash: ContentHash::of(b"bench model"),
        kb_hash: None,
        prompt_hash: None,
        capabilities: Capabilities {
            tools: false,
            structured_output: false,
            context_length: 4096,
            max_tokens: 4096,
        },
        load: Load {
            in_flight: 0,
            queued: 0,
            tokens_per_s: 100.0,
        },
        price: gaia_protocol::payment::Price::flat(20),
        addrs: Vec::new(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let receipts: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2000);
    let dir = tempfile::tempdir()?;
    let domain = DomainId([7; 32]);
    let (server_key, entry_key) = (SecretKey::generate(), SecretKey::generate());
    let entry_node = entry_key.node_id();
    let server_node = server_key.node_id();
    println!(
        "metering {receipts} requests per level, ledgers in {} (each append synced)",
        dir.path().display()
    );
    println!("             receipts only   receipts + debit");
    println!("concurrency  p50 ms  p99 ms  p50 ms  p99 ms  paid requests/s");
    for concurrency in [1usize, 4, 16, 64] {
        let run = dir.path().join(format!("c{concurrency}"));
        let server = Arc::new(Meter::open(
            server_key.clone(),
            domain,
            Some(&service()),
            Some(&run.join("server")),
        )?);
        let entry = Arc::new(Meter::open(
            entry_key.clone(),
            domain,
            None,
            Some(&run.join("entry")),
        )?);
        let escrow = payment::Escrow {
            chain_id: 1337,
            contract: NodeId([0xec; 20]),
        };
        let (book, _) = VoucherBook::open(&run.join("payments"), escrow, entry_key.node_id())?;
        let book = Arc::new(book);
        let started = Instant::now();
        let per_task = receipts / concurrency;
        let tasks: Vec<_> = (0..concurrency)
            .map(|t| {
                let (server, entry, book) =
                    (Arc::clone(&server), Arc::clone(&entry), Arc::clone(&book));
                // Each client its own access key.
                let payer = SecretKey::generate();
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(per_task);
                    let mut paid = Vec::with_capacity(per_task);
                    for i in 0..per_task {
                        let mut id = [0u8; 16];
                        id[..8].copy_from_slice(&(t as u64).to_le_bytes());
                        id[8..].copy_from_slice(&(i as u64).to_le_bytes());
                        let id = RequestId(id);
                        let begin = Instant::now();
                        let receipt = server.issue(id, entry_node, 120, 64).await;
                        entry
                            .settle(
                                id,
                                server_node,
                                receipt.as_ref(),
                                120,
                                64,
                                0,
                                gaia_protocol::payment::Price::UNLIMITED,
                            )
                            .await
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                        latencies.push(begin.elapsed().as_secs_f64() * 1000.0);
                        let amount = receipt.map_or(0, |r| r.payload.amount());
                        book.debit(&payer, server_node, amount, u64::MAX)
                            .await
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                        paid.push(begin.elapsed().as_secs_f64() * 1000.0);
                    }
                    anyhow::Ok((latencies, paid))
                })
            })
            .collect();
        let mut latencies = Vec::new();
        let mut paid = Vec::new();
        for task in tasks {
            let (l, p) = task.await??;
            latencies.extend(l);
            paid.extend(p);
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        paid.sort_by(f64::total_cmp);
        let owed = entry.owed_by_clients()[&server_node];
        assert_eq!(owed.receipts as usize, latencies.len());
        assert_eq!(server.earned(), owed);
        let debited: u128 = book
            .latest()
            .iter()
            .map(|v| v.voucher.cumulative_amount)
            .sum();
        assert_eq!(debited, owed.amount, "the vouchers add up to the receipts");
        println!(
            "{concurrency:>11}  {:>6.2}  {:>6.2}  {:>6.2}  {:>6.2}  {:>15.0}",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            percentile(&paid, 0.5),
            percentile(&paid, 0.99),
            paid.len() as f64 / elapsed
        );
    }
    Ok(())
}
