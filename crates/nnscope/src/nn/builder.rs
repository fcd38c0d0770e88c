//! Building a model from its weights while recording its module tree.

use crate::trace::{FnInfo, HookedForward, Scope};
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use std::cell::RefCell;
use std::rc::Rc;

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

/// candle's `VarBuilder` plus the module tree being built: `pp("layers").pp(0)` descends a path,
/// `scope::<Self>()` registers the module at the current path.
#[derive(Clone)]
pub struct Builder<'a> {
    vb: VarBuilder<'a>,
    path: Vec<String>,
    table: Rc<RefCell<ModuleTable>>,
}

impl<'a> Builder<'a> {
    /// A builder over a candle `VarBuilder`.
    pub fn new(vb: VarBuilder<'a>) -> Self {
        Builder {
            vb,
            path: Vec::new(),
            table: Rc::new(RefCell::new(ModuleTable::default())),
        }
    }

    /// Descends to a child attribute.
    pub fn pp<S: ToString>(&self, s: S) -> Self {
        let s = s.to_string();
        let mut path = self.path.clone();
        path.push(s.clone());
        Builder {
            vb: self.vb.pp(s),
            path,
            table: self.table.clone(),
        }
    }

    /// Descends to a child attribute whose weights are stored without its name as a prefix: the
    /// module path gains `s`, the weight names do not (GPT-2 checkpoints saved from `GPT2Model`
    /// have `h.0.attn...` where `GPT2LMHeadModel` has `transformer.h.0.attn...`).
    pub fn pp_module_only<S: ToString>(&self, s: S) -> Self {
        let mut path = self.path.clone();
        path.push(s.to_string());
        Builder {
            vb: self.vb.clone(),
            path,
            table: self.table.clone(),
        }
    }

    /// The current Hugging Face path.
    pub fn path(&self) -> String {
        self.path.join(".")
    }

    /// Registers the module being built at the current path and returns its scope.
    pub fn scope<M: HookedForward>(&self) -> Scope {
        let mut t = self.table.borrow_mut();
        let full = std::any::type_name::<M>();
        let type_name = full.rsplit("::").next().unwrap_or(full);
        t.entries.push(ModuleEntry {
            path: self.path(),
            type_name,
            forward: M::forward_info(),
        });
        Scope {
            id: (t.entries.len() - 1) as u32,
        }
    }

    /// A weight of known shape (the error names the tensor and both shapes).
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        let shape = shape.into();
        if !self.vb.contains_tensor(name) {
            let full = if self.path.is_empty() {
                name.to_string()
            } else {
                format!("{}.{}", self.path(), name)
            };
            candle_core::bail!("missing tensor `{full}` (expected shape {:?})", shape.dims());
        }
        self.vb.get(shape, name)
    }

    /// Whether a weight exists under the current path.
    pub fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    /// The device.
    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    /// The module tree built so far.
    pub fn table(&self) -> ModuleTable {
        self.table.borrow().clone()
    }
}
