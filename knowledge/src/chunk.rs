//! Chunking along the structure of a document (Markdown headings, paragraphs, sentences, words)
//! with the `text-splitter` crate, sized by the embedder's own token counter so that no chunk
//! exceeds what the model reads, with an overlap between neighbours.

use serde::{Deserialize, Serialize};
use text_splitter::{Characters, ChunkConfig, ChunkSizer, MarkdownSplitter, TextSplitter};

use crate::embedder::Embedder;

/// What chunk sizes are measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeUnit {
    /// Tokens of the embedding model's tokenizer ([`Embedder::count_tokens`]).
    Tokens,
    /// Unicode scalar values, used when the embedder has no token limit.
    Characters,
}

impl SizeUnit {
    pub(crate) fn code(self) -> u8 {
        match self {
            SizeUnit::Tokens => 1,
            SizeUnit::Characters => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(SizeUnit::Tokens),
            2 => Some(SizeUnit::Characters),
            _ => None,
        }
    }
}

/// Name of the splitting algorithm, recorded in manifests so that a change of algorithm shows.
pub const SPLITTER: &str = "text-splitter 0.33: markdown for markdown and html, text otherwise";

/// Default chunk size in tokens when the embedder allows more.
pub const DEFAULT_CHUNK_TOKENS: usize = 256;
/// Default chunk size in characters when the embedder has no token limit.
pub const DEFAULT_CHUNK_CHARS: usize = 1000;

/// How documents are cut into chunks; fixed when a knowledge base is created and recorded in its
/// manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkingParams {
    /// What `max_size` and `overlap` count.
    pub unit: SizeUnit,
    /// The largest chunk.
    pub max_size: usize,
    /// How much of the previous chunk is repeated at the start of the next one.
    pub overlap: usize,
    /// The splitting algorithm ([`SPLITTER`]).
    pub splitter: String,
}

/// The requested chunking does not fit the embedder.
#[derive(Debug, thiserror::Error)]
pub enum ChunkingError {
    /// The chunk size is zero or larger than the model reads.
    #[error(
        "chunk size {requested} {unit:?} is not possible: it must be between 1 and {limit}, the \
         embedding model's input limit"
    )]
    SizeOutOfRange {
        /// The requested size.
        requested: usize,
        /// Its unit.
        unit: SizeUnit,
        /// The largest possible size.
        limit: usize,
    },
    /// The overlap is not smaller than the chunk size.
    #[error(
        "chunk overlap {overlap} must be smaller than the chunk size {size}; choose a smaller overlap"
    )]
    OverlapTooLarge {
        /// The requested overlap.
        overlap: usize,
        /// The chunk size.
        size: usize,
    },
}

impl ChunkingParams {
    /// Parameters for `embedder`: chunks of `size` (default: the model's input limit capped at
    /// [`DEFAULT_CHUNK_TOKENS`], or [`DEFAULT_CHUNK_CHARS`] characters) with `overlap` (default
    /// one eighth of the size).
    pub fn for_embedder(
        embedder: &dyn Embedder,
        size: Option<usize>,
        overlap: Option<usize>,
    ) -> Result<Self, ChunkingError> {
        let (unit, limit, default) = match embedder.max_input_tokens() {
            Some(limit) => (SizeUnit::Tokens, limit, limit.min(DEFAULT_CHUNK_TOKENS)),
            None => (SizeUnit::Characters, 1 << 20, DEFAULT_CHUNK_CHARS),
        };
        let max_size = size.unwrap_or(default);
        if max_size == 0 || max_size > limit {
            return Err(ChunkingError::SizeOutOfRange {
                requested: max_size,
                unit,
                limit,
            });
        }
        let overlap = overlap.unwrap_or(max_size / 8);
        if overlap >= max_size {
            return Err(ChunkingError::OverlapTooLarge {
                overlap,
                size: max_size,
            });
        }
        Ok(Self {
            unit,
            max_size,
            overlap,
            splitter: SPLITTER.to_string(),
        })
    }
}

/// Sizes chunks with the embedder's tokenizer.
struct TokenSizer<'a>(&'a dyn Embedder);

impl ChunkSizer for TokenSizer<'_> {
    fn size(&self, chunk: &str) -> usize {
        self.0.count_tokens(chunk)
    }
}

