//! Token sampling: turns the logits of one decoding step into the next token.
//!
//! The transforms run in a fixed order, the same as llama.cpp and the OpenAI API describe them:
//!
//! 1. **logit bias** (`logit_bias`): added to the raw logits;
//! 2. **token mask** (from the constraint layer): disallowed tokens get `-inf`;
//! 3. **repetition penalty** (CTRL style) over the last `penalty_last_n` tokens of the context
//!    (prompt and generated text);
//! 4. **presence and frequency penalties** (OpenAI) over the generated tokens;
//! 5. **temperature**; a temperature of `0` (or below [`GREEDY_BELOW`]) means greedy decoding
//!    (arg-max, ties to the lowest id);
//! 6. **top-k**, **top-p** (nucleus) and **min-p** truncation;
//! 7. a draw from the remaining distribution with a seeded ChaCha8 generator, so the same seed and
//!    the same logits always give the same token on every platform.
//!
//! Log-probabilities, when asked for, are the log-softmax of the *processed* distribution: after
//! steps 1–5 (bias, mask, penalties and temperature; a greedy request uses temperature 1), before
//! truncation, so the reported alternatives keep finite values.

use std::cmp::Ordering;
use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The largest number of alternatives `top_logprobs` may ask for (the OpenAI limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Sampling parameters of one request. `SamplingParams::default()` samples at temperature 1 with
/// every other transform disabled; [`SamplingParams::greedy`] decodes greedily.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature, `>= 0`; `0` selects the most likely token. Default 1.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables. Default 0.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`;
    /// in `(0, 1]`, `1` disables. Default 1.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's; in `[0, 1]`,
    /// `0` disables. Default 0.
    pub min_p: f32,
    /// CTRL-style repetition penalty, `> 0`; `1` disables. Positive logits of recently seen
    /// tokens are divided by it, negative ones multiplied. Default 1.
    pub repetition_penalty: f32,
    /// How many of the last context tokens the repetition penalty looks at; `0` means the whole
    /// context. Default 64 (llama.cpp's default).
    pub penalty_last_n: usize,
    /// OpenAI presence penalty in `[-2, 2]`: subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty in `[-2, 2]`: subtracted once per previous occurrence of a token
    /// in the generated text.
    pub frequency_penalty: f32,
    /// Additive biases in `[-100, 100]` for given token ids (OpenAI `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed of the random generator; the same seed with the same prompt gives the same output.
    /// `None` draws a fresh seed.
    pub seed: Option<u64>,
    /// Report the log-probability of every sampled token.
    pub logprobs: bool,
    /// With `logprobs`, also report this many most likely alternatives (at most 20).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            penalty_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    /// Checks every parameter against its documented range; `vocab_size` bounds the token ids of
    /// `logit_bias`.
    pub fn validate(&self, vocab_size: usize) -> Result<(), SamplingError> {
        fn invalid(name: &'static str, value: String, expected: &'static str) -> SamplingError {
            SamplingError::InvalidParameter {
                name,
                value,
                expected,
            }
        }
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(invalid(
                "temperature",
                t.to_string(),
                "a finite number >= 0",
            ));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(invalid("top_p", p.to_string(), "a number in (0, 1]"));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return Err(invalid("min_p", m.to_string(), "a number in [0, 1]"));
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return Err(invalid(
                "repetition_penalty",
                r.to_string(),
                "a finite number > 0 (1 disables it)",
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(invalid(name, v.to_string(), "a number in [-2, 2]"));
            }
        }
        for &(token, bias) in &self.logit_bias {
            if token as usize >= vocab_size {
                return Err(invalid(
                    "logit_bias",
                    format!("token id {token}"),
                    "token ids below the vocabulary size",
                ));
            }
            if !(-100.0..=100.0).contains(&bias) {
                return Err(invalid(
                    "logit_bias",
                    bias.to_string(),
                    "biases in [-100, 100]",
                ));
            }
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(invalid(
                "top_logprobs",
                self.top_logprobs.to_string(),
                "an integer in [0, 20]",
            ));
        }
        Ok(())
    }

    /// Whether this request decodes greedily (no randomness involved): temperature 0 or
    /// below [`GREEDY_BELOW`], or `top_k` 1.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW || self.top_k == 1
    }
}

