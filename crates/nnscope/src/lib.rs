//! # nnscope
//!
//! Mechanistic interpretability for transformer language models, natively in Rust on candle.
//!
//! - Loads Hugging Face checkpoints ([`hub`]) and runs them with transformers' numerics ([`models`]).
//! - Every call inside a model's forward is a hookpoint named as nnsight names `.source` operations
//!   (`attention_interface_0`, `nn_functional_dropout_0`, ...), which a [`Trace`] can save, replace or
//!   edit; the requests resolve into a reusable [`Plan`] run by the core ([`trace`]).
//! - Standard names on every architecture (`layers_output.3`, `attention_probabilities.0`, ...)
//!   ([`standard`]).
//!
//! ```no_run
//! use nnscope::{Model, Input};
//! let model = Model::load("tests/fixtures/llama", &Default::default())?;
//! let out = model
//!     .trace(Input::prompts(&["The quick brown fox"]))
//!     .save("attention_probabilities.0")?
//!     .run()?;
//! println!("{:?}", out.get("attention_probabilities.0")?.dims());
//! # Ok::<(), nnscope::Error>(())
//! ```

// The instrumentation macro emits `::nnscope::...` paths; this makes them resolve inside this crate.
extern crate self as nnscope;

mod alloc;
pub mod collect;
pub mod config;
pub mod discover;
mod error;
pub mod experiments;
pub mod generate;
pub mod hub;
mod model;
pub mod models;
pub mod nn;
pub mod sae;
mod session;
pub mod standard;
pub mod trace;
pub mod viewer;

pub use alloc::keep_freed_memory;
pub use error::{nearest, strip_backtrace, Error, HubErrorKind, Result};
pub use generate::{GenerateOptions, GenerateOutput};
pub use model::{Input, LoadOptions, Model};
pub use sae::Sae;
pub use session::{Attach, Clamp, PlanBuilder, Trace, TraceOutput};
pub use trace::{Plan, StepOutput, Steps};

/// What `#[hooked]` code calls at run time. Not a public API.
#[doc(hidden)]
pub mod __rt {
    pub use crate::nn::ops::matmul;
    pub use crate::trace::rt::*;
    pub use candle_core::Tensor;
}
