//! The trace core: hookpoints, paths, plans. It knows no architecture and no standard name.
//!
//! A hookpoint path reads like nnsight:
//! `model.layers.0.self_attn.source.attention_interface_0.source.nn_functional_dropout_0.output`.
//! A network implements [`Target`] (module table, recorded call structure, name expansion); paths
//! resolve against it into a [`Plan`] of requests, which [`Plan::run`] serves during any number of
//! forwards. The user-facing builder (`Model::trace`) and standard names live above this module.

mod listing;
pub mod path;
pub mod pattern;
pub mod plan;
pub(crate) mod requests;
pub mod rt;
pub mod structure;
mod table;
mod target;
mod value;

pub use listing::listing;
pub use nnscope_macros::hooked;
pub use path::{HookPath, Terminal};
pub use plan::{Action, DeriveFn, EditFn, Plan, Request, StepOutput, Steps, View};
pub use requests::Kind;
pub use rt::{FnInfo, HookedForward, Scope};
pub use structure::Structure;
pub use table::{ModuleEntry, ModuleTable};
pub use target::Target;
pub use value::Value;