/// Temperatures below this decode greedily: dividing logits by a tiny temperature (OpenAI
/// clients send `1e-45` to ask for determinism) would overflow to infinities, and the draw is
/// the arg-max anyway.
pub const GREEDY_BELOW: f32 = 1e-4;

/// Why sampling could not proceed.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum SamplingError {
    /// A parameter is outside its valid range.
    #[error("invalid sampling parameter {name} = {value}: expected {expected}")]
    InvalidParameter {
        /// The parameter's name (as in the OpenAI API).
        name: &'static str,
        /// The rejected value.
        value: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// The logits handed to the sampler do not match the vocabulary.
    #[error("the model produced {got} logits but the vocabulary has {expected} tokens")]
    LogitsSize {
        /// The vocabulary size the sampler was built for.
        expected: usize,
        /// The number of logits received.
        got: usize,
    },
    /// The token mask (constraint) together with the logit biases leaves no token to choose.
    #[error(
        "no token is allowed at this step: the constraint (or logit_bias) excludes every token"
    )]
    NoAllowedToken,
}

/// One sampled token with its log-probability and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// The chosen token id.
    pub token: u32,
    /// Its log-probability under the processed distribution (with `logprobs`).
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens and their log-probabilities, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// The sampling state of one generation: parameters, random generator and token counts.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    vocab_size: usize,
    rng: ChaCha8Rng,
    /// Prompt and generated tokens, for the repetition penalty window.
    context: Vec<u32>,
    /// Occurrences of each generated token, for presence and frequency penalties.
    generated: HashMap<u32, u32>,
    /// Scratch space reused across steps (candidate ids and weights).
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    /// Validates `params` and prepares a sampler for a vocabulary of `vocab_size` tokens; the
    /// `prompt` tokens seed the repetition-penalty window.
    pub fn new(
        params: SamplingParams,
        vocab_size: usize,
        prompt: &[u32],
    ) -> Result<Sampler, SamplingError> {
        params.validate(vocab_size)?;
        let seed = params.seed.unwrap_or_else(rand::random);
        Ok(Sampler {
            params,
            vocab_size,
            rng: ChaCha8Rng::seed_from_u64(seed),
            context: prompt.to_vec(),
            generated: HashMap::new(),
            scratch: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records a generated token (for the penalties of later steps). [`Sampler::sample`] does
    /// this itself; call it only for tokens chosen elsewhere (e.g. forced by a constraint).
    pub fn accept(&mut self, token: u32) {
        self.context.push(token);
        *self.generated.entry(token).or_insert(0) += 1;
    }

    /// Chooses the next token from `logits` (one per vocabulary entry; modified in place).
    /// `mask`, when given, is a bitmask over token ids (bit `t % 32` of word `t / 32` set means
    /// token `t` is allowed), as the constraint layer produces it.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        mask: Option<&[u32]>,
    ) -> Result<Sampled, SamplingError> {
        if logits.len() != self.vocab_size {
            return Err(SamplingError::LogitsSize {
                expected: self.vocab_size,
                got: logits.len(),
            });
        }
        self.process(logits, mask)?;
        let temperature = if self.params.is_greedy() {
            1.0
        } else {
            self.params.temperature
        };
        if temperature != 1.0 {
            // Shifted by the largest finite logit first, which leaves the softmax unchanged:
            // a logit near f32::MAX (a tiny repetition penalty) divided by a temperature below
            // 1 would otherwise overflow to infinity and poison the draw.
            let max = logits
                .iter()
                .copied()
                .filter(|l| l.is_finite())
                .fold(f32::NEG_INFINITY, f32::max);
            let shift = if max.is_finite() { max } else { 0.0 };
            let inv = 1.0 / temperature;
            logits.iter_mut().for_each(|l| *l = (*l - shift) * inv);
        }
        let token = if self.params.is_greedy() {
            argmax(logits).ok_or(SamplingError::NoAllowedToken)?
        } else {
            self.draw(logits)?
        };
        let (logprob, top_logprobs) = if self.params.logprobs {
            let (lp, top) = logprobs(logits, token, self.params.top_logprobs);
            (Some(lp), top)
        } else {
            (None, Vec::new())
        };
        self.accept(token);
        Ok(Sampled {
            token,
            logprob,
            top_logprobs,
        })
    }

    /// Steps 1–4: bias, mask and penalties, in place.
    fn process(&self, logits: &mut [f32], mask: Option<&[u32]>) -> Result<(), SamplingError> {
        for &(token, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        if let Some(mask) = mask {
            apply_mask(logits, mask);
        }
        if self.params.repetition_penalty != 1.0 {
            let n = self.params.penalty_last_n;
            let window = if n == 0 || n >= self.context.len() {
                &self.context[..]
            } else {
                &self.context[self.context.len() - n..]
            };
            apply_repetition_penalty(logits, window, self.params.repetition_penalty);
        }
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            for (&token, &count) in &self.generated {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -=
                        self.params.presence_penalty + self.params.frequency_penalty * count as f32;
                }
            }
        }
        if logits.iter().all(|l| *l == f32::NEG_INFINITY || l.is_nan()) {
            return Err(SamplingError::NoAllowedToken);
        }
        Ok(())
    }

    /// Steps 6–7 on temperature-scaled logits: truncation, then a seeded draw.
    fn draw(&mut self, logits: &[f32]) -> Result<u32, SamplingError> {
        let max = logits
            .iter()
            .copied()
            .filter(|l| !l.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(SamplingError::NoAllowedToken);
        }
        let params = &self.params;
        // Unnormalised probabilities relative to the most likely token (which has 1), computed
        // once per step; min-p keeps tokens with p >= min_p * p_max, i.e. weight >= min_p.
        let min_w = params.min_p;
        let cands = &mut self.scratch;
        cands.clear();
        for (t, &l) in logits.iter().enumerate() {
            if l.is_nan() {
                continue;
            }
            let w = (l - max).exp();
            if w > 0.0 && w >= min_w {
                cands.push((t as u32, w));
            }
        }
        // Most likely first, ties to the lowest id.
        let by_weight = |a: &(u32, f32), b: &(u32, f32)| -> Ordering {
            b.1.partial_cmp(&a.1)
                .unwrap_or(Ordering::Equal)
                .then(a.0.cmp(&b.0))
        };
        if params.top_k > 0 && cands.len() > params.top_k {
            cands.select_nth_unstable_by(params.top_k - 1, by_weight);
            cands.truncate(params.top_k);
        }
        if params.top_p < 1.0 {
            let total: f64 = cands.iter().map(|c| f64::from(c.1)).sum();
            let target = f64::from(params.top_p) * total;
            // The nucleus is a prefix of the candidates sorted by weight. Sort only those above a
            // threshold, lowering it until their mass reaches the target.
            let mut threshold = 1e-3f32;
            loop {
                let head_mass: f64 = cands
                    .iter()
                    .filter(|c| c.1 >= threshold)
                    .map(|c| f64::from(c.1))
                    .sum();
                if head_mass >= target || threshold == 0.0 {
                    cands.retain(|c| c.1 >= threshold);
                    cands.sort_unstable_by(by_weight);
                    let mut acc = 0.0;
                    let mut keep = cands.len();
                    for (i, c) in cands.iter().enumerate() {
                        acc += f64::from(c.1);
                        if acc >= target {
                            keep = i + 1;
                            break;
                        }
                    }
                    cands.truncate(keep);
                    break;
                }
                threshold = if threshold < 1e-12 {
                    0.0
                } else {
                    threshold * 1e-3
                };
            }
        }
        // A deterministic order for the draw, independent of how the candidates were found.
        cands.sort_unstable_by_key(|c| c.0);
        let total: f64 = cands.iter().map(|c| f64::from(c.1)).sum();
        if cands.is_empty() || total <= 0.0 {
            return Err(SamplingError::NoAllowedToken);
        }
        let mut u = self.rng.r#gen::<f64>() * total;
        for c in cands.iter() {
            u -= f64::from(c.1);
            if u < 0.0 {
                return Ok(c.0);
            }
        }
        // Rounding left a sliver of mass: the last candidate takes it.
        Ok(cands[cands.len() - 1].0)
    }
}

