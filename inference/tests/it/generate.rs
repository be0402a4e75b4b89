//! The generation loop on the real model: seeds, limits, stop sequences, cancellation, streaming.

use std::time::{Duration, Instant};

use gaia_inference::generate::{
    CancelToken, ChatParams, EventSink, FinishReason, GenerateError, GenerateEvent,
    GenerateRequest, Generation, step_together,
};
use gaia_inference::llm::LlmError;
use gaia_inference::sampling::SamplingParams;
use gaia_inference::template::ChatMessage;

use crate::common::chat_model;

fn poem() -> Vec<ChatMessage> {
    vec![ChatMessage::new(
        "user",
        "Write a short poem about the sea.",
    )]
}

fn sampled(seed: u64, max_tokens: usize) -> ChatParams {
    ChatParams {
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        max_tokens: Some(max_tokens),
        stop: Vec::new(),
    }
}

#[test]
fn same_seed_same_output_different_seed_differs() {
    let model = chat_model();
    let a = model.chat(&poem(), sampled(7, 24)).expect("a");
    let b = model.chat(&poem(), sampled(7, 24)).expect("b");
    let c = model.chat(&poem(), sampled(8, 24)).expect("c");
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.text, b.text);
    assert_ne!(a.tokens, c.tokens, "seeds 7 and 8 gave the same 24 tokens");
}

#[test]
fn max_tokens_is_honoured() {
    let model = chat_model();
    for n in [1, 5] {
        let out = model.chat(&poem(), sampled(1, n)).expect("chat");
        assert_eq!(out.usage.completion_tokens, n);
        assert_eq!(out.tokens.len(), n);
        assert_eq!(out.finish_reason, FinishReason::Length);
        assert!(out.usage.prompt_tokens > 5);
    }
}

#[test]
fn greedy_chat_stops_at_end_of_turn() {
    let model = chat_model();
    let out = model
        .chat(
            &[ChatMessage::new("user", "What is the capital of Japan?")],
            ChatParams {
                sampling: SamplingParams::greedy(),
                max_tokens: Some(64),
                ..ChatParams::default()
            },
        )
        .expect("chat");
    assert!(out.text.contains("Tokyo"), "{:?}", out.text);
    assert_eq!(out.finish_reason, FinishReason::Stop, "{:?}", out.text);
    assert!(!out.text.contains("<|im_end|>"));
}

#[test]
fn stop_sequences_cut_exactly() {
    let model = chat_model();
    let greedy = |stop: Vec<String>| {
        model
            .chat(
                &poem(),
                ChatParams {
                    sampling: SamplingParams::greedy(),
                    max_tokens: Some(40),
                    stop,
                },
            )
            .expect("chat")
    };
    let full = greedy(Vec::new());
    assert!(full.text.len() > 20, "{:?}", full.text);
    // Cut at a word in the middle of the greedy text: the output is exactly the text before it.
    let cut_at = full.text.len() / 2;
    let start = (cut_at..full.text.len())
        .find(|&i| full.text.is_char_boundary(i))
        .expect("boundary");
    let end = (start + 3..=full.text.len())
        .find(|&i| full.text.is_char_boundary(i))
        .expect("boundary");
    let stop = full.text[start..end].to_string();
    let first = full.text.find(&stop).expect("present");
    let cut = greedy(vec![stop.clone()]);
    assert_eq!(cut.text, full.text[..first], "stop {stop:?}");
    assert_eq!(cut.finish_reason, FinishReason::Stop);
    assert!(!cut.text.contains(&stop));
    // A stop sequence that never occurs changes nothing.
    let none = greedy(vec!["@@@never@@@".to_string()]);
    assert_eq!(none.text, full.text);
}

