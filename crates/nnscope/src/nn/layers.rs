//! Leaf modules: `torch.nn.Linear`, transformers' `Conv1D`, `Embedding`, `LayerNorm`, RMS norm and
//! `Dropout`. Each is a module with its own scope, so `q_proj.output` or `attn_dropout.output` work.

use super::Builder;
use crate::trace::{hooked, Scope};
use candle_core::{DType, Result, Tensor, D};

/// `torch.nn.Linear`: y = x W^T + b, with W stored [out, in] as in the checkpoint.
#[derive(Debug, Clone)]
pub struct Linear {
    /// [out_features, in_features].
    pub weight: Tensor,
    /// [out_features].
    pub bias: Option<Tensor>,
    scope: Scope,
}

impl Linear {
    /// Loads `weight` (and `bias` when `bias` is true) under the builder's path.
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: Builder) -> Result<Self> {
        let weight = super::blas::prepare_weight(vb.get((out_dim, in_dim), "weight")?)?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            scope: vb.scope::<Self>(),
        })
    }

    /// A linear layer from given tensors (fused or split weights).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, vb: &Builder) -> Self {
        Linear {
            weight,
            bias,
            scope: vb.scope::<Self>(),
        }
    }
}

/// Which matrix-multiply kernel `Linear`/`Conv1D` use for float32 on the CPU in this process:
/// `onednn-sgemm` or `openblas-sgemm` when a system library was found at run time (or linked with
/// the `dnnl`/`openblas` features), else `nnscope-sgemm` (nnscope's own kernel, on x86-64 CPUs with
/// AVX-512F or AVX2+FMA), else `candle-gemm` (see `NNSCOPE_GEMM` in the README).
pub fn gemm_backend() -> &'static str {
    super::blas::backend()
}

/// Which kernel `Linear`/`Conv1D` use for bfloat16 on the CPU: `amx-bf16` (nnscope's own AMX kernel)
/// on CPUs with AMX, else `onednn-gemm-bf16` (AVX512-BF16 where the CPU has it) when oneDNN is
/// available, `candle-gemm` otherwise.
pub fn gemm_backend_bf16() -> &'static str {
    super::blas::backend_bf16()
}

/// A `[out, in]` weight in the memory layout `Linear` keeps it in for this build's kernel (same shape
/// and values; see [`linear_matmul`]).
pub fn prepare_linear_weight(w: Tensor) -> Result<Tensor> {
    super::blas::prepare_weight(w)
}

/// `x [.., in]` times `w^T` (`w` is `[out, in]`), the product `Linear` computes: public so the
/// benchmark can time exactly this kernel (pass `w` through [`prepare_linear_weight`] first).
pub fn linear_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul_t(x, w)
}

/// x [.., in] times w^T [in, out] as one 2-D matrix multiply over all leading dimensions.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((lead, in_dim))?;
    if x.device().is_cpu() {
        // An output of more than 32 MiB (the logits at batch 8) is the forward's largest block.
        crate::alloc::before_large_output(lead * w.dim(0)? * x.dtype().size_in_bytes());
    }
    // A system kernel when one was found (see nn/blas.rs); candle's kernel otherwise.
    let y = match super::blas::matmul_nt(&x2, w)? {
        Some(y) => y,
        None => x2.matmul(&w.t()?)?,
    };
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(w.dim(0)?);
    y.reshape(out_dims)
}

/// `x w^T + b`, rounded once: torch computes a bfloat16 `F.linear` / `addmm` with the bias added to
/// the float32 accumulator, so the product is not rounded to bfloat16 before the bias is added.
/// With a system kernel the product comes back in float32 and the bias is added there; otherwise
/// (candle's kernel, which rounds its product) and for other dtypes it is product, then bias.
pub(crate) fn matmul_t_bias(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let Some(b) = b else {
        return matmul_t(x, w);
    };
    if x.dtype() == DType::BF16 {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((lead, in_dim))?;
        if let Some(y) = super::blas::matmul_nt_f32_out(&x2, w)? {
            let y = y
                .broadcast_add(&b.to_dtype(DType::F32)?)?
                .to_dtype(DType::BF16)?;
            let mut out_dims = dims[..dims.len() - 1].to_vec();
            out_dims.push(w.dim(0)?);
            return y.reshape(out_dims);
        }
    }
    matmul_t(x, w)?.broadcast_add(b)
}

thread_local! {
    /// The `Linear` that multiplies only the last position of its input (see [`last_position_only`]).
    static LAST_POSITION_ONLY: std::cell::Cell<Option<Scope>> = const { std::cell::Cell::new(None) };
}