/// Sets every token not allowed by `mask` to `-inf` (tokens past the mask are disallowed).
pub fn apply_mask(logits: &mut [f32], mask: &[u32]) {
    for (t, l) in logits.iter_mut().enumerate() {
        let allowed = mask
            .get(t / 32)
            .is_some_and(|word| word & (1 << (t % 32)) != 0);
        if !allowed {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// CTRL repetition penalty: each distinct token of `window` has a positive logit divided by
/// `penalty` and a negative one multiplied by it.
pub fn apply_repetition_penalty(logits: &mut [f32], window: &[u32], penalty: f32) {
    let mut seen = std::collections::HashSet::with_capacity(window.len());
    for &t in window {
        if !seen.insert(t) {
            continue;
        }
        if let Some(l) = logits.get_mut(t as usize) {
            // Clamped: a tiny penalty must not turn a logit into an infinity.
            *l = if *l > 0.0 {
                (*l / penalty).min(f32::MAX)
            } else {
                (*l * penalty).max(f32::MIN)
            };
        }
    }
}

/// The index of the largest logit (ties go to the lowest index); `None` if every logit is
/// `-inf` or NaN.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    for (t, &l) in logits.iter().enumerate() {
        if l.is_nan() || l == f32::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((t as u32, l));
        }
    }
    best.map(|(t, _)| t)
}

