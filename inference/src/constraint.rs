//! Constrained decoding with `llguidance`: JSON schemas, regular expressions and Lark grammars
//! turned into a per-step mask over the vocabulary.
//!
//! A [`ConstraintFactory`] is built once per model from the [`Tokenizer`]'s vocabulary bytes (a
//! token trie; special tokens are marked the llguidance way, a `0xFF` byte before their text, so a
//! grammar never produces them by accident) and the end-of-generation tokens. Building it takes a
//! moment (it precomputes token classes), so keep it next to the model. Each request then gets a
//! [`Constraint`]:
//!
//! ```text
//! loop {
//!     let mask = constraint.compute_mask()?;      // which ids may come next
//!     mask.apply_to_logits(&mut logits);          // disallowed -> -inf
//!     let id = sample(&logits);
//!     constraint.commit_token(id)?;
//!     if tokenizer.is_eos(id) || constraint.is_finished() { break }
//! }
//! ```
//!
//! When the grammar is complete the mask allows the end-of-generation tokens (and nothing else,
//! once nothing can follow). JSON schemas get flexible whitespace bounded to 24 characters between
//! tokens (a schema's own `x-guidance` options take precedence), so a small model cannot loop on
//! newlines forever.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value as Json;

use crate::tokenizer::{Tokenizer, VocabKind};

/// Whitespace allowed between JSON tokens when the schema does not say otherwise.
const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,24}";

/// Errors of constrained decoding.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The token environment could not be built.
    #[error("failed to prepare constrained decoding for this vocabulary: {0}")]
    Init(String),
    /// The JSON schema is invalid or uses unsupported features.
    #[error("invalid or unsupported JSON schema: {0}")]
    InvalidSchema(String),
    /// The regular expression is invalid.
    #[error("invalid regular expression: {0}")]
    InvalidRegex(String),
    /// The Lark grammar is invalid.
    #[error("invalid Lark grammar: {0}")]
    InvalidGrammar(String),
    /// A token that the mask did not allow was committed.
    #[error("token {id} is not allowed by the constraint at this point; sample from the mask")]
    Rejected {
        /// The token.
        id: u32,
    },
    /// The matcher failed (e.g. a lexer limit was hit).
    #[error("constrained decoding failed: {0}")]
    Matcher(String),
}

/// The token environment llguidance sees: our vocabulary as bytes, tokenized by our tokenizer.
struct TokEnv {
    tokenizer: Tokenizer,
    trie: TokTrie,
}

impl TokenizerEnv for TokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode_continuation(text)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }

    fn tokenize_is_canonical(&self) -> bool {
        matches!(self.tokenizer.kind(), VocabKind::BytePairGpt2(_))
    }
}

/// Compiles constraints for one vocabulary. Cheap to clone; share it between requests.
#[derive(Clone)]
pub struct ConstraintFactory {
    factory: Arc<ParserFactory>,
    vocab_size: usize,
    eos_tokens: Arc<[u32]>,
}

impl std::fmt::Debug for ConstraintFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintFactory")
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