/// While the returned guard lives, the `Linear` of `scope` (the output head) multiplies only the
/// last position of a `[B, T, in]` input on this thread, giving `[B, 1, out]`: transformers'
/// `logits_to_keep=1`. Generation sets it when no request reads the head or anything around it, so
/// a prompt of T tokens costs one row of the vocabulary product instead of T.
pub(crate) fn last_position_only(scope: Scope) -> LastPositionOnly {
    LastPositionOnly {
        prev: LAST_POSITION_ONLY.with(|c| c.replace(Some(scope))),
    }
}

/// Guard of [`last_position_only`]; restores the previous setting on drop.
pub(crate) struct LastPositionOnly {
    prev: Option<Scope>,
}

impl Drop for LastPositionOnly {
    fn drop(&mut self) {
        LAST_POSITION_ONLY.with(|c| c.set(self.prev));
    }
}

/// `x`, or its last position when [`last_position_only`] names `scope` and `x` is `[B, T > 1, in]`.
fn head_rows(scope: Scope, x: &Tensor) -> Result<Tensor> {
    if LAST_POSITION_ONLY.with(|c| c.get()) == Some(scope) && x.rank() == 3 {
        let t = x.dim(1)?;
        if t > 1 {
            return x.narrow(1, t - 1, 1);
        }
    }
    Ok(x.clone())
}

/// [`head_rows`] as a macro, so that it adds no call site (hookpoint) to `Linear`'s forward.
macro_rules! head_rows {
    ($scope:expr, $x:expr) => {
        head_rows($scope, $x)?
    };
}

#[hooked]
impl Linear {
    /// y = x W^T + b.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        matmul_t_bias(&head_rows!(self.scope, x), &self.weight, self.bias.as_ref())
    }
}

/// transformers' `Conv1D` (GPT-2): a linear layer whose weight is stored [in, out].
#[derive(Debug, Clone)]
pub struct Conv1D {
    /// [in_features, out_features], as stored by GPT-2 checkpoints.
    pub weight: Tensor,
    /// [out_features].
    pub bias: Tensor,
    /// `weight.t()` ([out, in]): a view of the same storage, so the weights are held once in memory.
    /// Float32 kernels read the stored [in, out] layout directly; bfloat16 on an AMX CPU stores
    /// [out, in] contiguous (transposed once at load, see `blas::prepare_conv1d_weight`).
    weight_t: Tensor,
    scope: Scope,
}

impl Conv1D {
    /// Loads `weight` [nx, nf] and `bias` [nf].
    pub fn new(nf: usize, nx: usize, vb: Builder) -> Result<Self> {
        let (weight, weight_t) = super::blas::prepare_conv1d_weight(vb.get((nx, nf), "weight")?)?;
        let bias = vb.get(nf, "bias")?;
        Ok(Conv1D {
            weight,
            bias,
            weight_t,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Conv1D {
    /// y = x W + b.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        matmul_t_bias(x, &self.weight_t, Some(&self.bias))
    }
}

/// `torch.nn.Embedding`.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// [num_embeddings, dim].
    pub weight: Tensor,
    scope: Scope,
}

impl Embedding {
    /// Loads `weight` [n, dim].
    pub fn new(n: usize, dim: usize, vb: Builder) -> Result<Self> {
        let weight = vb.get((n, dim), "weight")?;
        Ok(Embedding {
            weight,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Embedding {
    /// Looks up the rows of `input_ids` ([B, T] integers) -> [B, T, dim].
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?;
        let rows = self.weight.index_select(&flat, 0)?;
        rows.reshape((b, t, self.weight.dim(1)?))
    }
}

/// `torch.nn.LayerNorm` (a missing bias is zero, as in DBRX's bias-free LayerNorm).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// [dim].
    pub weight: Tensor,
    /// [dim].
    pub bias: Option<Tensor>,
    /// Epsilon.
    pub eps: f64,
    scope: Scope,
}

impl LayerNorm {
    /// Loads `weight` and (when `bias`) `bias`.
    pub fn new(dim: usize, eps: f64, bias: bool, vb: Builder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        let bias = if bias {
            Some(vb.get(dim, "bias")?)
        } else {
            None
        };
        Ok(LayerNorm {
            weight,
            bias,
            eps,
            scope: vb.scope::<Self>(),
        })
    }

    /// A layer norm from given tensors, registered at the builder's path: `weight` of ones and no
    /// bias is `torch.nn.LayerNorm(.., elementwise_affine=False)`, which has no parameters to load.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, eps: f64, vb: &Builder) -> Self {
        LayerNorm {
            weight,
            bias,
            eps,
            scope: vb.scope::<Self>(),
        }
    }
}

/// Layer norm over the last dimension, computed in float32.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    // torch's layer_norm on bfloat16/float16 input normalizes, scales and shifts in float32 and
    // rounds once; in float32 these are the same operations as before.
    let y = y.broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => y,
    };
    y.to_dtype(dt)
}

#[hooked]
impl LayerNorm {
    /// Normalizes the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, self.bias.as_ref(), self.eps)
    }
}