#[test]
fn cancellation_stops_promptly_and_dropped_receiver_cancels() {
    let model = chat_model();
    let cancel = CancelToken::new();
    let request = GenerateRequest {
        prompt: model.chat_prompt(&poem()).expect("prompt"),
        sampling: SamplingParams::greedy(),
        max_tokens: Some(500),
        cancel: cancel.clone(),
        ..GenerateRequest::default()
    };
    let (rx, handle) = model.spawn(request, 4).expect("spawn");
    let mut tokens = 0;
    let mut cancelled_at = None;
    let end = loop {
        match rx
            .recv_timeout(Duration::from_secs(60))
            .expect("an event within a minute")
        {
            GenerateEvent::Token { .. } => {
                tokens += 1;
                if tokens == 3 {
                    cancel.cancel();
                    cancelled_at = Some(Instant::now());
                }
            }
            GenerateEvent::Done { finish_reason, .. } => break finish_reason,
            GenerateEvent::Error(e) => panic!("{e}"),
        }
    };
    assert_eq!(end, FinishReason::Cancelled);
    let latency = cancelled_at.expect("cancelled").elapsed();
    assert!(latency < Duration::from_secs(2), "{latency:?}");
    // At most the channel's capacity plus one token slipped through after the cancel.
    assert!(tokens <= 3 + 5, "{tokens}");
    handle.join().expect("thread ends");

    // Dropping the receiver ends the generation too.
    let request = GenerateRequest {
        prompt: model.chat_prompt(&poem()).expect("prompt"),
        sampling: SamplingParams::greedy(),
        max_tokens: Some(10_000),
        ..GenerateRequest::default()
    };
    let (rx, handle) = model.spawn(request, 1).expect("spawn");
    let _ = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("first event");
    drop(rx);
    let started = Instant::now();
    handle.join().expect("thread ends");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn context_overflow_is_an_error_naming_the_limit() {
    let model = chat_model();
    let limit = model.model().max_context();
    let request = GenerateRequest {
        prompt: vec![1; 10],
        max_tokens: Some(limit),
        ..GenerateRequest::default()
    };
    let err = model.complete(request).expect_err("overflow");
    assert!(
        matches!(err, GenerateError::Llm(LlmError::ContextOverflow { limit: l, .. }) if l == limit),
        "{err:?}"
    );
    assert!(err.to_string().contains(&limit.to_string()), "{err}");
    let err = model
        .complete(GenerateRequest::default())
        .expect_err("empty prompt");
    assert!(matches!(err, GenerateError::EmptyPrompt), "{err:?}");
}

#[test]
fn logprobs_are_reported() {
    let model = chat_model();
    let out = model
        .chat(
            &[ChatMessage::new("user", "What is the capital of France?")],
            ChatParams {
                sampling: SamplingParams {
                    logprobs: true,
                    top_logprobs: 3,
                    ..SamplingParams::greedy()
                },
                max_tokens: Some(4),
                ..ChatParams::default()
            },
        )
        .expect("chat");
    assert_eq!(out.logprobs.len(), out.tokens.len());
    for (entry, id) in out.logprobs.iter().zip(&out.tokens) {
        let lp = entry.logprob.expect("logprob");
        let top = &entry.top_logprobs;
        assert!(lp <= 0.0);
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0].0, *id);
        assert!((top[0].1 - lp).abs() < 1e-5);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
}

#[test]
fn json_constraint_yields_valid_json() {
    let model = chat_model();
    let factory = model.constraints().expect("constraint factory");
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": false
    });
    let constraint = factory.json_schema(&schema).expect("schema");
    let out = model
        .complete(GenerateRequest {
            prompt: model
                .chat_prompt(&[ChatMessage::new(
                    "user",
                    "What is the capital of France? Answer in JSON.",
                )])
                .expect("prompt"),
            sampling: SamplingParams::greedy(),
            max_tokens: Some(48),
            constraint: Some(constraint),
            ..GenerateRequest::default()
        })
        .expect("generate");
    let value: serde_json::Value = serde_json::from_str(&out.text)
        .unwrap_or_else(|e| panic!("{:?} is not json: {e}", out.text));
    assert!(value["city"].is_string(), "{value}");
    assert_eq!(out.finish_reason, FinishReason::Stop);
}

/// What one generation streamed: its text, tokens and how it ended.
#[derive(Default, Debug)]
struct Collected {
    text: String,
    tokens: Vec<u32>,
    end: Option<FinishReason>,
}

impl EventSink for Collected {
    fn send_event(&mut self, event: GenerateEvent) -> bool {
        match event {
            GenerateEvent::Token { id, text_delta, .. } => {
                self.tokens.push(id);
                self.text.push_str(&text_delta);
            }
            GenerateEvent::Done { finish_reason, .. } => self.end = Some(finish_reason),
            GenerateEvent::Error(e) => panic!("{e}"),
        }
        true
    }
}

