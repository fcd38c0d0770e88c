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
            Activation::GeluTanh => match par_map::<GeluTanh>(x)? {
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
            Activation::Silu => match par_map::<Silu>(x)? {
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
// thread (and for bfloat16 converts through non-inlined helpers), which made GPT-2's `gelu_new`
// about a tenth of a float32 forward and LLaMA's `silu` 8% of a bfloat16 one on 2 cores. For
// contiguous float32 and bfloat16 CPU tensors the two hot activations run here instead: split over
// candle's worker pool, with an `exp` the compiler can vectorize ([`exp`]), monomorphized per
// activation so that the element loop is inlined, and compiled for AVX2+FMA when the CPU has it.

/// An element-wise float32 function for [`ParMap`].
trait Unary: Send + Sync + 'static {
    const NAME: &'static str;
    fn f(v: f32) -> f32;
}

/// `gelu_new`: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as the identical
/// x * sigmoid(2u) = x / (1 + exp(-2u)), which needs one `exp` and no cancellation near 0.
struct GeluTanh;
impl Unary for GeluTanh {
    const NAME: &'static str = "gelu-tanh";
    #[inline(always)]
    fn f(v: f32) -> f32 {
        const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
        let u = SQRT_TWO_OVER_PI * (v + 0.044715 * v * v * v);
        v / (1.0 + exp(-2.0 * u))
    }
}

/// `silu`: x * sigmoid(x), as candle computes it.
struct Silu;
impl Unary for Silu {
    const NAME: &'static str = "silu";
    #[inline(always)]
    fn f(v: f32) -> f32 {
        v / (1.0 + exp(-v))
    }
}

/// e^x in float32 without libm, written so that loops over it vectorize: x = n ln2 + r with
/// |r| <= ln2/2, e^r from Cephes' `expf` polynomial (error about 1 ulp over the whole range, the
/// same as libm's within the tolerances parity checks), 2^n put into the exponent bits. Inputs are
/// clamped to [-87.3, 88.0] (e^x stays a normal float), which only matters where the callers add 1
/// to it or divide by it: 1 + e^-88 is 1 either way. NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in any vector width.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^n from the bits of n + 127 + ROUND (an integer in the low mantissa bits) rather than
    // through `n as i32`, whose saturating conversion does not vectorize.
    let scale = f32::from_bits(
        ((n + (ROUND + 127.0))
            .to_bits()
            .wrapping_sub(ROUND.to_bits()))
            << 23,
    );
    let y = er * scale;
    if x.is_nan() {
        x
    } else {
        y
    }
}

use super::ops::{narrow, widen};

/// `dst[i] = U::f(src[i])`, float32 or bfloat16 (widened, computed in float32, rounded back as torch
/// does).
#[inline(always)]
fn map_slice<U: Unary>(src: Src<'_>, dst: Dst<'_>) {
    match (src, dst) {
        (Src::F32(s), Dst::F32(d)) => d.iter_mut().zip(s).for_each(|(d, &s)| *d = U::f(s)),
        (Src::Bf16(s), Dst::Bf16(d)) => d
            .iter_mut()
            .zip(s)
            .for_each(|(d, &s)| *d = narrow(U::f(widen(s)))),
        _ => unreachable!("map_slice: source and destination share a dtype"),
    }
}

enum Src<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}
enum Dst<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [u16]),
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn map_slice_avx2<U: Unary>(src: Src<'_>, dst: Dst<'_>) {
    map_slice::<U>(src, dst)
}

fn map_slice_best<U: Unary>(src: Src<'_>, dst: Dst<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked just above).
        return unsafe { map_slice_avx2::<U>(src, dst) };
    }
    map_slice::<U>(src, dst)
}

struct ParMap<U>(std::marker::PhantomData<U>);