/// RMS norm as in LLaMA: computed in float32, scaled by `weight` after casting back.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// [dim].
    pub weight: Tensor,
    /// Epsilon.
    pub eps: f64,
    scope: Scope,
}

impl RmsNorm {
    /// Loads `weight` [dim].
    pub fn new(dim: usize, eps: f64, vb: Builder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        Ok(RmsNorm {
            weight,
            eps,
            scope: vb.scope::<Self>(),
        })
    }
}

/// x * rsqrt(mean(x^2) + eps), in float32, then cast back and scaled.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = rms_norm_f32(x, w, eps)? {
        return Ok(y);
    }
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    w.broadcast_mul(&y.to_dtype(dt)?)
}

/// [`rms_norm`] in one pass per row for a contiguous float32 CPU `x` and a float32 `w` of the last
/// dimension's size (bfloat16 `x` and `w`: [`rms_norm_bf16`]); `None` otherwise. The same operations as the seven-op version (mean of squares,
/// plus eps, sqrt, reciprocal, x times it, times w), in float32 as there (the sum of squares in 8 partial sums), without six
/// intermediate tensors (the fixed cost of those dominated a norm at a few tokens).
fn rms_norm_f32(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let dim = match x.dims().last() {
        Some(&d) if d > 0 => d,
        _ => return Ok(None),
    };
    if !x.device().is_cpu()
        || !w.device().is_cpu()
        || w.dims() != [dim]
        || !x.is_contiguous()
        || x.track_op()
        || w.track_op()
    {
        return Ok(None);
    }
    match (x.dtype(), w.dtype()) {
        (DType::F32, DType::F32) => {}
        (DType::BF16, DType::BF16) => return rms_norm_bf16(x, w, eps, dim),
        _ => return Ok(None),
    }
    let ws = w.to_vec1::<f32>()?;
    let (storage, layout) = x.storage_and_layout();
    let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let xs = &data[a..b];
    let mut out = vec![0f32; xs.len()];
    let eps = eps as f32;
    let row = |xr: &[f32], or: &mut [f32]| {
        // Sum of squares over 8 partial sums (vectorizes; candle's sum is not sequential either).
        let mut acc = [0f32; 8];
        let mut chunks = xr.chunks_exact(8);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += v * v;
            }
        }
        let sq = acc.iter().sum::<f32>() + chunks.remainder().iter().map(|v| v * v).sum::<f32>();
        let r = 1.0 / (sq / dim as f32 + eps).sqrt();
        for ((o, &v), &wv) in or.iter_mut().zip(xr).zip(&ws) {
            *o = wv * (v * r);
        }
    };
    let rows = xs.len() / dim;
    if xs.len() < 1 << 16 {
        for (xr, or) in xs.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            row(xr, or);
        }
    } else {
        let op = super::cpu::SendPtr(out.as_mut_ptr());
        super::cpu::par_for(rows, |range| {
            for r in range {
                // SAFETY: each row index is handed to exactly one call; rows lie inside `out`.
                let or = unsafe { std::slice::from_raw_parts_mut(op.get().add(r * dim), dim) };
                row(&xs[r * dim..(r + 1) * dim], or);
            }
        });
    }
    drop(storage);
    Tensor::from_vec(out, x.shape(), x.device()).map(Some)
}