/// Log-softmax of `logits` at `token`, and the `top_n` most likely tokens with their
/// log-probabilities (most likely first, ties to the lowest id).
pub fn logprobs(logits: &[f32], token: u32, top_n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|l| !l.is_nan())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    let log_z = f64::from(max) + sum.ln();
    let lp = |t: u32| -> f32 {
        let l = logits[t as usize];
        if l.is_nan() {
            f32::NEG_INFINITY
        } else {
            (f64::from(l) - log_z) as f32
        }
    };
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(top_n + 1);
    if top_n > 0 {
        for (t, &l) in logits.iter().enumerate() {
            if l.is_nan() {
                continue;
            }
            if top.len() == top_n && top.last().is_some_and(|&(_, worst)| l <= worst) {
                continue;
            }
            let pos = top.partition_point(|&(_, v)| v >= l);
            top.insert(pos, (t as u32, l));
            top.truncate(top_n);
        }
    }
    let top = top.into_iter().map(|(t, _)| (t, lp(t))).collect();
    (lp(token), top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams, vocab: usize) -> Sampler {
        Sampler::new(params, vocab, &[]).expect("valid params")
    }

    #[test]
    fn validation_rejects_out_of_range_parameters() {
        let bad = [
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                temperature: -0.5,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                top_p: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                min_p: -0.1,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..Default::default()
            },
            SamplingParams {
                frequency_penalty: -3.0,
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(10, 1.0)],
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(1, 101.0)],
                ..Default::default()
            },
            SamplingParams {
                top_logprobs: 21,
                ..Default::default()
            },
        ];
        for params in bad {
            let err = params.validate(10).expect_err("must be rejected");
            let msg = err.to_string();
            assert!(msg.starts_with("invalid sampling parameter"), "{msg}");
        }
        SamplingParams::default()
            .validate(10)
            .expect("defaults valid");
        SamplingParams::greedy().validate(10).expect("greedy valid");
    }

    #[test]
    fn greedy_picks_argmax_with_lowest_id_on_ties() {
        let mut s = sampler(SamplingParams::greedy(), 4);
        let mut logits = vec![1.0, 3.0, 3.0, -1.0];
        assert_eq!(s.sample(&mut logits, None).unwrap().token, 1);
    }

    #[test]
    fn logit_bias_changes_the_choice() {
        let params = SamplingParams {
            logit_bias: vec![(0, 5.0)],
            ..SamplingParams::greedy()
        };
        let mut s = sampler(params, 3);
        let mut logits = vec![1.0, 3.0, 2.0];
        assert_eq!(s.sample(&mut logits, None).unwrap().token, 0);
        // -100 bans a token in practice.
        let params = SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..SamplingParams::greedy()
        };
        let mut s = sampler(params, 3);
        let mut logits = vec![1.0, 3.0, 2.0];
        assert_eq!(s.sample(&mut logits, None).unwrap().token, 2);
    }

    #[test]
    fn mask_restricts_tokens_and_empty_mask_is_an_error() {
        let mut s = sampler(SamplingParams::greedy(), 40);
        let mut logits: Vec<f32> = (0..40).map(|i| i as f32).collect();
        // Allow only tokens 3 and 33.
        let mask = [1u32 << 3, 1u32 << 1];
        assert_eq!(s.sample(&mut logits, Some(&mask)).unwrap().token, 33);
        let mut logits: Vec<f32> = (0..40).map(|i| i as f32).collect();
        let mask = [1u32 << 3];
        assert_eq!(s.sample(&mut logits, Some(&mask)).unwrap().token, 3);
        let mut logits: Vec<f32> = (0..40).map(|i| i as f32).collect();
        assert_eq!(
            s.sample(&mut logits, Some(&[0, 0])),
            Err(SamplingError::NoAllowedToken)
        );
        // Sampling (not greedy) also respects the mask.
        let mut s = sampler(
            SamplingParams {
                seed: Some(1),
                ..Default::default()
            },
            40,
        );
        for _ in 0..50 {
            let mut logits = vec![0.0f32; 40];
            let t = s.sample(&mut logits, Some(&[1 << 5 | 1 << 7, 0])).unwrap();
            assert!(t.token == 5 || t.token == 7);
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut logits = vec![2.0, -2.0, 2.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 0, 1], 2.0);
        assert_eq!(logits, vec![1.0, -4.0, 2.0]);
        // The smallest penalty keeps logits finite.
        let mut logits = vec![100.0, -2.0];
        apply_repetition_penalty(&mut logits, &[0, 1], f32::MIN_POSITIVE);
        assert_eq!(logits, vec![f32::MAX, -2.0 * f32::MIN_POSITIVE]);
        // The window is the last `penalty_last_n` tokens of the context.
        let params = SamplingParams {
            repetition_penalty: 4.0,
            penalty_last_n: 1,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params, 3, &[0, 2]).unwrap();
        let mut logits = vec![3.0, 1.0, 2.5];
        // Token 2 is penalised (2.5 / 4), token 0 is outside the window.
        assert_eq!(s.sample(&mut logits, None).unwrap().token, 0);
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 1.0,
            ..SamplingParams::greedy()
        };
        let mut s = sampler(params, 2);
        s.accept(0);
        s.accept(0);
        let mut logits = vec![5.0, 3.0];
        s.process(&mut logits, None).unwrap();
        assert_eq!(logits, vec![5.0 - 0.5 - 2.0, 3.0]);
        let mut logits = vec![5.0, 3.0];
        assert_eq!(s.sample(&mut logits, None).unwrap().token, 1);
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let params = SamplingParams {
            top_k: 2,
            seed: Some(7),
            ..Default::default()
        };
        let mut s = sampler(params, 5);
        let mut seen = [0usize; 5];
        for _ in 0..400 {
            let mut logits = vec![1.0, 1.1, 0.9, 1.2, 0.0];
            seen[s.sample(&mut logits, None).unwrap().token as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[4], 0, "{seen:?}");
        assert!(seen[1] > 100 && seen[3] > 100, "{seen:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities 0.5, 0.3, 0.15, 0.05.
        let probs = [0.5f32, 0.3, 0.15, 0.05];
        let params = SamplingParams {
            top_p: 0.75,
            seed: Some(3),
            ..Default::default()
        };
        let mut s = sampler(params, 4);
        let mut seen = [0usize; 4];
        for _ in 0..500 {
            let mut logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
            seen[s.sample(&mut logits, None).unwrap().token as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[0] > seen[1] && seen[1] > 100, "{seen:?}");
        // A flat distribution over many tokens exercises the threshold search.
        let params = SamplingParams {
            top_p: 0.5,
            seed: Some(3),
            ..Default::default()
        };
        let mut s = sampler(params, 10_000);
        for _ in 0..20 {
            let mut logits = vec![0.0f32; 10_000];
            let t = s.sample(&mut logits, None).unwrap().token;
            // Ties are ordered by id, so the nucleus is the lower half.
            assert!(t < 5_000, "{t}");
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let params = SamplingParams {
            min_p: 0.5,
            seed: Some(11),
            ..Default::default()
        };
        let mut s = sampler(params, 3);
        for _ in 0..200 {
            // p ratios: 1, e^-0.5 = 0.61, e^-2 = 0.14.
            let mut logits = vec![0.0, -0.5, -2.0];
            assert_ne!(s.sample(&mut logits, None).unwrap().token, 2);
        }
    }

    #[test]
    fn a_tiny_repetition_penalty_with_a_temperature_still_samples() {
        let params = SamplingParams {
            temperature: 0.7,
            repetition_penalty: f32::MIN_POSITIVE,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params, 4, &[1, 2]).unwrap();
        // Token 1's positive logit divided by the penalty reaches f32::MAX.
        let mut logits = vec![0.5, 3.0, -2.0, 0.1];
        let sampled = sampler.sample(&mut logits, None).unwrap();
        assert_eq!(sampled.token, 1);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let count = |temperature: f32| {
            let params = SamplingParams {
                temperature,
                seed: Some(5),
                ..Default::default()
            };
            let mut s = sampler(params, 2);
            (0..1000)
                .filter(|_| {
                    let mut logits = vec![1.0, 0.0];
                    s.sample(&mut logits, None).unwrap().token == 0
                })
                .count()
        };
        let cold = count(0.1);
        let warm = count(1.0);
        let hot = count(10.0);
        assert!(cold > 990, "{cold}");
        // p(0) = 0.73 at temperature 1, 0.52 at temperature 10.
        assert!((680..790).contains(&warm), "{warm}");
        assert!((450..600).contains(&hot), "{hot}");
    }

    #[test]
    fn a_tiny_positive_temperature_is_greedy() {
        for temperature in [1e-45, 1e-30, 1e-6, 9e-5] {
            let params = SamplingParams {
                temperature,
                seed: Some(3),
                ..Default::default()
            };
            assert!(params.is_greedy(), "{temperature}");
            let mut s = sampler(params, 4);
            for _ in 0..20 {
                let mut logits = vec![0.5, 3.0, 2.9, -1.0];
                assert_eq!(s.sample(&mut logits, None).unwrap().token, 1);
            }
        }
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let run = |seed: u64| -> Vec<u32> {
            let params = SamplingParams {
                seed: Some(seed),
                ..Default::default()
            };
            let mut s = sampler(params, 50);
            (0..64)
                .map(|_| {
                    let mut logits = vec![0.0f32; 50];
                    s.sample(&mut logits, None).unwrap().token
                })
                .collect()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn logprobs_are_the_log_softmax_with_sorted_alternatives() {
        let params = SamplingParams {
            logprobs: true,
            top_logprobs: 2,
            ..SamplingParams::greedy()
        };
        let mut s = sampler(params, 3);
        let mut logits = vec![0.0, 2.0_f32.ln(), 0.0];
        let out = s.sample(&mut logits, None).unwrap();
        assert_eq!(out.token, 1);
        let lp = out.logprob.unwrap();
        assert!((lp - 0.5f32.ln()).abs() < 1e-6, "{lp}");
        assert_eq!(out.top_logprobs.len(), 2);
        assert_eq!(out.top_logprobs[0].0, 1);
        assert_eq!(out.top_logprobs[1].0, 0);
        assert!((out.top_logprobs[1].1 - 0.25f32.ln()).abs() < 1e-6);
        // Temperature is part of the processed distribution.
        let (lp, _) = logprobs(&[0.0, 0.0], 0, 0);
        assert!((lp - 0.5f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn wrong_logits_length_is_an_error() {
        let mut s = sampler(SamplingParams::greedy(), 3);
        let err = s.sample(&mut [0.0, 1.0], None).unwrap_err();
        assert_eq!(
            err,
            SamplingError::LogitsSize {
                expected: 3,
                got: 2
            }
        );
    }
}