impl ConstraintFactory {
    /// Builds the token trie and llguidance's parser factory for `tokenizer`'s vocabulary.
    pub fn new(tokenizer: &Tokenizer) -> Result<ConstraintFactory, ConstraintError> {
        let n = tokenizer.vocab_size();
        let vocab_size =
            u32::try_from(n).map_err(|_| ConstraintError::Init("vocabulary too large".into()))?;
        let eos_tokens = tokenizer.eos_tokens();
        let primary_eos = tokenizer
            .eos()
            .or_else(|| eos_tokens.first().copied())
            .ok_or_else(|| {
                ConstraintError::Init("the vocabulary has no end-of-generation token".into())
            })?;
        let words: Vec<Vec<u8>> = (0..vocab_size)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                if tokenizer.is_special(id) {
                    let mut w = Vec::with_capacity(bytes.len() + 1);
                    w.push(TokTrie::SPECIAL_TOKEN_MARKER);
                    w.extend_from_slice(bytes);
                    w
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let info = TokRxInfo {
            vocab_size,
            tok_eos: primary_eos,
            tok_bos: tokenizer.bos(),
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: tokenizer.eot(),
        };
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos_tokens);
        let env: toktrie::TokEnv = Arc::new(TokEnv {
            tokenizer: tokenizer.clone(),
            trie,
        });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| ConstraintError::Init(e.to_string()))?;
        factory.quiet();
        Ok(ConstraintFactory {
            factory: Arc::new(factory),
            vocab_size: n,
            eos_tokens: eos_tokens.into(),
        })
    }

    /// Number of tokens the masks cover.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Output must be JSON valid against `schema`.
    pub fn json_schema(&self, schema: &Json) -> Result<Constraint, ConstraintError> {
        if !schema.is_object() && !schema.is_boolean() {
            return Err(ConstraintError::InvalidSchema(
                "a JSON schema must be an object (or true/false)".into(),
            ));
        }
        let mut schema = schema.clone();
        if let Some(obj) = schema.as_object_mut()
            && !obj.contains_key("x-guidance")
        {
            obj.insert(
                "x-guidance".into(),
                serde_json::json!({ "whitespace_pattern": JSON_WHITESPACE }),
            );
        }
        self.create(
            TopLevelGrammar::from_json_schema(schema),
            ConstraintError::InvalidSchema,
        )
    }

    /// Output must be a JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    pub fn json_object(&self) -> Result<Constraint, ConstraintError> {
        self.json_schema(&serde_json::json!({ "type": "object" }))
    }

    /// Output must match the regular expression (anchored at both ends).
    pub fn regex(&self, regex: &str) -> Result<Constraint, ConstraintError> {
        self.create(
            TopLevelGrammar::from_regex(regex),
            ConstraintError::InvalidRegex,
        )
    }

    /// Output must be derivable from the Lark grammar's `start` rule.
    pub fn lark(&self, grammar: &str) -> Result<Constraint, ConstraintError> {
        self.create(
            TopLevelGrammar::from_lark(grammar.to_owned()),
            ConstraintError::InvalidGrammar,
        )
    }

    fn create(
        &self,
        grammar: TopLevelGrammar,
        err: fn(String) -> ConstraintError,
    ) -> Result<Constraint, ConstraintError> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| err(first_sentence(&e.to_string())))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(err(first_sentence(&e)));
        }
        // A grammar that admits nothing (a schema that only refers to itself) fails at its
        // first mask: refuse it here, as the request's error, not in the middle of a
        // generation.
        if let Err(e) = matcher.compute_mask_or_eos() {
            return Err(err(matcher_message(&e.to_string())));
        }
        Ok(Constraint {
            matcher,
            vocab_size: self.vocab_size,
            eos_tokens: self.eos_tokens.clone(),
        })
    }
}

/// The first line of a compiler message, at most 200 bytes: llguidance may follow it with its
/// parser's state, which means nothing to a client.
fn first_sentence(message: &str) -> String {
    let line = message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown error");
    let mut end = line.len().min(200);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    let cut = &line[..end];
    let cut = cut.trim_end_matches(|c: char| c == '.' || c == ':' || c.is_whitespace());
    if end < line.len() {
        format!("{cut}…")
    } else {
        cut.to_string()
    }
}

/// A matcher failure as one sentence: its first line, with llguidance's stop reasons named
/// in words.
fn matcher_message(message: &str) -> String {
    let first = first_sentence(message);
    match first.as_str() {
        "NoExtensionBias" | "NoExtension" => {
            "it admits no output at all (no value can satisfy it: a `$ref` cycle with \
             nothing to end it, or contradictory constraints)"
                .to_string()
        }
        _ => first,
    }
}

/// The state of one constrained generation.
pub struct Constraint {
    matcher: Matcher,
    vocab_size: usize,
    eos_tokens: Arc<[u32]>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("finished", &self.matcher.is_stopped())
            .field("error", &self.matcher.get_error())
            .finish()
    }
}

impl Constraint {
    /// See [`ConstraintFactory::json_schema`].
    pub fn json_schema(
        factory: &ConstraintFactory,
        schema: &Json,
    ) -> Result<Constraint, ConstraintError> {
        factory.json_schema(schema)
    }

    /// See [`ConstraintFactory::json_object`].
    pub fn json_object(factory: &ConstraintFactory) -> Result<Constraint, ConstraintError> {
        factory.json_object()
    }

