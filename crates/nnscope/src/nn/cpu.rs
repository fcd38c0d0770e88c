//! Small CPU kernels that candle 0.11 runs slower than they need to (found with bench/), and the
//! worker-pool helpers they share with the system GEMM path ([`super::blas`]).

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

/// A pointer that may cross threads: each task writes its own disjoint part of an output buffer.
pub(crate) struct SendPtr<T = f32>(pub(crate) *mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: the tasks given a `SendPtr` write disjoint ranges of the buffer, or only read it (see
// the callers).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// The pointer. A method (not a field read) so that closures capture the whole `Send` wrapper.
    pub(crate) fn get(self) -> *mut T {
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

/// Whether the CPU has AVX2 and FMA (checked once; the crate is compiled for baseline x86-64 and
/// kernels pick their AVX2 builds at run time).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
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
                let dst = softmax_rows_f32(&src[a..b], dim);
                Ok((CpuStorage::F32(dst), layout.shape().clone()))
            }
            // bfloat16 scores: widened, computed in float32 and rounded once on the way out, which
            // is what `to_dtype(F32)`, the float32 softmax and `to_dtype(BF16)` give, in one pass.
            CpuStorage::BF16(src) => {
                let dst = softmax_rows_bf16(&src[a..b], dim);
                Ok((CpuStorage::BF16(dst), layout.shape().clone()))
            }
            _ => candle_core::bail!("softmax-last-dim-f32: float32 or bfloat16 only"),
        }
    }
}

/// Softmax of each `dim`-long bfloat16 row of `src`: widened to float32, [`softmax_row_best`]
/// (the float32 kernel), rounded once to bfloat16.
fn softmax_rows_bf16(src: &[half::bf16], dim: usize) -> Vec<half::bf16> {
    let rows = src.len() / dim;
    let mut dst = vec![half::bf16::ZERO; src.len()];
    let row = |s: &[half::bf16], d: &mut [half::bf16], wide: &mut Vec<f32>, out: &mut Vec<f32>| {
        wide.clear();
        wide.extend(s.iter().map(|v| super::ops::widen(v.to_bits())));
        out.resize(dim, 0.0);
        softmax_row_best(wide, out);
        // SAFETY: `half::bf16` is `repr(transparent)` over its u16 bits.
        let d = unsafe { std::slice::from_raw_parts_mut(d.as_mut_ptr().cast::<u16>(), d.len()) };
        super::ops::narrow_slice(out, d);
    };
    if src.len() < 1 << 16 {
        let (mut wide, mut out) = (Vec::with_capacity(dim), Vec::with_capacity(dim));
        for (s, d) in src.chunks(dim).zip(dst.chunks_mut(dim)) {
            row(s, d, &mut wide, &mut out);
        }
    } else {
        let dp = SendPtr(dst.as_mut_ptr().cast::<f32>());
        par_for(rows, |range| {
            let (mut wide, mut out) = (Vec::with_capacity(dim), Vec::with_capacity(dim));
            for r in range {
                // SAFETY: each row index is handed to exactly one call; rows lie inside `dst`.
                let d = unsafe {
                    std::slice::from_raw_parts_mut(dp.get().cast::<half::bf16>().add(r * dim), dim)
                };
                row(&src[r * dim..(r + 1) * dim], d, &mut wide, &mut out);
            }
        });
    }
    dst
}

/// Softmax rows for float32, through [`softmax_row_best`] (vectorized `exp`, see there).
fn softmax_rows_f32(src: &[f32], dim: usize) -> Vec<f32> {
    let rows = src.len() / dim;
    let mut dst = vec![0f32; src.len()];
    if src.len() < 1 << 16 {
        for (s, d) in src.chunks(dim).zip(dst.chunks_mut(dim)) {
            softmax_row_best(s, d);
        }
    } else {
        let dp = SendPtr(dst.as_mut_ptr());
        par_for(rows, |range| {
            for r in range {
                // SAFETY: each row index is handed to exactly one call; rows lie inside `dst`.
                let d = unsafe { std::slice::from_raw_parts_mut(dp.get().add(r * dim), dim) };
                softmax_row_best(&src[r * dim..(r + 1) * dim], d);
            }
        });
    }
    dst
}