impl<U: Unary> candle_core::CustomOp1 for ParMap<U> {
    fn name(&self) -> &'static str {
        U::NAME
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: contiguous input only", U::NAME);
        };
        let len = b - a;
        // Blocks of 16 Ki elements: enough work per grab to amortise scheduling.
        const BLOCK: usize = 1 << 14;
        let out = match storage {
            // A tensor of one block runs on the calling thread: waking a worker costs more than
            // the work (the tiny models' whole MLP activations are a few thousand elements).
            candle_core::CpuStorage::F32(src) if len <= BLOCK => {
                let mut dst = vec![0f32; len];
                map_slice_best::<U>(Src::F32(&src[a..b]), Dst::F32(&mut dst));
                candle_core::CpuStorage::F32(dst)
            }
            candle_core::CpuStorage::F32(src) => {
                let src = &src[a..b];
                let mut dst = vec![0f32; len];
                let dp = super::cpu::SendPtr(dst.as_mut_ptr());
                super::cpu::par_for(len.div_ceil(BLOCK), |blocks| {
                    let (lo, hi) = (blocks.start * BLOCK, (blocks.end * BLOCK).min(len));
                    // SAFETY: each call gets a disjoint range of blocks, inside `dst`'s `len` elements.
                    let d = unsafe { std::slice::from_raw_parts_mut(dp.get().add(lo), hi - lo) };
                    map_slice_best::<U>(Src::F32(&src[lo..hi]), Dst::F32(d));
                });
                candle_core::CpuStorage::F32(dst)
            }
            candle_core::CpuStorage::BF16(src) => {
                let src = &src[a..b];
                // SAFETY: bf16 is a transparent u16; only the bits are reinterpreted.
                let src: &[u16] =
                    unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u16, len) };
                let mut dst = vec![half::bf16::ZERO; len];
                let dp = super::cpu::SendPtr(dst.as_mut_ptr() as *mut f32);
                super::cpu::par_for(len.div_ceil(BLOCK), |blocks| {
                    let (lo, hi) = (blocks.start * BLOCK, (blocks.end * BLOCK).min(len));
                    // SAFETY: as above; the buffer holds `len` u16-sized elements.
                    let d = unsafe {
                        std::slice::from_raw_parts_mut((dp.get() as *mut u16).add(lo), hi - lo)
                    };
                    map_slice_best::<U>(Src::Bf16(&src[lo..hi]), Dst::Bf16(d));
                });
                candle_core::CpuStorage::BF16(dst)
            }
            _ => candle_core::bail!("{}: float32 or bfloat16 only", U::NAME),
        };
        Ok((out, layout.shape().clone()))
    }
}

/// `U` applied to every element of `x` (in parallel when it is large enough to gain from it) when
/// `x` is a contiguous float32 or bfloat16 CPU tensor; `None` otherwise (the caller uses candle's
/// op). Small float32 tensors take this path too: candle's op calls libm's scalar `expf` per
/// element (a tenth of the tiny fixture's forward went to `silu`); small bfloat16 ones keep
/// candle's op.
fn par_map<U: Unary>(x: &Tensor) -> Result<Option<Tensor>> {
    if !matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::BF16)
        || !x.device().is_cpu()
        || !x.is_contiguous()
        || (x.dtype() == candle_core::DType::BF16 && x.elem_count() < 1 << 16)
        // On a gradient path: candle's op, which has a backward (this kernel has none).
        || x.track_op()
    {
        return Ok(None);
    }
    x.apply_op1_no_bwd(&ParMap::<U>(std::marker::PhantomData))
        .map(Some)
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
            // bfloat16: float32 arithmetic rounded once, so within one bfloat16 rounding (2^-8
            // relative) of the float32 result.
            let yb = act.forward(&x.to_dtype(candle_core::DType::BF16)?)?;
            assert_eq!(yb.dtype(), candle_core::DType::BF16);
            let xb = x
                .to_dtype(candle_core::DType::BF16)?
                .to_dtype(candle_core::DType::F32)?;
            let want = act.forward(&xb)?;
            let err = (yb.to_dtype(candle_core::DType::F32)? - &want)?
                .abs()?
                .max_keepdim(D::Minus1)?
                .max(0)?
                .to_vec1::<f32>()?[0];
            assert!(err <= scale / 128.0, "{act:?} bf16: max abs error {err}");
        }
        Ok(())
    }

    /// The vectorizable `exp` against libm over float32's range, NaN and the clamps included.
    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        let mut v = -87.0f32;
        while v < 88.0 {
            let (ours, libm) = (exp(v), v.exp());
            worst = worst.max(((ours - libm) / libm).abs());
            v += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0) > 1e38 && exp(1000.0).is_finite());
    }
}
