//! Thin torch-like building blocks over candle, instrumented like model code.
//!
//! The names mirror `torch.nn` so that ported model code reads like the Python it comes from:
//! `nn::Linear`, `nn::LayerNorm`, `nn::functional::softmax`, `nn::functional::dropout`.

mod activation;
mod amx;
mod attention;
mod blas;
mod builder;
mod cache;
mod cpu;
pub mod functional;
mod gemm_f32;
mod gemma_norm;
mod layers;
pub mod mask;
pub(crate) mod mmap;
pub mod moe;
mod olmo_norm;
pub mod ops;
pub mod rope;
mod scaled_embedding;

pub use crate::trace::{ModuleEntry, ModuleTable};
pub use activation::{Activation, ACTIVATION_NAMES as ACTIVATION_NAMES_LIST};
pub use attention::repeat_kv;
pub use builder::Builder;
pub use cache::{past_len, positions_from_mask, KvCache};
pub use gemma_norm::GemmaRmsNorm;
pub(crate) use layers::last_position_only;
pub use layers::{
    gemm_backend, gemm_backend_bf16, linear_matmul, prepare_linear_weight, Conv1D, Dropout,
    Embedding, LayerNorm, Linear, RmsNorm,
};
pub use olmo_norm::{Olmo2RmsNorm, OlmoLayerNorm};
pub use scaled_embedding::ScaledWordEmbedding;