/// One softmax row: max, `exp` of the differences (0 below -87, see [`SoftmaxLastDimF32`]), sum,
/// divide. The exponentials use [`super::activation::exp`] (vectorizable, about 1 ulp from libm's
/// `expf`, which took a tenth of the tiny fixture's forward one scalar call at a time) and the sum
/// runs over 8 partial sums.
#[inline(always)]
fn softmax_row(s: &[f32], d: &mut [f32]) {
    // Whole 8-wide chunks, the tail padded with -inf (whose exps are 0), so that every step is one
    // vector operation: at the tiny fixture's 39 keys a scalar tail was half of each row.
    let pad = |c: &[f32]| {
        let mut t = [f32::NEG_INFINITY; 8];
        t[..c.len()].copy_from_slice(c);
        t
    };
    let (body, tail) = s.split_at(s.len() - s.len() % 8);
    let tail = pad(tail);
    // The maximum over 8 lanes (NaN is skipped, as `f32::max` skips it).
    let mut lanes = tail;
    for c in body.chunks_exact(8) {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    #[inline(always)]
    fn exps(c: &[f32], max: f32, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(c) {
            let e = v - max;
            let x = super::activation::exp(e);
            *o = if e < -87.0 { 0.0 } else { x };
        }
    }
    let (dbody, dtail) = d.split_at_mut(body.len());
    exps(body, max, dbody);
    let mut t = [0f32; 8];
    exps(&tail, max, &mut t);
    let n = dtail.len();
    dtail.copy_from_slice(&t[..n]);
    let mut acc = t;
    for c in dbody.chunks_exact(8) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let sum = acc.iter().sum::<f32>();
    for d in d.iter_mut() {
        *d /= sum;
    }
}

/// [`softmax_row`] in AVX2 intrinsics: the compiler's vectorization of the generic version left
/// rows of a few dozen keys (the tiny fixture's 39) mostly in scalar code, at 70-90 ns a row.
/// The exponential is [`super::activation::exp`]'s formula operation for operation (no fused
/// multiply-adds), so the result is the same as the generic version's up to the sum's order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(s: &[f32], d: &mut [f32]) {
    use std::arch::x86_64::*;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp(x: __m256) -> __m256 {
        use _mm256_set1_ps as set;
        const ROUND: f32 = 12_582_912.0;
        let xc = _mm256_min_ps(_mm256_max_ps(x, set(-87.3)), set(88.0));
        let n = _mm256_sub_ps(
            _mm256_add_ps(_mm256_mul_ps(xc, set(std::f32::consts::LOG2_E)), set(ROUND)),
            set(ROUND),
        );
        let r = _mm256_sub_ps(
            _mm256_sub_ps(xc, _mm256_mul_ps(n, set(0.693_359_4))),
            _mm256_mul_ps(n, set(-2.121_944_4e-4)),
        );
        let mut p = set(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), set(c));
        }
        let er = _mm256_add_ps(
            _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r),
            set(1.0),
        );
        let bits = _mm256_sub_epi32(
            _mm256_castps_si256(_mm256_add_ps(n, set(ROUND + 127.0))),
            _mm256_castps_si256(set(ROUND)),
        );
        let y = _mm256_mul_ps(er, _mm256_castsi256_ps(_mm256_slli_epi32(bits, 23)));
        _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q))
    }
    let len = s.len();
    let body = len - len % 8;
    let mut tail = [f32::NEG_INFINITY; 8];
    tail[..len - body].copy_from_slice(&s[body..]);
    // SAFETY (all loads and stores below): `i + 8 <= body <= len` for the slices' pointers, and
    // the tail goes through the 8-element local arrays.
    let (sp, dp) = (s.as_ptr(), d.as_mut_ptr());
    let mut m = _mm256_loadu_ps(tail.as_ptr());
    let mut i = 0;
    while i < body {
        // max(v, m) is v when v > m, else m (NaN skipped), as the generic version.
        m = _mm256_max_ps(_mm256_loadu_ps(sp.add(i)), m);
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let vmax = _mm256_set1_ps(max);
    let cut = _mm256_set1_ps(-87.0);
    macro_rules! one {
        ($v:expr) => {{
            let e = _mm256_sub_ps($v, vmax);
            let masked = _mm256_cmp_ps(e, cut, _CMP_LT_OQ);
            // Eight masked keys (half of a causal mask's rows): no exponential to compute.
            if _mm256_movemask_ps(masked) == 0xff {
                _mm256_setzero_ps()
            } else {
                _mm256_andnot_ps(masked, exp(e))
            }
        }};
    }
    let t = one!(_mm256_loadu_ps(tail.as_ptr()));
    let mut acc = t;
    _mm256_storeu_ps(tail.as_mut_ptr(), t);
    let mut i = 0;
    while i < body {
        let v = one!(_mm256_loadu_ps(sp.add(i)));
        _mm256_storeu_ps(dp.add(i), v);
        acc = _mm256_add_ps(acc, v);
        i += 8;
    }
    d[body..].copy_from_slice(&tail[..len - body]);
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let sum = lanes.iter().sum::<f32>();
    let vsum = _mm256_set1_ps(sum);
    let mut i = 0;
    while i < body {
        _mm256_storeu_ps(dp.add(i), _mm256_div_ps(_mm256_loadu_ps(dp.add(i)), vsum));
        i += 8;
    }
    for v in &mut d[body..] {
        *v /= sum;
    }
}

fn softmax_row_best(s: &[f32], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has the features the function is compiled for (checked just above).
        return unsafe { softmax_row_avx2(s, d) };
    }
    softmax_row(s, d)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The softmax kernel agrees with candle's over row lengths around the 8-wide chunks, with
    /// masked (`f32::MIN`) keys as attention masks put them.
    #[test]
    fn softmax_matches_candle() -> Result<()> {
        for dim in [1, 5, 8, 9, 16, 39, 100] {
            let x = Tensor::randn(0f32, 3.0, (7, dim), &Device::Cpu)?;
            let mut v = x.flatten_all()?.to_vec1::<f32>()?;
            for (i, e) in v.iter_mut().enumerate() {
                // A causal pattern: key k of row r is masked when k > r (every row keeps key 0).
                if i % dim > i / dim {
                    *e = f32::MIN;
                }
            }
            let x = Tensor::from_vec(v, (7, dim), &Device::Cpu)?;
            let Some(ours) = softmax_last_dim_f32(&x)? else {
                panic!("the kernel takes a contiguous float32 tensor");
            };
            let theirs = candle_nn::ops::softmax_last_dim(&x)?;
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "dim {dim}: max difference {diff}");
        }
        Ok(())
    }
}
