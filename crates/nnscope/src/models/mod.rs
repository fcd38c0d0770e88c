//! One file per architecture, each mirroring the Hugging Face modeling file it ports, and the table
//! that registers them.
//!
//! Adding an architecture: write `models/<arch>.rs` with a `load` function, add its row to
//! [`ARCHITECTURES`] (with its attention-probability hookpoint), and add its fixture under
//! `tests/fixtures/<arch>/`.

use crate::config::Config;
use crate::nn::Builder;
use candle_core::Tensor;

pub mod bloom;
pub mod dbrx;
pub mod gpt2;
pub mod gpt_oss;
pub mod gptj;
pub mod llama;
pub mod qwen2_moe;
pub mod stablelm;

/// A causal language model's forward pass.
pub trait CausalLM: Send + Sync {
    /// Logits [B, T, vocab] for `input_ids` [B, T] (and a 0/1 `attention_mask` [B, T]).
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor>;

    /// The attention-probability path from `attentions.L` when this model's config moves it away from
    /// the registry's (GPT-2 with `reorder_and_upcast_attn` computes them in
    /// `_upcast_and_reordered_attn`); `None` keeps [`Architecture::attention_probabilities`].
    fn attention_probabilities(&self) -> Option<&'static str> {
        None
    }
}

/// Builds a model from its config and weights.
pub type LoadFn = fn(&Config, Builder) -> crate::Result<Box<dyn CausalLM>>;

/// Shape of what the attention-probability hookpoint yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbShape {
    /// [B, H, Q, K], rows summing to 1.
    Standard,
    /// [B, H, Q, K + 1]: softmax over the scores plus one sink logit per head (the last column),
    /// rows summing to 1; the first K columns are what multiplies V.
    SinkColumn,
}

/// One row of the architecture registry.
#[derive(Debug)]
pub struct Architecture {
    /// config.json's `model_type`.
    pub model_type: &'static str,
    /// The Hugging Face class (`LlamaForCausalLM`).
    pub class: &'static str,
    /// Builds the model.
    pub load: LoadFn,
    /// Path of the attention probabilities from `attentions.L` (the seed's table, written out).
    pub attention_probabilities: &'static str,
    /// Shape of that hookpoint's value.
    pub prob_shape: ProbShape,
}

/// Every supported architecture.
pub const ARCHITECTURES: &[Architecture] = &[
    Architecture {
        model_type: "gpt2",
        class: "GPT2LMHeadModel",
        load: gpt2::load,
        attention_probabilities: "source.attention_interface_0.source.module_attn_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "llama",
        class: "LlamaForCausalLM",
        load: llama::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "mistral",
        class: "MistralForCausalLM",
        load: llama::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "qwen2",
        class: "Qwen2ForCausalLM",
        load: llama::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "qwen3",
        class: "Qwen3ForCausalLM",
        load: llama::load,
        attention_probabilities: "source.attention_interface_0.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "qwen2_moe",
        class: "Qwen2MoeForCausalLM",
        load: qwen2_moe::load,
        attention_probabilities: "source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "dbrx",
        class: "DbrxForCausalLM",
        load: dbrx::load,
        attention_probabilities: "attn.source.nn_functional_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "gpt_oss",
        class: "GptOssForCausalLM",
        load: gpt_oss::load,
        attention_probabilities: "source.attention_interface_0.source.F_softmax_0",
        prob_shape: ProbShape::SinkColumn,
    },
    Architecture {
        model_type: "gptj",
        class: "GPTJForCausalLM",
        load: gptj::load,
        attention_probabilities: "source.self__attn_0.source.self_attn_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "bloom",
        class: "BloomForCausalLM",
        load: bloom::load,
        attention_probabilities: "source.self_attention_dropout_0",
        prob_shape: ProbShape::Standard,
    },
    Architecture {
        model_type: "stablelm",
        class: "StableLmForCausalLM",
        load: stablelm::load,
        attention_probabilities: "source.self_attention_dropout_0",
        prob_shape: ProbShape::Standard,
    },
];

/// The registry row of a `model_type`.
pub fn architecture(model_type: &str) -> Option<&'static Architecture> {
    ARCHITECTURES.iter().find(|a| a.model_type == model_type)
}
