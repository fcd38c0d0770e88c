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
        let CpuStorage::F32(src) = storage else {
            candle_core::bail!("softmax-last-dim-f32: float32 only");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax-last-dim-f32: contiguous input only");
        };
        let src = &src[a..b];
        let dim = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let rows = src.len() / dim;
        let mut dst = vec![0f32; src.len()];
        let row = |s: &[f32], d: &mut [f32]| {
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (d, &s) in d.iter_mut().zip(s) {
                let e = s - max;
                *d = if e < -87.0 { 0.0 } else { e.exp() };
                sum += *d;
            }
            for d in d.iter_mut() {
                *d /= sum;
            }
        };
        if src.len() < 1 << 16 {
            for (s, d) in src.chunks(dim).zip(dst.chunks_mut(dim)) {
                row(s, d);
            }
        } else {
            let dp = SendPtr(dst.as_mut_ptr());
            par_for(rows, |range| {
                for r in range {
                    // SAFETY: each row index is handed to exactly one call; rows lie inside `dst`.
                    let d = unsafe { std::slice::from_raw_parts_mut(dp.get().add(r * dim), dim) };
                    row(&src[r * dim..(r + 1) * dim], d);
                }
            });
        }
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// Softmax over the last dimension through [`SoftmaxLastDimF32`] when `x` is a contiguous float32
/// CPU tensor; `None` otherwise (the caller uses candle's op).
pub(crate) fn softmax_last_dim_f32(x: &Tensor) -> Result<Option<Tensor>> {
    if x.dtype() != candle_core::DType::F32
        || !x.device().is_cpu()
        || !x.is_contiguous()
        || x.rank() == 0
        || x.track_op()
    {
        return Ok(None);
    }
    x.apply_op1_no_bwd(&SoftmaxLastDimF32).map(Some)
}
