//! Optional system GEMM kernels for `Linear`/`Conv1D` on the CPU.
//!
//! candle's CPU matrix multiply (the `gemm` crate) reaches about a third to a half of what PyTorch
//! gets from oneDNN on AVX-512 machines. With the cargo feature `dnnl` (Debian: `libdnnl-dev`, the
//! kernel PyTorch uses) or `openblas` (Debian: `libopenblas-dev`), float32 products of contiguous
//! CPU tensors go through that library's `sgemm` instead. Everything else (other dtypes, devices,
//! strided inputs) keeps candle's path, which is also the whole story in the default build, so the
//! default build needs no system package.
//!
//! The libraries run single-threaded; products are split by output columns over candle's own CPU
//! worker pool (`RAYON_NUM_THREADS` threads), so every kernel in a forward shares one pool.

use candle_core::Tensor;

/// Name of the kernel `Linear` uses for float32 CPU products in this build.
pub fn backend() -> &'static str {
    if cfg!(feature = "dnnl") {
        "onednn-sgemm"
    } else if cfg!(feature = "openblas") {
        "openblas-sgemm"
    } else {
        "candle-gemm"
    }
}

#[cfg(any(feature = "dnnl", feature = "openblas"))]
mod ffi {
    #[cfg(feature = "dnnl")]
    use std::os::raw::c_char;
    use std::os::raw::{c_float, c_int};

    #[cfg(feature = "dnnl")]
    #[link(name = "dnnl")]
    extern "C" {
        /// Row-major C = alpha op(A) op(B) + beta C (oneDNN's BLAS-like API; returns a status).
        pub fn dnnl_sgemm(
            transa: c_char,
            transb: c_char,
            m: i64,
            n: i64,
            k: i64,
            alpha: c_float,
            a: *const c_float,
            lda: i64,
            b: *const c_float,
            ldb: i64,
            beta: c_float,
            c: *mut c_float,
            ldc: i64,
        ) -> c_int;
    }
    #[cfg(feature = "dnnl")]
    #[link(name = "gomp")]
    extern "C" {
        /// Debian's oneDNN runs on GNU OpenMP.
        pub fn omp_set_num_threads(n: c_int);
    }

    #[cfg(all(feature = "openblas", not(feature = "dnnl")))]
    #[link(name = "openblas")]
    extern "C" {
        pub fn cblas_sgemm(
            order: c_int,
            transa: c_int,
            transb: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: c_float,
            a: *const c_float,
            lda: c_int,
            b: *const c_float,
            ldb: c_int,
            beta: c_float,
            c: *mut c_float,
            ldc: c_int,
        );
        pub fn openblas_set_num_threads(n: c_int);
    }
    #[cfg(all(feature = "openblas", not(feature = "dnnl")))]
    pub const ROW_MAJOR: c_int = 101;
    #[cfg(all(feature = "openblas", not(feature = "dnnl")))]
    pub const NO_TRANS: c_int = 111;
    #[cfg(all(feature = "openblas", not(feature = "dnnl")))]
    pub const TRANS: c_int = 112;
}

/// One library call: `a [m, k]` times `op(b)` into `nc` columns of `c` (row stride `ldc`). With
/// `trans_b`, `b` holds rows `[nc, k]` (stride `ldb`) and is used transposed; otherwise `b` is
/// `[k, nc]` with row stride `ldb`.
///
/// # Safety
/// `a` must hold `m * k` floats, `b` the elements described, and `c` must be valid for writes of
/// rows `0..m`, columns `0..nc` at stride `ldc`, with no other thread touching those elements.
#[cfg(any(feature = "dnnl", feature = "openblas"))]
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_raw(
    m: usize,
    nc: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    trans_b: bool,
    c: *mut f32,
    ldc: usize,
) -> candle_core::Result<()> {
    #[cfg(feature = "dnnl")]
    {
        // One OpenMP thread per call (the setting is per calling thread): the parallelism is ours.
        ffi::omp_set_num_threads(1);
        let tb = if trans_b { b'T' } else { b'N' };
        let st = ffi::dnnl_sgemm(
            b'N' as _, tb as _, m as i64, nc as i64, k as i64, 1.0, a, k as i64, b, ldb as i64,
            0.0, c, ldc as i64,
        );
        if st != 0 {
            candle_core::bail!("dnnl_sgemm failed with status {st}");
        }
    }
    #[cfg(all(feature = "openblas", not(feature = "dnnl")))]
    {
        let max = i32::MAX as usize;
        if m > max || nc > max || k > max || ldb > max || ldc > max {
            candle_core::bail!("sgemm: dimensions exceed the 32-bit BLAS interface");
        }
        let tb = if trans_b { ffi::TRANS } else { ffi::NO_TRANS };
        ffi::cblas_sgemm(
            ffi::ROW_MAJOR,
            ffi::NO_TRANS,
            tb,
            m as i32,
            nc as i32,
            k as i32,
            1.0,
            a,
            k as i32,
            b,
            ldb as i32,
            0.0,
            c,
            ldc as i32,
        );
    }
    Ok(())
}