/// Continuous batching on the real model: eight mixed generations stepped together (up to
/// seven at once) give each exactly the tokens it gives alone.
#[test]
fn generations_stepped_together_match_each_alone() {
    let model = chat_model();
    let long = format!(
        "Summarize this report in one sentence. {}",
        "The harbour office counted the ships that came in before noon, wrote down their \
         cargo and their flags, and sent the list to the town hall by the evening post. "
            .repeat(12)
    );
    // Eight mixed requests: short and long prompts (the long one is prefilled in chunks
    // between the others' decode steps), greedy and seeded sampling, a stop sequence, a
    // logit bias, a small token limit, one cancelled midway, and four joining late.
    let questions: [&str; 8] = [
        "Write a short poem about the sea.",
        "What is the capital of France? Answer in one sentence.",
        "List three prime numbers and explain briefly why each one is prime, in detail.",
        "Say hello.",
        &long,
        "Tell me a story about a fox.",
        "Describe a sunrise over the mountains.",
        "Name a colour.",
    ];
    let request = |i: usize, cancel: CancelToken| {
        let mut sampling = SamplingParams::greedy();
        let mut stop = Vec::new();
        let mut max_tokens = 24;
        match i {
            5 => {
                sampling.temperature = 0.9;
                sampling.top_p = 0.9;
                sampling.seed = Some(42);
            }
            6 => stop.push(".".to_string()),
            7 => max_tokens = 5,
            1 => sampling.logit_bias = vec![(504, -100.0), (378, 4.0)],
            _ => {}
        }
        GenerateRequest {
            prompt: model
                .chat_prompt(&[ChatMessage::new("user", questions[i])])
                .expect("prompt"),
            sampling,
            max_tokens: Some(max_tokens),
            stop,
            cancel,
            ..GenerateRequest::default()
        }
    };
    assert!(request(4, CancelToken::new()).prompt.len() > 300);
    let alone: Vec<Collected> = (0..questions.len())
        .map(|i| {
            let mut out = Collected::default();
            model.generate(request(i, CancelToken::new()), &mut out);
            out
        })
        .collect();
    for a in &alone {
        assert!(!a.tokens.is_empty(), "{a:?}");
    }
    assert_eq!(alone[6].end, Some(FinishReason::Stop), "{:?}", alone[6]);
    assert_eq!(alone[7].tokens.len(), 5);

    let cancel = CancelToken::new();
    let mut gens: Vec<Option<Generation>> = Vec::new();
    let mut sinks: Vec<Collected> = (0..questions.len()).map(|_| Collected::default()).collect();
    let mut logits = Vec::new();
    let mut steps = 0;
    let mut widest = 0;
    loop {
        // Three start together, two join at the fifth step, two at the seventh, the last at
        // the thirteenth; the third is cancelled at the tenth.
        let joined = match steps {
            0..4 => 3,
            4..6 => 5,
            6..12 => 7,
            _ => 8,
        };
        while gens.len() < joined {
            let i = gens.len();
            let token = if i == 2 {
                cancel.clone()
            } else {
                CancelToken::new()
            };
            gens.push(Some(
                Generation::start(model, request(i, token)).expect("starts"),
            ));
        }
        if steps == 9 {
            cancel.cancel();
        }
        let mut batch: Vec<(&mut Generation, &mut dyn EventSink)> = gens
            .iter_mut()
            .zip(sinks.iter_mut())
            .filter_map(|(g, s)| g.as_mut().map(|g| (g, s as &mut dyn EventSink)))
            .collect();
        widest = widest.max(batch.len());
        let ran = step_together(model, &mut batch, &mut logits);
        drop(batch);
        for (g, sink) in gens.iter_mut().zip(sinks.iter_mut()) {
            if g.as_ref().is_some_and(Generation::is_finished)
                && let Some(g) = g.take()
            {
                g.finish(sink);
            }
        }
        steps += 1;
        if ran == 0 && gens.len() == questions.len() && gens.iter().all(Option::is_none) {
            break;
        }
        assert!(steps < 400, "the batch never ended");
    }
    assert!(widest >= 6, "at most {widest} generations ran together");
    for (i, (a, b)) in alone.iter().zip(&sinks).enumerate() {
        if i == 2 {
            assert_eq!(b.end, Some(FinishReason::Cancelled));
            assert!(b.tokens.len() < a.tokens.len(), "{b:?}");
            assert_eq!(b.tokens[..], a.tokens[..b.tokens.len()], "cancelled midway");
            continue;
        }
        assert_eq!(
            b.tokens, a.tokens,
            "generation {i}: {:?} vs {:?}",
            b.text, a.text
        );
        assert_eq!(b.text, a.text);
        assert_eq!(b.end, a.end);
    }
}