    /// See [`ConstraintFactory::regex`].
    pub fn regex(factory: &ConstraintFactory, regex: &str) -> Result<Constraint, ConstraintError> {
        factory.regex(regex)
    }

    /// See [`ConstraintFactory::lark`].
    pub fn lark(factory: &ConstraintFactory, grammar: &str) -> Result<Constraint, ConstraintError> {
        factory.lark(grammar)
    }

    /// The tokens allowed next. Once the output is complete only end-of-generation tokens are
    /// allowed.
    pub fn compute_mask(&mut self) -> Result<TokenMask, ConstraintError> {
        let vob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| ConstraintError::Matcher(matcher_message(&e.to_string())))?;
        Ok(TokenMask {
            vob,
            vocab_size: self.vocab_size,
        })
    }

    /// Advances past a sampled token (which must have been allowed by the last mask).
    pub fn commit_token(&mut self, id: u32) -> Result<(), ConstraintError> {
        if self.matcher.is_stopped() {
            // A finished grammar only allows end-of-generation tokens, which end nothing more.
            return if self.eos_tokens.contains(&id) {
                Ok(())
            } else {
                Err(ConstraintError::Rejected { id })
            };
        }
        match self.matcher.try_consume_tokens(&[id]) {
            Ok(1) => Ok(()),
            Ok(_) => Err(ConstraintError::Rejected { id }),
            Err(e) => Err(ConstraintError::Matcher(matcher_message(&e.to_string()))),
        }
    }

    /// Tokens the grammar forces next, without choice (may be empty). Committing them skips
    /// sampling steps.
    pub fn forced_tokens(&mut self) -> Vec<u32> {
        self.matcher.compute_ff_tokens()
    }

    /// Whether the output so far is complete (an end-of-generation token would be accepted).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// Whether nothing more can be generated (an end-of-generation token was committed or the
    /// grammar cannot continue).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// The set of token ids allowed at one step.
#[derive(Debug, Clone)]
pub struct TokenMask {
    vob: toktrie::SimpleVob,
    vocab_size: usize,
}

impl TokenMask {
    /// Whether `id` is allowed.
    pub fn is_allowed(&self, id: u32) -> bool {
        (id as usize) < self.vocab_size && self.vob.is_allowed(id)
    }

    /// Number of allowed ids.
    pub fn count_allowed(&self) -> usize {
        let mut n = 0;
        self.vob.iter_set_entries(|i| {
            if i < self.vocab_size {
                n += 1;
            }
        });
        n
    }

    /// The allowed ids, ascending.
    pub fn allowed_ids(&self) -> Vec<u32> {
        let mut ids = Vec::new();
        self.vob.iter_set_entries(|i| {
            if i < self.vocab_size {
                ids.push(i as u32);
            }
        });
        ids
    }

