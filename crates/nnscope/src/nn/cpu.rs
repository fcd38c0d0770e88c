//! Small CPU kernels that candle 0.11 runs slower than they need to (found with bench/), and the
//! worker-pool helpers they share with the system GEMM path ([`super::blas`]).

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

/// A pointer that may cross threads: each task writes its own disjoint part of an output buffer.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: the tasks given a `SendPtr` write disjoint ranges of the buffer (see the callers).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// The pointer. A method (not a field read) so that closures capture the whole `Send` wrapper.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs `f` over `0..n_items` split into ranges on candle's CPU worker pool (the barrier pool its
/// element-wise ops use; the calling thread takes part). Using candle's pool rather than a second
/// one keeps one set of worker threads busy per core: two pools spinning against each other cost
/// a third of a forward on 2 cores.
pub(crate) fn par_for(n_items: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n_items, f)
}

/// Threads of [`par_for`]'s pool (the calling thread included).
pub(crate) fn par_threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Softmax over the last dimension of a contiguous float32 CPU tensor.
///
/// Same arithmetic as candle's `softmax_last_dim` (max, exp of the difference, sum, divide), but
/// exponents below -87 are taken as 0 instead of calling `expf`: masked attention scores sit at
/// `f32::MIN`, and libm's underflow path (with `errno`) made those exps a sixth of a small model's
/// forward. exp(-87) is 1.6e-38, below float32's normal range, so results differ by less than that.
struct SoftmaxLastDimF32;

impl candle_core::CustomOp1 for SoftmaxLastDimF32 {
    fn name(&self) -> &'static str {
        "softmax-last-dim-f32"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax-last-dim-f32: contiguous input only");
        };
        let dim = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        match storage {
            CpuStorage::F32(src) => {
                let dst = softmax_rows(&src[a..b], dim, |v: &f32| *v, |v| v);
                Ok((CpuStorage::F32(dst), layout.shape().clone()))
            }
            // bfloat16 scores: widened, computed in float32 and rounded once on the way out, which
            // is what `to_dtype(F32)`, the float32 softmax and `to_dtype(BF16)` give, in one pass.
            CpuStorage::BF16(src) => {
                let dst = softmax_rows(
                    &src[a..b],
                    dim,
                    |v: &half::bf16| v.to_f32(),
                    half::bf16::from_f32,
                );
                Ok((CpuStorage::BF16(dst), layout.shape().clone()))
            }
            _ => candle_core::bail!("softmax-last-dim-f32: float32 or bfloat16 only"),
        }
    }
}

/// Softmax of each `dim`-long row of `src`, computed in float32 (`load` widens, `store` narrows).
fn softmax_rows<T: Copy + Send + Sync + Default>(
    src: &[T],
    dim: usize,
    load: impl Fn(&T) -> f32 + Sync,
    store: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    let rows = src.len() / dim;
    let mut dst = vec![T::default(); src.len()];
    let row = |s: &[T], d: &mut [T], buf: &mut Vec<f32>| {
        buf.clear();
        buf.extend(s.iter().map(&load));
        let max = buf.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for e in buf.iter_mut() {
            let x = *e - max;
            *e = if x < -87.0 { 0.0 } else { x.exp() };
            sum += *e;
        }
        for (d, e) in d.iter_mut().zip(buf.iter()) {
            *d = store(*e / sum);
        }
    };
    if src.len() < 1 << 16 {
        let mut buf = Vec::with_capacity(dim);
        for (s, d) in src.chunks(dim).zip(dst.chunks_mut(dim)) {
            row(s, d, &mut buf);
        }
    } else {
        let dp = SendPtr(dst.as_mut_ptr().cast::<f32>());
        par_for(rows, |range| {
            let mut buf = Vec::with_capacity(dim);
            for r in range {
                // SAFETY: each row index is handed to exactly one call; rows lie inside `dst`.
                let d = unsafe {
                    std::slice::from_raw_parts_mut(dp.get().cast::<T>().add(r * dim), dim)
                };
                row(&src[r * dim..(r + 1) * dim], d, &mut buf);
            }
        });
    }
    dst
}

/// Softmax over the last dimension through [`SoftmaxLastDimF32`] when `x` is a contiguous float32
/// or bfloat16 CPU tensor (bfloat16 computed in float32, returned in bfloat16); `None` otherwise
/// (the caller uses candle's op).
pub(crate) fn softmax_last_dim_f32(x: &Tensor) -> Result<Option<Tensor>> {
    if !matches!(
        x.dtype(),
        candle_core::DType::F32 | candle_core::DType::BF16
    ) || !x.device().is_cpu()
        || !x.is_contiguous()
        || x.rank() == 0
        || x.track_op()
    {
        return Ok(None);
    }
    x.apply_op1_no_bwd(&SoftmaxLastDimF32).map(Some)
}