/// `a [m, k]` times `b^T` (`b` is `[n, k]`, `trans_b`) or times `b` (`[k, n]`), row-major, into
/// `c [m, n]`.
///
/// The library runs single-threaded and the product is split by output columns over `cpu::par_for`:
/// mixing OpenMP/pthread pools with candle's made them spin against each other on 2 cores.
#[cfg(any(feature = "dnnl", feature = "openblas"))]
fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    trans_b: bool,
    c: &mut [f32],
) -> candle_core::Result<()> {
    use std::sync::{Mutex, Once};
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(feature = "openblas", not(feature = "dnnl")))]
        // SAFETY: a plain setter of the library's global thread count.
        unsafe {
            ffi::openblas_set_num_threads(1)
        };
    });
    if a.len() < m * k || b.len() < n * k || c.len() < m * n {
        candle_core::bail!("sgemm: buffers too small for {m}x{k} * ({n}x{k})^T");
    }
    let threads = super::cpu::par_threads();
    // Small products, or too few columns to share: one call on this thread. Below ~4M multiply-adds
    // (about 0.1 ms on one core) waking a parked worker can cost more than the split saves.
    let macs = m * n * k;
    let col_block = 64;
    let chunks = if threads == 1 || macs < (1 << 22) || n < 2 * col_block {
        1
    } else {
        // Two chunks per thread let a fast thread take over part of a descheduled one's share.
        (2 * threads).min(n / col_block)
    };
    if chunks == 1 {
        // SAFETY: sizes checked above; `c` is exclusively borrowed.
        let ldb = if trans_b { k } else { n };
        return unsafe {
            sgemm_raw(
                m,
                n,
                k,
                a.as_ptr(),
                b.as_ptr(),
                ldb,
                trans_b,
                c.as_mut_ptr(),
                n,
            )
        };
    }
    // Column ranges, multiples of `col_block` except the last.
    let per = n.div_ceil(chunks).div_ceil(col_block) * col_block;
    let cp = super::cpu::SendPtr(c.as_mut_ptr());
    let err = Mutex::new(None);
    super::cpu::par_for(chunks, |range| {
        for i in range {
            let n0 = (i * per).min(n);
            let n1 = ((i + 1) * per).min(n);
            if n0 == n1 {
                continue;
            }
            let (bp, ldb) = if trans_b {
                // SAFETY: rows n0..n1 of `b` [n, k] are in bounds (n * k checked above).
                (unsafe { b.as_ptr().add(n0 * k) }, k)
            } else {
                // SAFETY: columns n0..n1 of `b` [k, n] are in bounds.
                (unsafe { b.as_ptr().add(n0) }, n)
            };
            // SAFETY: this task alone writes columns n0..n1 of every row of `c`, which stay inside
            // its m * n elements; `a` and `bp` are in bounds as above.
            let r = unsafe {
                sgemm_raw(
                    m,
                    n1 - n0,
                    k,
                    a.as_ptr(),
                    bp,
                    ldb,
                    trans_b,
                    cp.get().add(n0),
                    n,
                )
            };
            if let Err(e) = r {
                if let Ok(mut slot) = err.lock() {
                    *slot = Some(e);
                }
            }
        }
    });
    match err.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// The candle op: lhs `[m, k]` contiguous, rhs `[n, k]` either contiguous or the transposed view of
/// a contiguous `[k, n]` matrix (GPT-2's `Conv1D` weights, used as stored), float32 on the CPU.
#[cfg(any(feature = "dnnl", feature = "openblas"))]
struct MatmulNt;

#[cfg(any(feature = "dnnl", feature = "openblas"))]
impl candle_core::CustomOp2 for MatmulNt {
    fn name(&self) -> &'static str {
        "sgemm-nt"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("sgemm-nt: float32 only");
        };
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("sgemm-nt: inner dimensions differ ({k} vs {k2})");
        }
        let Some((a0, a1)) = l1.contiguous_offsets() else {
            candle_core::bail!("sgemm-nt: contiguous lhs only");
        };
        let (trans_b, b0) = if l2.is_contiguous() {
            (true, l2.start_offset())
        } else if l2.stride() == [1, n] {
            (false, l2.start_offset())
        } else {
            candle_core::bail!(
                "sgemm-nt: rhs must be contiguous or a transposed contiguous matrix"
            );
        };
        let Some(b) = b.get(b0..b0 + n * k) else {
            candle_core::bail!("sgemm-nt: rhs storage too small");
        };
        let mut c = vec![0f32; m * n];
        sgemm(m, n, k, &a[a0..a1], b, trans_b, &mut c)?;
        Ok((CpuStorage::F32(c), (m, n).into()))
    }
}

/// A `Linear` weight `[out, in]` in the layout the system kernel is fastest with, prepared once at
/// load: with a system kernel, float32 CPU weights are stored transposed (`[in, out]` contiguous)
/// and returned as the `[out, in]` view of that storage, so shape and values are unchanged. oneDNN's
/// sgemm reads `x W` about 3x faster than `x W^T` at 16 tokens (it re-packs a transposed weight on
/// every call) and 1.3x faster at 128. Without a system kernel the weight is returned as is.
pub(crate) fn prepare_weight(w: Tensor) -> candle_core::Result<Tensor> {
    #[cfg(any(feature = "dnnl", feature = "openblas"))]
    if w.dtype() == candle_core::DType::F32 && w.device().is_cpu() && w.rank() == 2 {
        return w.t()?.contiguous()?.t();
    }
    Ok(w)
}

/// `x [m, k]` times `w^T` (`w [n, k]`) through the system kernel, when this build has one and the
/// operands suit it (float32, CPU, contiguous). `None` means: use candle's matmul.
pub(crate) fn matmul_nt(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    #[cfg(any(feature = "dnnl", feature = "openblas"))]
    {
        use candle_core::DType;
        let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && t.rank() == 2;
        let w_ok = w.is_contiguous() || w.stride() == [1, w.dim(0)?];
        // On a gradient path: candle's matmul, which has a backward (this kernel has none).
        let tracked = x.track_op() || w.track_op();
        if f32_cpu(x) && f32_cpu(w) && x.is_contiguous() && w_ok && !tracked {
            return x.apply_op2_no_bwd(w, &MatmulNt).map(Some);
        }
    }
    let _ = (x, w);
    Ok(None)
}