/// One piece of a document: byte offsets into the extracted text and the text itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Piece<'a> {
    pub(crate) start: usize,
    pub(crate) text: &'a str,
}

/// Cuts `text` into pieces. `markdown` selects the Markdown-aware splitter. Pieces are trimmed of
/// surrounding whitespace; empty pieces are dropped.
pub(crate) fn split<'t>(
    text: &'t str,
    markdown: bool,
    params: &ChunkingParams,
    embedder: &dyn Embedder,
) -> Result<Vec<Piece<'t>>, ChunkingError> {
    fn run<'t, S: ChunkSizer>(
        text: &'t str,
        markdown: bool,
        config: ChunkConfig<S>,
    ) -> Vec<Piece<'t>> {
        let pieces: Vec<(usize, &str)> = if markdown {
            MarkdownSplitter::new(config).chunk_indices(text).collect()
        } else {
            TextSplitter::new(config).chunk_indices(text).collect()
        };
        pieces
            .into_iter()
            .filter(|(_, t)| !t.trim().is_empty())
            .map(|(start, text)| Piece { start, text })
            .collect()
    }
    let overlap_error = |_| ChunkingError::OverlapTooLarge {
        overlap: params.overlap,
        size: params.max_size,
    };
    Ok(match params.unit {
        SizeUnit::Tokens => {
            let config = ChunkConfig::new(params.max_size)
                .with_sizer(TokenSizer(embedder))
                .with_overlap(params.overlap)
                .map_err(overlap_error)?;
            run(text, markdown, config)
        }
        SizeUnit::Characters => {
            let config = ChunkConfig::new(params.max_size)
                .with_sizer(Characters)
                .with_overlap(params.overlap)
                .map_err(overlap_error)?;
            run(text, markdown, config)
        }
    })
}

#[cfg(all(test, feature = "test-utils"))]
mod tests {
    use super::*;
    use crate::testing::ToyEmbedder;

    #[test]
    fn chunks_respect_the_token_limit_and_offsets_point_into_the_text() {
        let embedder = ToyEmbedder::new();
        let params = ChunkingParams::for_embedder(&embedder, Some(20), Some(10)).unwrap();
        let mut text = String::from("# Title\n\n");
        for i in 0..40 {
            text.push_str(&format!("Sentence number {i} talks about bees and honey. "));
            if i % 5 == 4 {
                text.push_str("\n\n");
            }
        }
        let pieces = split(&text, true, &params, &embedder).unwrap();
        assert!(pieces.len() > 5);
        for p in &pieces {
            assert!(
                embedder.count_tokens(p.text) <= 20,
                "too long: {:?}",
                p.text
            );
            assert_eq!(&text[p.start..p.start + p.text.len()], p.text);
        }
        // Overlap: consecutive pieces share text.
        let shared = pieces
            .windows(2)
            .filter(|w| w[1].start < w[0].start + w[0].text.len())
            .count();
        assert!(shared > 0, "no overlapping pieces: {pieces:#?}");
    }

    #[test]
    fn markdown_splitting_keeps_sections_apart() {
        let embedder = ToyEmbedder::new();
        let params = ChunkingParams::for_embedder(&embedder, Some(10), Some(0)).unwrap();
        let text = "# Bees\n\nBees make honey in hives.\n\n# Tides\n\nThe moon pulls the oceans.";
        let pieces = split(text, true, &params, &embedder).unwrap();
        assert!(
            pieces
                .iter()
                .all(|p| !(p.text.contains("honey") && p.text.contains("moon")))
        );
    }

    #[test]
    fn invalid_parameters_are_refused() {
        let embedder = ToyEmbedder::new();
        let limit = embedder.max_input_tokens().unwrap();
        assert!(matches!(
            ChunkingParams::for_embedder(&embedder, Some(limit + 1), None),
            Err(ChunkingError::SizeOutOfRange { .. })
        ));
        assert!(matches!(
            ChunkingParams::for_embedder(&embedder, Some(10), Some(10)),
            Err(ChunkingError::OverlapTooLarge { .. })
        ));
        let p = ChunkingParams::for_embedder(&embedder, None, None).unwrap();
        assert_eq!(p.unit, SizeUnit::Tokens);
        assert!(p.overlap < p.max_size);
    }
}