/// The prefix cache on the real model: a chat's second turn reuses the first turn's prompt
/// and answer, another user's request reuses the shared system prompt, and both give exactly
/// the tokens a model without the cache gives. A budget too small for any sequence keeps
/// nothing, and a budget for about one conversation evicts the older one.
#[test]
fn prefix_cache_reuses_a_conversation_and_a_shared_system_prompt() {
    let plain = chat_model();
    let cached = plain.with_prefix_cache(64 << 20);
    let system = ChatMessage::new(
        "system",
        "You are a helpful assistant for a bakery. Answer briefly and politely, and mention \
         the bakery's opening hours (7am to 6pm) when it helps.",
    );
    let request = |messages: &[ChatMessage]| GenerateRequest {
        prompt: plain.chat_prompt(messages).expect("prompt"),
        sampling: SamplingParams::greedy(),
        max_tokens: Some(16),
        ..GenerateRequest::default()
    };
    let both = |messages: &[ChatMessage]| {
        let with = cached.complete(request(messages)).expect("completes");
        let without = plain.complete(request(messages)).expect("completes");
        assert_eq!(with.tokens, without.tokens, "{messages:?}");
        assert_eq!(without.usage.cached_tokens, 0);
        with
    };

    let turn1 = vec![
        system.clone(),
        ChatMessage::new("user", "Do you sell rye bread?"),
    ];
    let first = both(&turn1);
    assert_eq!(first.usage.cached_tokens, 0);
    assert!(!first.tokens.is_empty());
    let stats = cached.prefix_stats();
    assert_eq!((stats.lookups, stats.hits, stats.entries), (1, 0, 1));
    assert!(stats.bytes > 0 && stats.bytes <= stats.budget, "{stats:?}");

    let mut turn2 = turn1.clone();
    turn2.push(ChatMessage::new("assistant", &first.text));
    turn2.push(ChatMessage::new("user", "And when can I come to buy it?"));
    let second = both(&turn2);
    // At least the whole first prompt came from the cache (and most of the answer).
    assert!(
        second.usage.cached_tokens >= first.usage.prompt_tokens,
        "{:?} vs {:?}",
        second.usage,
        first.usage
    );
    assert!(second.usage.cached_tokens < second.usage.prompt_tokens);

    let other = vec![
        system.clone(),
        ChatMessage::new("user", "Is there gluten-free cake?"),
    ];
    let third = both(&other);
    let system_tokens = plain
        .chat_prompt(std::slice::from_ref(&system))
        .expect("prompt")
        .len();
    assert!(
        third.usage.cached_tokens + 8 >= system_tokens && third.usage.cached_tokens > 10,
        "{:?}, system prompt of {system_tokens} tokens",
        third.usage
    );
    let stats = cached.prefix_stats();
    assert_eq!((stats.lookups, stats.hits), (3, 2), "{stats:?}");
    assert_eq!(
        stats.reused_tokens,
        (second.usage.cached_tokens + third.usage.cached_tokens) as u64
    );
    // The second turn took the first turn's entry over; the third copied the system prompt
    // out of it and added its own.
    assert_eq!(stats.entries, 2, "{stats:?}");

    // Too small a budget keeps nothing.
    let tiny = plain.with_prefix_cache(1);
    tiny.complete(request(&turn1)).expect("completes");
    let again = tiny.complete(request(&turn1)).expect("completes");
    assert_eq!(again.usage.cached_tokens, 0);
    assert_eq!(tiny.prefix_stats().entries, 0);

    // Room for one and a half conversations: the older one is evicted.
    let probe = plain.with_prefix_cache(64 << 20);
    probe.complete(request(&turn1)).expect("completes");
    let one_entry = probe.prefix_stats().bytes;
    let one = plain.with_prefix_cache(one_entry * 3 / 2);
    one.complete(request(&turn1)).expect("completes");
    let later = one.complete(request(&other)).expect("completes");
    assert!(later.usage.cached_tokens > 10, "{:?}", later.usage);
    let stats = one.prefix_stats();
    assert_eq!(stats.entries, 1, "{stats:?}");
    assert_eq!(stats.evictions, 1, "{stats:?}");
    assert!(stats.bytes <= stats.budget);
}
