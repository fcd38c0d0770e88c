//! What the core needs to know about a traced network, and nothing more: [`Target`].
//!
//! The trace core knows no architecture and no standard name. A network (nnscope's `Model`)
//! implements this trait: it gives its module table, records its call structure by running a
//! forward the core watches, expands its own names (standard names) before paths are resolved, and
//! estimates the size of a saved value for the memory check.

use super::path::HookPath;
use super::plan::View;
use super::structure::Structure;
use super::table::ModuleTable;
use crate::Result;
use candle_core::{DType, Device};

/// A network the trace core can resolve paths against and plan for.
pub trait Target {
    /// The module tree (each module's path and `forward`).
    fn module_table(&self) -> &ModuleTable;

    /// The recorded call structure of the forward. Implementers record it once with
    /// [`Structure::record`], giving it a closure that runs a short forward, and keep it.
    fn call_structure(&self) -> Result<&Structure>;

    /// Rewrites a path before it is resolved (standard names into module paths). The identity by
    /// default.
    fn expand_path(&self, path: &str) -> Result<String> {
        Ok(path.to_string())
    }

    /// The view a name is read and written through, when it names a reshaped value (the identity
    /// when `None`, the default). Called with the path as given, before [`Target::expand_path`].
    fn value_view(&self, _path: &str) -> Result<Option<View>> {
        Ok(None)
    }

    /// Names besides module paths that a path may start with, offered as suggestions when a path
    /// names nothing.
    fn extra_names(&self) -> &[&'static str] {
        &[]
    }

    /// The shape a saved value at `hp` is expected to have for a `[batch, tokens]` input: an upper
    /// estimate for refusing hopeless requests before they run. Empty when unknown (not counted).
    fn estimate_shape(&self, _hp: &HookPath, _batch: usize, _tokens: usize) -> Vec<usize> {
        Vec::new()
    }

    /// The dtype of activations (for the memory estimate).
    fn activation_dtype(&self) -> DType;

    /// The device activations live on (the memory check reads available memory on the CPU).
    fn activation_device(&self) -> &Device;
}
