//! Building a model from its weights while recording its module tree.

use crate::hub::TensorIndex;
use crate::trace::{HookedForward, ModuleEntry, ModuleTable, Scope};
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use std::cell::RefCell;
use std::rc::Rc;

/// candle's `VarBuilder` plus the module tree being built: `pp("layers").pp(0)` descends a path,
/// `scope::<Self>()` registers the module at the current path.
#[derive(Clone)]
pub struct Builder<'a> {
    vb: VarBuilder<'a>,
    path: Vec<String>,
    table: Rc<RefCell<ModuleTable>>,
    /// Where each stored tensor is and its stored dtype and shape, when loading from files: lets
    /// errors name the file and refuse integer weights before candle converts them.
    index: Option<Rc<TensorIndex>>,
}

impl<'a> Builder<'a> {
    /// A builder over a candle `VarBuilder`.
    pub fn new(vb: VarBuilder<'a>) -> Self {
        Builder {
            vb,
            path: Vec::new(),
            table: Rc::new(RefCell::new(ModuleTable::default())),
            index: None,
        }
    }

    /// A builder over a `VarBuilder` reading the checkpoint files described by `index` (see
    /// [`crate::hub::read_headers`]).
    pub fn with_index(vb: VarBuilder<'a>, index: TensorIndex) -> Self {
        Builder {
            index: Some(Rc::new(index)),
            ..Builder::new(vb)
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
            index: self.index.clone(),
        }
    }

    /// Descends to a child module whose weights are stored at the current prefix: checkpoints saved
    /// from a base model (BLOOM's `BloomModel`) lack the `transformer.` prefix that the module path of
    /// the causal-LM class has.
    pub fn pp_module<S: ToString>(&self, s: S) -> Self {
        let mut path = self.path.clone();
        path.push(s.to_string());
        Builder {
            vb: self.vb.clone(),
            path,
            table: self.table.clone(),
            index: self.index.clone(),
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

    /// A weight of known shape. Errors name the tensor, the file it is in, and the expected and
    /// stored shapes; integer or quantized weights are refused rather than converted.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        let shape = shape.into();
        // The stored name: the weight prefix, which differs from the module path for checkpoints
        // saved without the causal-LM class's prefix (see `pp_module`).
        let prefix = self.vb.prefix();
        let full = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        if let Some(index) = &self.index {
            let Some(info) = index.get(&full) else {
                let mut files: Vec<String> = index.values().map(|i| file_name(&i.file)).collect();
                files.sort();
                files.dedup();
                candle_core::bail!(
                    "missing tensor `{full}` (expected shape {:?}): not in {}",
                    shape.dims(),
                    files.join(", ")
                );
            };
            if info.shape != shape.dims() {
                candle_core::bail!(
                    "tensor `{full}` in {} has shape {:?}, but the config implies {:?}",
                    file_name(&info.file),
                    info.shape,
                    shape.dims()
                );
            }
            if !info.is_float() {
                candle_core::bail!(
                    "tensor `{full}` in {} has dtype {}; weights must be floating point (F16, BF16, F32 or F64): \
                     integer or quantized checkpoints are not supported",
                    file_name(&info.file),
                    info.dtype
                );
            }
        } else if !self.vb.contains_tensor(name) {
            candle_core::bail!(
                "missing tensor `{full}` (expected shape {:?})",
                shape.dims()
            );
        }
        self.vb.get(shape.clone(), name).map_err(|e| {
            candle_core::Error::Msg(format!(
                "tensor `{full}` (expected shape {:?}): {e}",
                shape.dims()
            ))
        })
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

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}