/// [`rms_norm_f32`] for bfloat16 `x` and `w`, rounding where the op-by-op version (and transformers)
/// round: the normalized row in float32 is rounded to bfloat16, then multiplied by the weight and
/// rounded again. Rows run through an AVX2 build where the CPU has it. The caller has checked the
/// device, shapes and layout.
fn rms_norm_bf16(x: &Tensor, w: &Tensor, eps: f64, dim: usize) -> Result<Option<Tensor>> {
    use super::ops::{narrow, widen};
    let ws: Vec<f32> = w
        .to_vec1::<half::bf16>()?
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let (storage, layout) = x.storage_and_layout();
    let (candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(data)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let xs = &data[a..b];
    let mut out = vec![half::bf16::ZERO; xs.len()];
    let eps = eps as f32;
    #[inline(always)]
    fn row(xr: &[half::bf16], or: &mut [half::bf16], ws: &[f32], eps: f32) {
        let mut acc = [0f32; 8];
        let mut chunks = xr.chunks_exact(8);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                let v = widen(v.to_bits());
                *a += v * v;
            }
        }
        let tail: f32 = chunks
            .remainder()
            .iter()
            .map(|v| widen(v.to_bits()) * widen(v.to_bits()))
            .sum();
        let sq = acc.iter().sum::<f32>() + tail;
        let r = 1.0 / (sq / xr.len() as f32 + eps).sqrt();
        for ((o, v), &wv) in or.iter_mut().zip(xr).zip(ws) {
            let y = widen(narrow(widen(v.to_bits()) * r));
            *o = half::bf16::from_bits(narrow(wv * y));
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_avx2(xr: &[half::bf16], or: &mut [half::bf16], ws: &[f32], eps: f32) {
        row(xr, or, ws, eps)
    }
    let run = |xr: &[half::bf16], or: &mut [half::bf16]| {
        #[cfg(target_arch = "x86_64")]
        if super::cpu::has_avx2_fma() {
            // SAFETY: the CPU has the features the function is compiled for (checked just above).
            return unsafe { row_avx2(xr, or, &ws, eps) };
        }
        row(xr, or, &ws, eps)
    };
    let rows = xs.len() / dim;
    if xs.len() < 1 << 16 {
        for (xr, or) in xs.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            run(xr, or);
        }
    } else {
        let op = super::cpu::SendPtr(out.as_mut_ptr().cast::<f32>());
        super::cpu::par_for(rows, |range| {
            for r in range {
                // SAFETY: each row index is handed to exactly one call; rows lie inside `out`.
                let or = unsafe {
                    std::slice::from_raw_parts_mut(op.get().cast::<half::bf16>().add(r * dim), dim)
                };
                run(&xs[r * dim..(r + 1) * dim], or);
            }
        });
    }
    drop(storage);
    Tensor::from_vec(out, x.shape(), x.device()).map(Some)
}

#[hooked]
impl RmsNorm {
    /// Normalizes the last dimension.
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        rms_norm(hidden_states, &self.weight, self.eps)
    }
}

/// `torch.nn.Dropout` at inference: the identity, but a module (and so a hookpoint) of its own.
#[derive(Debug, Clone)]
pub struct Dropout {
    /// Probability (unused at inference).
    pub p: f64,
    scope: Scope,
}

impl Dropout {
    /// A dropout module at the builder's path.
    pub fn new(p: f64, vb: Builder) -> Self {
        Dropout {
            p,
            scope: vb.scope::<Self>(),
        }
    }
}

#[hooked]
impl Dropout {
    /// Returns its input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The one-pass float32 RMS norm agrees with the seven-op version it replaces.
    #[test]
    fn fused_rms_norm_matches_the_op_by_op_one() -> Result<()> {
        let dev = Device::Cpu;
        for dim in [3, 8, 64, 77] {
            let x = Tensor::randn(0f32, 2.0, (2, 5, dim), &dev)?;
            let w = Tensor::randn(1f32, 0.5, dim, &dev)?;
            let Some(ours) = rms_norm_f32(&x, &w, 1e-6)? else {
                panic!("the kernel takes contiguous float32 tensors");
            };
            let var = x.sqr()?.mean_keepdim(D::Minus1)?;
            let theirs = w.broadcast_mul(&x.broadcast_mul(&(var + 1e-6)?.sqrt()?.recip()?)?)?;
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "dim {dim}: max difference {diff}");
            // bfloat16: the op-by-op version (the path taken when the kernel declines).
            let (xb, wb) = (x.to_dtype(DType::BF16)?, w.to_dtype(DType::BF16)?);
            let Some(ours) = rms_norm_f32(&xb, &wb, 1e-6)? else {
                panic!("the kernel takes contiguous bfloat16 tensors");
            };
            let xf = xb.to_dtype(DType::F32)?;
            let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
            let y = xf.broadcast_mul(&(var + 1e-6)?.sqrt()?.recip()?)?;
            let theirs = wb.broadcast_mul(&y.to_dtype(DType::BF16)?)?;
            let (o, t) = (ours.to_dtype(DType::F32)?, theirs.to_dtype(DType::F32)?);
            // Equal up to the sum's order: at most one bfloat16 step (2^-7 relative) apart.
            let rel = ((&o - &t)?.abs()? / (t.abs()? + 1e-6)?)?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(
                rel <= 1.0 / 64.0,
                "bf16 dim {dim}: max relative difference {rel}"
            );
            let same = o
                .eq(&t)?
                .to_dtype(DType::F32)?
                .mean_all()?
                .to_scalar::<f32>()?;
            assert!(
                same > 0.95,
                "bf16 dim {dim}: only {same} of the values equal"
            );
        }
        Ok(())
    }
}
