//! What a hookpoint carries: a tensor, or a tuple of tensors (`attention_interface_0` returns the
//! attention output and the probabilities).

use candle_core::Tensor;

/// The value seen at a hookpoint.
#[derive(Debug, Clone)]
pub enum Value {
    /// A single tensor.
    Tensor(Tensor),
    /// A tuple of tensors, addressed element-wise as `.output.0`, `.output.1`, ...
    Tuple(Vec<Tensor>),
}

impl Value {
    /// The tensor at `select` (`None`: the value itself, which must then be a tensor).
    pub fn get(&self, select: Option<usize>) -> Option<&Tensor> {
        match (self, select) {
            (Value::Tensor(t), None) => Some(t),
            (Value::Tuple(v), Some(i)) => v.get(i),
            (Value::Tensor(t), Some(0)) => Some(t),
            _ => None,
        }
    }

    /// Replace the tensor at `select`.
    pub(crate) fn set(&mut self, select: Option<usize>, t: Tensor) -> bool {
        match (self, select) {
            (Value::Tensor(old), None) | (Value::Tensor(old), Some(0)) => {
                *old = t;
                true
            }
            (Value::Tuple(v), Some(i)) if i < v.len() => {
                v[i] = t;
                true
            }
            _ => false,
        }
    }

    /// The single tensor of a tensor value, or the first element of a tuple.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Value::Tensor(t) => t,
            Value::Tuple(v) => &v[0],
        }
    }
}
