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
    /// The activation a config names under `key` (`default` when absent), or a config error naming
    /// the key and the supported names.
    pub fn from_config(
        cfg: &crate::config::Config,
        key: &str,
        default: &str,
    ) -> crate::Result<Self> {
        let name = cfg.str_or(key, default)?;
        Self::from_name(name).ok_or_else(|| {
            cfg.error(format!(
                "{key} `{name}` is not supported; supported: {}",
                ACTIVATION_NAMES.join(", ")
            ))
        })
    }

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
            Activation::GeluTanh => match par_map_f32(x, gelu_tanh_f32)? {
                Some(y) => Ok(y),
                None => x.gelu(),
            },
            Activation::GeluFast => {
                // 0.5 x (1 + tanh(x * 0.7978845608 * (1 + 0.044715 x^2)))
                let inner = ((x.sqr()? * 0.044715)? + 1.0)?;
                let t = (x * 0.7978845608028654)?.mul(&inner)?.tanh()?;
                (x * 0.5)?.mul(&(t + 1.0)?)
            }
            Activation::QuickGelu => x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
            Activation::Silu => match par_map_f32(x, silu_f32)? {
                Some(y) => Ok(y),
                None => x.silu(),
            },
            Activation::Relu => x.relu(),
            Activation::Relu2 => x.relu()?.sqr(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(x),
            Activation::Identity => Ok(x.clone()),
        }
    }
}

// Performance (bench/): candle applies unary ops with one scalar `tanhf`/`expf` per element on one
// thread, which made GPT-2's `gelu_new` about a tenth of a forward on 2 cores. For contiguous
// float32 CPU tensors the two hot activations below run split over candle's worker pool instead.

/// `gelu_new`: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as the identical
/// x * sigmoid(2u) = x / (1 + exp(-2u)), which needs one `exp` and no cancellation near 0.
#[inline]
fn gelu_tanh_f32(v: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_TWO_OVER_PI * (v + 0.044715 * v * v * v);
    v / (1.0 + (-2.0 * u).exp())
}

/// `silu`: x * sigmoid(x), as candle computes it.
#[inline]
fn silu_f32(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

struct ParMap(fn(f32) -> f32);

impl candle_core::CustomOp1 for ParMap {
    fn name(&self) -> &'static str {
        "par-map-f32"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(src) = storage else {
            candle_core::bail!("par-map-f32: float32 only");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("par-map-f32: contiguous input only");
        };
        let src = &src[a..b];
        let f = self.0;
        let len = src.len();
        let mut dst = vec![0f32; len];
        let dp = super::cpu::SendPtr(dst.as_mut_ptr());
        // Blocks of 16 Ki elements: enough work per grab to amortise scheduling.
        const BLOCK: usize = 1 << 14;
        super::cpu::par_for(len.div_ceil(BLOCK), |blocks| {
            let (lo, hi) = (blocks.start * BLOCK, (blocks.end * BLOCK).min(len));
            // SAFETY: each call gets a disjoint range of blocks, inside `dst`'s `len` elements.
            let d = unsafe { std::slice::from_raw_parts_mut(dp.get().add(lo), hi - lo) };
            d.iter_mut().zip(&src[lo..hi]).for_each(|(d, &s)| *d = f(s));
        });
        Ok((candle_core::CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// `f` applied to every element of `x` in parallel when `x` is a contiguous float32 CPU tensor
/// large enough to gain from it (candle's own threshold for parallel element-wise ops); `None` otherwise (the caller uses candle's op).
fn par_map_f32(x: &Tensor, f: fn(f32) -> f32) -> Result<Option<Tensor>> {
    if x.dtype() != candle_core::DType::F32
        || !x.device().is_cpu()
        || !x.is_contiguous()
        || x.elem_count() < 1 << 16
        // On a gradient path: candle's op, which has a backward (this kernel has none).
        || x.track_op()
    {
        return Ok(None);
    }
    x.apply_op1_no_bwd(&ParMap(f)).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The parallel paths agree with candle's own ops (same formulas, up to float rounding).
    #[test]
    fn parallel_activations_match_candle() -> Result<()> {
        let x = (Tensor::randn(0f32, 3.0, (64, 1024), &Device::Cpu)? - 0.5)?;
        for (act, reference) in [
            (Activation::GeluTanh, x.gelu()?),
            (Activation::Silu, x.silu()?),
        ] {
            let y = act.forward(&x)?;
            let err = (y - &reference)?
                .abs()?
                .max_keepdim(D::Minus1)?
                .max(0)?
                .to_vec1::<f32>()?[0];
            let scale = reference
                .abs()?
                .max_keepdim(D::Minus1)?
                .max(0)?
                .to_vec1::<f32>()?[0];
            assert!(
                err <= 1e-6 * scale,
                "{act:?}: max abs error {err} (scale {scale})"
            );
        }
        Ok(())
    }
}
