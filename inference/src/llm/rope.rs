//! Rotary position embedding (RoPE), with Llama 3.1 frequency factors and linear scaling.

use super::config::{LlmConfig, RopeStyle};

/// Rotation frequencies of one model.
#[derive(Clone, Debug)]
pub(crate) struct Rope {
    /// Angle per position of each rotated pair, `rope_dim / 2` values.
    inv_freq: Vec<f64>,
    style: RopeStyle,
    rope_dim: usize,
}

impl Rope {
    /// Frequencies `base^(-2i/rope_dim) / factor_i / linear_factor`; `freq_factors` are the
    /// Llama 3.1 `rope_freqs` values (one per pair) when the file has them.
    pub(crate) fn new(config: &LlmConfig, freq_factors: Option<&[f32]>) -> Rope {
        let half = config.rope_dim / 2;
        let base = f64::from(config.rope_base);
        let inv_freq = (0..half)
            .map(|i| {
                let theta = base.powf(-2.0 * i as f64 / config.rope_dim as f64);
                let factor = freq_factors
                    .and_then(|f| f.get(i))
                    .map_or(1.0, |&f| f64::from(f));
                theta / factor / f64::from(config.rope_linear_factor)
            })
            .collect();
        Rope {
            inv_freq,
            style: config.rope_style,
            rope_dim: config.rope_dim,
        }
    }

    /// Number of rotated pairs per head.
    pub(crate) fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// The pairing style.
    pub(crate) fn style(&self) -> RopeStyle {
        self.style
    }

    /// Fills `cos` and `sin` (`[n][half]`) for positions `pos0 .. pos0 + n`.
    #[cfg(test)]
    pub(crate) fn tables(&self, pos0: usize, n: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        cos.clear();
        sin.clear();
        self.append_tables(pos0, n, cos, sin);
    }

    /// Appends to `cos` and `sin` the `[n][half]` tables of positions `pos0 .. pos0 + n` (the
    /// sequences of a batch, one after the other).
    pub(crate) fn append_tables(
        &self,
        pos0: usize,
        n: usize,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        let half = self.half();
        cos.reserve(n * half);
        sin.reserve(n * half);
        for p in pos0..pos0 + n {
            for &f in &self.inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
    }

    /// Rotates one head `x` (`head_dim` values) with the angles of one position.
    #[inline]
    pub(crate) fn apply(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.half();
        match self.style {
            RopeStyle::Interleaved => {
                for i in 0..half {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = a * cos[i] - b * sin[i];
                    x[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            }
            RopeStyle::Neox => {
                let (lo, hi) = x[..self.rope_dim].split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::Architecture;
    use super::*;

    fn config(style: RopeStyle, rope_dim: usize) -> LlmConfig {
        LlmConfig {
            architecture: Architecture::Llama,
            n_layers: 1,
            d_model: 8,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 8,
            d_ff: 8,
            vocab_size: 4,
            train_context: 16,
            rms_eps: 1e-5,
            rope_base: 10_000.0,
            rope_dim,
            rope_style: style,
            rope_linear_factor: 1.0,
            qkv_bias: false,
            qk_norm: false,
            embed_scale: None,
            post_norms: false,
            ffn_activation: crate::llm::FfnActivation::Silu,
            sliding_window: None,
            global_every: 0,
            rope_base_local: None,
            tied_embeddings: true,
            rope_freq_factors: false,
        }
    }

    #[test]
    fn position_zero_is_identity_and_norm_is_preserved() {
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            let rope = Rope::new(&config(style, 8), None);
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            rope.tables(0, 3, &mut cos, &mut sin);
            let x: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
            let mut y = x.clone();
            rope.apply(&mut y, &cos[..4], &sin[..4]);
            assert_eq!(x, y);
            let mut z = x.clone();
            rope.apply(&mut z, &cos[8..12], &sin[8..12]);
            let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
            assert!((n(&x) - n(&z)).abs() < 1e-4);
            assert_ne!(x, z);
        }
    }

    #[test]
    fn styles_pair_different_dimensions() {
        // With only the first pair non-zero, interleaved rotates (x0, x1), neox (x0, x4).
        let x = [1.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let rope = Rope::new(&config(RopeStyle::Interleaved, 8), None);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        rope.tables(1, 1, &mut cos, &mut sin);
        let mut a = x;
        rope.apply(&mut a, &cos, &sin);
        assert!((a[0] - 1f32.cos()).abs() < 1e-6 && (a[1] - 1f32.sin()).abs() < 1e-6);
        let rope = Rope::new(&config(RopeStyle::Neox, 8), None);
        let mut b = x;
        rope.apply(&mut b, &cos, &sin);
        assert!((b[0] - 1f32.cos()).abs() < 1e-6 && (b[4] - 1f32.sin()).abs() < 1e-6);
        assert_eq!(b[1], 0.0);
    }

    #[test]
    fn freq_factors_and_linear_scaling_slow_the_rotation() {
        let rope = Rope::new(
            &config(RopeStyle::Interleaved, 8),
            Some(&[2.0, 1.0, 1.0, 1.0]),
        );
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        rope.tables(2, 1, &mut cos, &mut sin);
        // Pair 0 has base frequency 1: position 2 with factor 2 is angle 1.
        assert!((cos[0] - 1f32.cos()).abs() < 1e-6);
        let mut cfg = config(RopeStyle::Interleaved, 8);
        cfg.rope_linear_factor = 4.0;
        let rope = Rope::new(&cfg, None);
        rope.tables(4, 1, &mut cos, &mut sin);
        assert!((sin[0] - 1f32.sin()).abs() < 1e-6);
    }
}
