//! The module tree of a traced network: each module's path and the source of its `forward`.

use super::rt::{FnInfo, Scope};

/// One module of a model: its Hugging Face path and the source of its `forward`.
#[derive(Debug, Clone)]
pub struct ModuleEntry {
    /// Attribute path as in Hugging Face (`model.layers.0.self_attn`); the root is `""`.
    pub path: String,
    /// The Rust type implementing it (`LlamaAttention`).
    pub type_name: &'static str,
    /// Source listing and call sites of its `forward`.
    pub forward: &'static FnInfo,
}

/// Every module of a model, indexed by [`Scope`] id.
#[derive(Debug, Default, Clone)]
pub struct ModuleTable {
    /// Modules in construction order.
    pub entries: Vec<ModuleEntry>,
}

impl ModuleTable {
    /// The module at a Hugging Face path.
    pub fn find(&self, path: &str) -> Option<(Scope, &ModuleEntry)> {
        self.entries
            .iter()
            .enumerate()
            .find(|(_, e)| e.path == path)
            .map(|(i, e)| (Scope { id: i as u32 }, e))
    }

    /// The module of a scope.
    pub fn get(&self, scope: Scope) -> &ModuleEntry {
        &self.entries[scope.id as usize]
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
