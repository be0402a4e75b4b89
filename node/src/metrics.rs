//! The node's counters and their Prometheus text (`GET /metrics`): requests by route and
//! status, latency histograms by route, tokens, tool calls, the engine's load (in flight,
//! queue, tokens per second), and the swarm's routing (chats served here or by a peer,
//! failovers, chats served for peers). The HTTP API counts requests with its `track`
//! middleware (`api/metrics.rs`); the chat pipeline ([`crate::agent`]) counts the rest.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::content::seed::SeedCounters;
use crate::engine::LoadFigures;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// The node's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    tools: Mutex<BTreeMap<(String, bool), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    routed_local: AtomicU64,
    routed_peer: AtomicU64,
    failovers: AtomicU64,
    served_for_peers: AtomicU64,
    /// What this node seeded to members fetching its content ([`crate::content::seed`]).
    content: Arc<SeedCounters>,
}

impl Metrics {
    /// Counters that render the seeder's `content` counters too.
    pub fn with_content(content: Arc<SeedCounters>) -> Self {
        Self {
            content,
            ..Self::default()
        }
    }

    /// Records one request.
    pub fn request(&self, route: &str, status: u16, seconds: f64) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((route.to_string(), status)).or_default() += 1;
        }
        if let Ok(mut l) = self.latency.lock() {
            let h = l.entry(route.to_string()).or_default();
            for (i, bound) in BUCKETS.iter().enumerate() {
                if seconds <= *bound {
                    h.counts[i] += 1;
                }
            }
            h.sum += seconds;
            h.count += 1;
        }
    }

    /// Records tokens served through the API.
    pub fn tokens(&self, prompt: usize, completion: usize) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
    }

    /// Records where a chat completion received by this node's API runs.
    pub fn route(&self, to_peer: bool) {
        let counter = if to_peer {
            &self.routed_peer
        } else {
            &self.routed_local
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the extra nodes a routed chat was sent to after the first failed.
    pub fn failovers(&self, extra_attempts: u32) {
        self.failovers
            .fetch_add(u64::from(extra_attempts), Ordering::Relaxed);
    }

    /// Records a chat served for a peer (or for this node's own router).
    pub fn served_for_peer(&self) {
        self.served_for_peers.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a node-executed tool call.
    pub fn tool_call(&self, name: &str, ok: bool) {
        if let Ok(mut t) = self.tools.lock() {
            *t.entry((name.to_string(), ok)).or_default() += 1;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, load: &LoadFigures) -> String {
        let mut out = String::new();
        out.push_str("# HELP gaia_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE gaia_http_requests_total counter\n");
        if let Ok(r) = self.requests.lock() {
            for ((route, status), n) in r.iter() {
                let _ = writeln!(
                    out,
                    "gaia_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP gaia_http_request_duration_seconds Time to the response head.\n");
        out.push_str("# TYPE gaia_http_request_duration_seconds histogram\n");
        if let Ok(l) = self.latency.lock() {
            for (route, h) in l.iter() {
                for (bound, n) in BUCKETS.iter().zip(h.counts) {
                    let _ = writeln!(
                        out,
                        "gaia_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {n}"
                    );
                }
                let _ = writeln!(
                    out,
                    "gaia_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}\n\
                     gaia_http_request_duration_seconds_sum{{route=\"{route}\"}} {}\n\
                     gaia_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                    h.count, h.sum, h.count
                );
            }
        }
        out.push_str(
            "# HELP gaia_tool_calls_total Node-executed tool calls by tool and outcome.\n",
        );
        out.push_str("# TYPE gaia_tool_calls_total counter\n");
        if let Ok(t) = self.tools.lock() {
            for ((name, ok), n) in t.iter() {
                let _ = writeln!(
                    out,
                    "gaia_tool_calls_total{{tool=\"{name}\",ok=\"{ok}\"}} {n}"
                );
            }
        }
        let seeded = |counter: &AtomicU64| counter.load(Ordering::Relaxed) as f64;
        let gauges: [(&str, &str, &str, f64); 23] = [
            (
                "gaia_chats_routed_local_total",
                "counter",
                "Chat completions this node's API served on its own engine.",
                self.routed_local.load(Ordering::Relaxed) as f64,
            ),
            (
                "gaia_chats_routed_peer_total",
                "counter",
                "Chat completions this node's API routed to a peer.",
                self.routed_peer.load(Ordering::Relaxed) as f64,
            ),
            (
                "gaia_chat_failovers_total",
                "counter",
                "Extra nodes routed chats were sent to after a node failed.",
                self.failovers.load(Ordering::Relaxed) as f64,
            ),
            (
                "gaia_chats_served_for_peers_total",
                "counter",
                "Relayed chat completions this node served.",
                self.served_for_peers.load(Ordering::Relaxed) as f64,
            ),
            (
                "gaia_prompt_tokens_total",
                "counter",
                "Prompt tokens of API requests.",
                self.prompt_tokens.load(Ordering::Relaxed) as f64,
            ),
            (
                "gaia_completion_tokens_total",
                "counter",
                "Tokens generated for API requests.",
                self.completion_tokens.load(Ordering::Relaxed) as f64,
            ),
            (
                "gaia_generations_in_flight",
                "gauge",
                "Generations running now.",
                load.in_flight as f64,
            ),
            (
                "gaia_queue_depth",
                "gauge",
                "Generations waiting for a worker.",
                load.queued as f64,
            ),
            (
                "gaia_queue_capacity",
                "gauge",
                "Generations that may wait before 429.",
                load.queue_capacity as f64,
            ),
            (
                "gaia_workers",
                "gauge",
                "Generation worker threads.",
                load.workers as f64,
            ),
            (
                "gaia_batch_size",
                "gauge",
                "Generations each worker decodes together.",
                load.batch_size as f64,
            ),
            (
                "gaia_prefix_cache_lookups_total",
                "counter",
                "Prompts looked up in the prefix cache.",
                load.prefix.lookups as f64,
            ),
            (
                "gaia_prefix_cache_hits_total",
                "counter",
                "Prompts that reused cached model state of a shared prefix.",
                load.prefix.hits as f64,
            ),
            (
                "gaia_prefix_cache_reused_tokens_total",
                "counter",
                "Prompt tokens taken from the prefix cache instead of being run.",
                load.prefix.reused_tokens as f64,
            ),
            (
                "gaia_prefix_cache_evictions_total",
                "counter",
                "Prefix cache entries dropped to stay within its budget.",
                load.prefix.evictions as f64,
            ),
            (
                "gaia_prefix_cache_bytes",
                "gauge",
                "Bytes of model state the prefix cache holds.",
                load.prefix.bytes as f64,
            ),
            (
                "gaia_prefix_cache_budget_bytes",
                "gauge",
                "The prefix cache's budget (server.prefix_cache_mb).",
                load.prefix.budget as f64,
            ),
            (
                "gaia_tokens_per_second",
                "gauge",
                "Recent decode speed (moving average).",
                load.tokens_per_second,
            ),
            (
                "gaia_generations_total",
                "counter",
                "Generations finished.",
                load.generations as f64,
            ),
            (
                "gaia_content_descriptions_total",
                "counter",
                "Models and knowledge bases described to members fetching them.",
                seeded(&self.content.descriptions),
            ),
            (
                "gaia_content_chunks_sent_total",
                "counter",
                "Content chunks sent to members fetching them.",
                seeded(&self.content.chunks),
            ),
            (
                "gaia_content_bytes_sent_total",
                "counter",
                "Bytes of content sent to members fetching them.",
                seeded(&self.content.bytes),
            ),
            (
                "gaia_content_streams_refused_total",
                "counter",
                "Content streams refused or cut (limits, membership, unknown or unreadable content).",
                seeded(&self.content.refused),
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.request("/health", 200, 0.003);
        m.request("/health", 200, 0.2);
        m.tokens(5, 7);
        let text = m.render(&LoadFigures {
            in_flight: 1,
            queued: 2,
            queue_capacity: 3,
            workers: 1,
            batch_size: 8,
            tokens_per_second: 9.5,
            generated_tokens: 0,
            prompt_tokens: 0,
            generations: 4,
            prefix: gaia_inference::prefix::PrefixStats {
                hits: 3,
                bytes: 1024,
                ..Default::default()
            },
        });
        assert!(text.contains("gaia_http_requests_total{route=\"/health\",status=\"200\"} 2"));
        assert!(text.contains(
            "gaia_http_request_duration_seconds_bucket{route=\"/health\",le=\"0.005\"} 1"
        ));
        assert!(text.contains("gaia_http_request_duration_seconds_count{route=\"/health\"} 2"));
        assert!(text.contains("gaia_completion_tokens_total 7"));
        assert!(text.contains("gaia_queue_depth 2"));
        assert!(text.contains("gaia_tokens_per_second 9.5"));
        assert!(text.contains("gaia_prefix_cache_hits_total 3"));
        assert!(text.contains("gaia_prefix_cache_bytes 1024"));
        m.content.chunks.fetch_add(3, Ordering::Relaxed);
        m.content.bytes.fetch_add(3 << 20, Ordering::Relaxed);
        let text = m.render(&LoadFigures::default());
        assert!(
            text.contains("gaia_content_chunks_sent_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("gaia_content_bytes_sent_total 3145728\n"),
            "{text}"
        );
        assert!(
            text.contains("gaia_content_streams_refused_total 0\n"),
            "{text}"
        );
    }
}