    /// Sets the logit of every disallowed id to negative infinity. Logits beyond the vocabulary
    /// (models often pad their output layer) are disallowed.
    pub fn apply_to_logits(&self, logits: &mut [f32]) {
        for (i, l) in logits.iter_mut().enumerate() {
            if i >= self.vocab_size || !self.vob.get(i) {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// The mask as little-endian bit words (bit `i % 32` of word `i / 32` is id `i`), for upload
    /// to an accelerator.
    pub fn as_words(&self) -> &[u32] {
        self.vob.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    use super::*;
    use crate::tokenizer::test_support::default_model;

    fn factory() -> &'static ConstraintFactory {
        static F: OnceLock<ConstraintFactory> = OnceLock::new();
        F.get_or_init(|| ConstraintFactory::new(&default_model().1).expect("factory"))
    }

    #[test]
    fn schemas_that_cannot_compile_get_one_clean_sentence() {
        for schema in [
            json!({"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}),
            json!({"$ref": "#/$defs/missing"}),
            json!({"type": "frobnicate"}),
            json!({"$ref": "#"}),
            json!({"anyOf": [{"$ref": "#"}]}),
            json!({"type": "array", "items": {"$ref": "#"}, "minItems": 1}),
        ] {
            match factory().json_schema(&schema) {
                Ok(mut c) => {
                    // Accepted: it may still fail when decoding starts; then also one line.
                    if let Err(e) = c.compute_mask() {
                        let message = e.to_string();
                        assert!(
                            !message.contains('\n') && message.len() <= 260,
                            "{schema}: {message:?}"
                        );
                        eprintln!("{schema} (mask): {message}");
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    assert!(
                        !message.contains('\n') && message.len() <= 260,
                        "{schema}: {message:?}"
                    );
                    eprintln!("{schema}: {message}");
                }
            }
        }
        assert_eq!(first_sentence("bad thing.\nstate: 1 2 3"), "bad thing");
        assert_eq!(first_sentence(&"x".repeat(300)).chars().count(), 201);
    }

    /// A fake model: picks uniformly among the allowed tokens until an end-of-generation token.
    fn generate(c: &mut Constraint, rng: &mut StdRng, max_tokens: usize) -> String {
        generate_weighted(c, rng, max_tokens, |_| 1)
    }

    /// A fake model that picks among the allowed tokens with the given weights.
    fn generate_weighted(
        c: &mut Constraint,
        rng: &mut StdRng,
        max_tokens: usize,
        weight: impl Fn(u32) -> u32,
    ) -> String {
        let tok = &default_model().1;
        let mut ids = Vec::new();
        for _ in 0..max_tokens {
            let mask = c.compute_mask().expect("mask");
            let allowed = mask.allowed_ids();
            assert!(
                !allowed.is_empty(),
                "empty mask after {:?}",
                tok.decode(&ids, false)
            );
            let total: u64 = allowed.iter().map(|&i| u64::from(weight(i))).sum();
            let mut pick = rng.gen_range(0..total);
            let mut id = allowed[0];
            for &i in &allowed {
                let w = u64::from(weight(i));
                if pick < w {
                    id = i;
                    break;
                }
                pick -= w;
            }
            assert!(mask.is_allowed(id));
            if tok.is_eos(id) {
                assert!(
                    c.is_accepting(),
                    "EOS allowed before the output is complete"
                );
                c.commit_token(id).expect("commit eos");
                assert!(c.is_finished());
                return tok.decode(&ids, false);
            }
            c.commit_token(id).expect("commit");
            ids.push(id);
        }
        panic!(
            "no end after {max_tokens} tokens: {:?}",
            tok.decode(&ids, false)
        );
    }

    #[test]
    fn random_generations_satisfy_json_schemas() {
        let schemas = [
            json!({"type": "object",
                   "properties": {"name": {"type": "string", "maxLength": 20},
                                  "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                   "required": ["name", "age"], "additionalProperties": false}),
            json!({"type": "object",
                   "properties": {"color": {"enum": ["red", "green", "blue"]},
                                  "size": {"type": "string", "enum": ["S", "M", "L", "XL"]}},
                   "required": ["color", "size"], "additionalProperties": false}),
            json!({"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                   "minItems": 1, "maxItems": 6}),
            json!({"type": "object",
                   "properties": {
                       "user": {"type": "object",
                                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99999},
                                               "tags": {"type": "array", "maxItems": 3,
                                                        "items": {"type": "string", "maxLength": 8}}},
                                "required": ["id", "tags"], "additionalProperties": false},
                       "active": {"type": "boolean"}},
                   "required": ["user", "active"], "additionalProperties": false}),
            json!({"type": "object",
                   "properties": {"temp": {"type": "number", "minimum": -40, "maximum": 60},
                                  "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                                  "count": {"type": "integer", "minimum": 10, "maximum": 20}},
                   "required": ["temp", "ratio", "count"], "additionalProperties": false}),
        ];
        let mut rng = StdRng::seed_from_u64(0x6a1a);
        let mut n = 0;
        for schema in &schemas {
            let validator = jsonschema::validator_for(schema).expect("valid test schema");
            for _ in 0..10 {
                let mut c = factory().json_schema(schema).expect("constraint");
                let text = generate(&mut c, &mut rng, 2000);
                let value: Json = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
                assert!(validator.is_valid(&value), "{text:?} violates {schema}");
                n += 1;
            }
        }
        assert_eq!(n, 50);
    }

    #[test]
    fn json_object_mode() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..3 {
            let mut c = Constraint::json_object(factory()).expect("constraint");
            // Uniform sampling would write strings forever; favour tokens that close things.
            let tok = &default_model().1;
            let closing = |id: u32| {
                let b = tok.token_bytes(id);
                if tok.is_eos(id) || b.iter().any(|c| matches!(c, b'"' | b'}' | b']')) {
                    2000
                } else {
                    1
                }
            };
            let text = generate_weighted(&mut c, &mut rng, 4000, closing);
            let v: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
            assert!(v.is_object(), "{text:?}");
        }
    }

    #[test]
    fn regex_constraints() {
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..10 {
            let mut c = Constraint::regex(factory(), "(yes|no|maybe)").expect("constraint");
            let text = generate(&mut c, &mut rng, 20);
            assert!(["yes", "no", "maybe"].contains(&text.as_str()), "{text:?}");
        }
        for _ in 0..10 {
            let mut c = factory().regex("[0-9]{3}-[a-z]{2,5}").expect("constraint");
            let text = generate(&mut c, &mut rng, 50);
            let (digits, letters) = text.split_once('-').unwrap_or_else(|| panic!("{text:?}"));
            assert!(
                digits.len() == 3 && digits.bytes().all(|b| b.is_ascii_digit()),
                "{text:?}"
            );
            assert!((2..=5).contains(&letters.len()), "{text:?}");
            assert!(letters.bytes().all(|b| b.is_ascii_lowercase()), "{text:?}");
        }
    }

    #[test]
    fn lark_constraints() {
        let grammar = r#"
            start: sum
            sum: NUMBER (OP NUMBER)*
            OP: "+" | "-"
            NUMBER: /[0-9]{1,3}/
        "#;
        let mut rng = StdRng::seed_from_u64(13);
        for _ in 0..10 {
            let mut c = Constraint::lark(factory(), grammar).expect("constraint");
            let text = generate(&mut c, &mut rng, 400);
            for part in text.split(['+', '-']) {
                assert!((1..=3).contains(&part.len()), "{text:?}");
                assert!(part.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
            }
        }
    }

    #[test]
    fn constraint_types_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<ConstraintFactory>();
        send::<Constraint>();
        send_sync::<TokenMask>();
    }

    #[test]
    fn invalid_grammars_are_clear_errors() {
        let f = factory();
        let e = f.json_schema(&json!({"type": "nonsense"})).unwrap_err();
        assert!(matches!(e, ConstraintError::InvalidSchema(_)), "{e}");
        let e = f.json_schema(&json!([1, 2])).unwrap_err();
        assert!(matches!(e, ConstraintError::InvalidSchema(_)), "{e}");
        let e = f.regex("(unclosed").unwrap_err();
        assert!(matches!(e, ConstraintError::InvalidRegex(_)), "{e}");
        let e = f.lark("start: undefined_rule").unwrap_err();
        assert!(matches!(e, ConstraintError::InvalidGrammar(_)), "{e}");
    }

    #[test]
    fn masks_reject_and_pad() {
        let tok = &default_model().1;
        let mut c = factory().regex("[a-c]+").expect("constraint");
        let mask = c.compute_mask().expect("mask");
        let a = tok.encode("a", false).expect("encode")[0];
        let z = tok.encode("z", false).expect("encode")[0];
        assert!(mask.is_allowed(a) && !mask.is_allowed(z));
        assert!(!mask.is_allowed(u32::MAX));
        assert!(mask.as_words().len() * 32 >= tok.vocab_size());
        let mut logits = vec![0.0f32; tok.vocab_size() + 64];
        mask.apply_to_logits(&mut logits);
        assert_eq!(
            logits.iter().filter(|l| l.is_finite()).count(),
            mask.count_allowed()
        );
        assert!(
            logits[tok.vocab_size()..]
                .iter()
                .all(|l| *l == f32::NEG_INFINITY)
        );
        assert!(matches!(
            c.commit_token(z),
            Err(ConstraintError::Rejected { .. })
        ));
        c.commit_token(a).expect("commit a");
        assert!(c.is_accepting());
        // A fully determined output is forced, in the tokenizer's canonical tokenization.
        let mut c = factory().regex("abc").expect("constraint");
        let forced = c.forced_tokens();
        assert_eq!(forced, tok.encode("abc", false).expect("encode"));
        for id in forced {
            c.commit_token(id).expect("commit forced");
        }
        assert!(c.is_accepting());
    }
}
