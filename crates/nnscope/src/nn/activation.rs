//! Activation functions by their Hugging Face names (`ACT2FN`).

use candle_core::{Result, Tensor};

/// An activation function, named as in transformers' `ACT2FN`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `gelu`: exact, with erf.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `gelu_fast`.
    GeluFast,
    /// `quick_gelu`: x * sigmoid(1.702 x).
    QuickGelu,
    /// `silu`, `swish`.
    Silu,
    /// `relu`.
    Relu,
    /// `relu2`: relu(x)^2.
    Relu2,
    /// `tanh`.
    Tanh,
    /// `sigmoid`.
    Sigmoid,
    /// `linear`: identity.
    Identity,
}

/// Names accepted by [`Activation::from_name`].
pub const ACTIVATION_NAMES: &[&str] = &[
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "quick_gelu",
    "silu",
    "swish",
    "relu",
    "relu2",
    "tanh",
    "sigmoid",
    "linear",
];

impl Activation {
    /// Parses a Hugging Face activation name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "gelu_fast" => Activation::GeluFast,
            "quick_gelu" => Activation::QuickGelu,
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            "relu2" => Activation::Relu2,
            "tanh" => Activation::Tanh,
            "sigmoid" => Activation::Sigmoid,
            "linear" => Activation::Identity,
            _ => return None,
        })
    }

    /// Applies the activation.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::GeluFast => {
                // 0.5 x (1 + tanh(x * 0.7978845608 * (1 + 0.044715 x^2)))
                let inner = ((x.sqr()? * 0.044715)? + 1.0)?;
                let t = (x * 0.7978845608028654)?.mul(&inner)?.tanh()?;
                (x * 0.5)?.mul(&(t + 1.0)?)
            }
            Activation::QuickGelu => x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
            Activation::Silu => x.silu(),
            Activation::Relu => x.relu(),
            Activation::Relu2 => x.relu()?.sqr(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(x),
            Activation::Identity => Ok(x.clone()),
        }
    }
}
