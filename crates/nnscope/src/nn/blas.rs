//! System GEMM kernels for `Linear`/`Conv1D` on the CPU, found at run time.
//!
//! candle's CPU matrix multiply (the `gemm` crate) reaches about a third to a half of what PyTorch
//! gets from oneDNN on AVX-512 machines, and it multiplies bfloat16 by converting to float32. So the
//! first CPU product looks for a system kernel and loads it when present:
//!
//! 1. oneDNN (`libdnnl.so.3`, `libdnnl.so.2`, `libdnnl.so`; Debian `libdnnl-dev`/`libdnnl2`, the kernel
//!    PyTorch uses): float32 through `dnnl_sgemm`, bfloat16 through `dnnl_gemm_bf16bf16f32`, which
//!    dispatches to AVX512-BF16/AMX code where the CPU has it;
//! 2. else OpenBLAS (`libopenblas.so.0`, `libopenblas.so`): float32 through `cblas_sgemm`;
//! 3. else nnscope's own float32 kernel (`nn/gemm_f32.rs`, reported as `nnscope-sgemm`) on x86-64
//!    CPUs with AVX-512F or AVX2+FMA: oneDNN's sgemm stays first because it was as fast or faster at
//!    128 rows and more;
//! 4. else candle's own kernel, as before. Nothing is needed at build time, so `cargo install` users
//!    get the system kernel without a feature flag.
//!
//! `NNSCOPE_GEMM=nnscope` (or `candle`, `dnnl`, `openblas`) forces one choice; a forced kernel that
//! cannot be loaded falls back to candle's. The cargo features `dnnl`/`openblas` link the library at
//! build time instead (the build then requires it) and skip the search. Everything that does not suit
//! the kernel (other dtypes, devices, strided inputs) keeps candle's path.
//!
//! The libraries run single-threaded; products are split by output columns over candle's own CPU
//! worker pool (`RAYON_NUM_THREADS` threads), so every kernel in a forward shares one pool.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use std::os::raw::{c_char, c_float, c_int};
use std::sync::OnceLock;

/// `dnnl_sgemm`: row-major C = alpha op(A) op(B) + beta C (oneDNN's BLAS-like API; returns a status).
type DnnlSgemm = unsafe extern "C" fn(
    c_char,
    c_char,
    i64,
    i64,
    i64,
    c_float,
    *const c_float,
    i64,
    *const c_float,
    i64,
    c_float,
    *mut c_float,
    i64,
) -> c_int;
/// `dnnl_gemm_bf16bf16f32`: as `dnnl_sgemm` with bfloat16 A and B (passed as their bits) and float32 C.
type DnnlGemmBf16 = unsafe extern "C" fn(
    c_char,
    c_char,
    i64,
    i64,
    i64,
    c_float,
    *const u16,
    i64,
    *const u16,
    i64,
    c_float,
    *mut c_float,
    i64,
) -> c_int;
/// `cblas_sgemm` (OpenBLAS).
type CblasSgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_float,
    *const c_float,
    c_int,
    *const c_float,
    c_int,
    c_float,
    *mut c_float,
    c_int,
);
/// `omp_set_num_threads` / `openblas_set_num_threads`.
type SetThreads = unsafe extern "C" fn(c_int);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// The entry points of the kernel in use.
#[derive(Clone, Copy)]
enum Kernel {
    Dnnl {
        sgemm: DnnlSgemm,
        bf16: Option<DnnlGemmBf16>,
        /// The OpenMP runtime's setter (per calling thread), when oneDNN runs on OpenMP.
        omp_set: Option<SetThreads>,
    },
    OpenBlas {
        sgemm: CblasSgemm,
    },
    /// nnscope's own float32 kernel (`nn/gemm_f32.rs`), no system library.
    Own,
}

/// A loaded kernel; `_lib` keeps a run-time-loaded library mapped for the life of the process.
struct Loaded {
    kernel: Kernel,
    name: &'static str,
    _lib: Option<libloading::Library>,
}

#[cfg(feature = "dnnl")]
mod linked {
    use std::os::raw::{c_char, c_float, c_int};
    #[link(name = "dnnl")]
    extern "C" {
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
        pub fn dnnl_gemm_bf16bf16f32(
            transa: c_char,
            transb: c_char,
            m: i64,
            n: i64,
            k: i64,
            alpha: c_float,
            a: *const u16,
            lda: i64,
            b: *const u16,
            ldb: i64,
            beta: c_float,
            c: *mut c_float,
            ldc: i64,
        ) -> c_int;
    }
    #[link(name = "gomp")]
    extern "C" {
        /// Debian's oneDNN runs on GNU OpenMP.
        pub fn omp_set_num_threads(n: c_int);
    }
}

#[cfg(all(feature = "openblas", not(feature = "dnnl")))]
mod linked {
    use std::os::raw::{c_float, c_int};
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
}

/// The kernel linked at build time (features `dnnl`/`openblas`).
#[cfg(feature = "dnnl")]
fn linked_kernel() -> Option<Loaded> {
    Some(Loaded {
        kernel: Kernel::Dnnl {
            sgemm: linked::dnnl_sgemm,
            bf16: Some(linked::dnnl_gemm_bf16bf16f32),
            omp_set: Some(linked::omp_set_num_threads),
        },
        name: "onednn",
        _lib: None,
    })
}
#[cfg(all(feature = "openblas", not(feature = "dnnl")))]
fn linked_kernel() -> Option<Loaded> {
    // SAFETY: a plain setter of the library's global thread count.
    unsafe { linked::openblas_set_num_threads(1) };
    Some(Loaded {
        kernel: Kernel::OpenBlas {
            sgemm: linked::cblas_sgemm,
        },
        name: "openblas",
        _lib: None,
    })
}
#[cfg(not(any(feature = "dnnl", feature = "openblas")))]
fn linked_kernel() -> Option<Loaded> {
    None
}

/// The first of `names` that loads.
fn open_any(names: &[&str]) -> Option<libloading::Library> {
    names.iter().find_map(|n| {
        // SAFETY: loading runs the library's initialisers; these are well-known system libraries
        // whose initialisers only set up their own state.
        unsafe { libloading::Library::new(*n) }.ok()
    })
}

/// oneDNN from the system, when installed.
fn load_dnnl() -> Option<Loaded> {
    let lib = open_any(&["libdnnl.so.3", "libdnnl.so.2", "libdnnl.so"])?;
    // SAFETY: the symbols are looked up by their C names and given the C signatures oneDNN 2.x and
    // 3.x declare in dnnl.h (`omp_set_num_threads` is the OpenMP runtime's, found through
    // oneDNN's dependencies when it runs on OpenMP). The pointers stay valid while `lib` is
    // loaded, which is for the rest of the process (it is kept in `Loaded`).
    unsafe {
        let sgemm = *lib.get::<DnnlSgemm>(b"dnnl_sgemm\0").ok()?;
        let bf16 = lib
            .get::<DnnlGemmBf16>(b"dnnl_gemm_bf16bf16f32\0")
            .ok()
            .map(|s| *s);
        let omp_set = lib
            .get::<SetThreads>(b"omp_set_num_threads\0")
            .ok()
            .map(|s| *s);
        Some(Loaded {
            kernel: Kernel::Dnnl {
                sgemm,
                bf16,
                omp_set,
            },
            name: "onednn",
            _lib: Some(lib),
        })
    }
}

/// OpenBLAS from the system, when installed.
fn load_openblas() -> Option<Loaded> {
    let lib = open_any(&["libopenblas.so.0", "libopenblas.so"])?;
    // SAFETY: C names with the signatures of OpenBLAS's cblas.h; valid while `lib` stays loaded
    // (for the rest of the process).
    unsafe {
        let sgemm = *lib.get::<CblasSgemm>(b"cblas_sgemm\0").ok()?;
        if let Ok(set) = lib.get::<SetThreads>(b"openblas_set_num_threads\0") {
            set(1);
        }
        Some(Loaded {
            kernel: Kernel::OpenBlas { sgemm },
            name: "openblas",
            _lib: Some(lib),
        })
    }
}

/// nnscope's own float32 kernel, when this CPU has the instructions it needs.
fn load_own() -> Option<Loaded> {
    super::gemm_f32::available().then_some(Loaded {
        kernel: Kernel::Own,
        name: "nnscope",
        _lib: None,
    })
}

/// The kernel of this process, chosen once (see the module docs).
fn kernel() -> Option<&'static Loaded> {
    static KERNEL: OnceLock<Option<Loaded>> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            let choice = std::env::var("NNSCOPE_GEMM").unwrap_or_default();
            match choice.trim().to_ascii_lowercase().as_str() {
                "candle" | "none" => None,
                "dnnl" | "onednn" => linked_kernel()
                    .filter(|k| k.name == "onednn")
                    .or_else(load_dnnl),
                "openblas" => linked_kernel()
                    .filter(|k| k.name == "openblas")
                    .or_else(load_openblas),
                "nnscope" | "native" => load_own(),
                _ => linked_kernel()
                    .or_else(load_dnnl)
                    .or_else(load_openblas)
                    .or_else(load_own),
            }
        })
        .as_ref()
}

/// Name of the kernel `Linear` uses for float32 CPU products in this process (`onednn-sgemm`,
/// `openblas-sgemm`, `nnscope-sgemm` or `candle-gemm`).
pub fn backend() -> &'static str {
    match kernel().map(|k| k.kernel) {
        Some(Kernel::Dnnl { .. }) => "onednn-sgemm",
        Some(Kernel::OpenBlas { .. }) => "openblas-sgemm",
        Some(Kernel::Own) => super::gemm_f32::NAME,
        None => "candle-gemm",
    }
}

/// Name of the kernel `Linear` uses for bfloat16 CPU products (`amx-bf16`, `onednn-gemm-bf16` or
/// `candle-gemm`).
pub fn backend_bf16() -> &'static str {
    if use_amx() {
        "amx-bf16"
    } else if bf16_kernel().is_some() {
        "onednn-gemm-bf16"
    } else {
        "candle-gemm"
    }
}

/// bfloat16 products through our AMX kernel ([`super::amx`]): on CPUs with AMX, unless
/// `NNSCOPE_GEMM=candle` asks for candle's kernel everywhere (or `NNSCOPE_AMX=0` for this one).
fn use_amx() -> bool {
    static CANDLE_ONLY: OnceLock<bool> = OnceLock::new();
    let candle_only = *CANDLE_ONLY.get_or_init(|| {
        let choice = std::env::var("NNSCOPE_GEMM").unwrap_or_default();
        matches!(
            choice.trim().to_ascii_lowercase().as_str(),
            "candle" | "none"
        )
    });
    !candle_only && super::amx::available()
}

fn bf16_kernel() -> Option<(DnnlGemmBf16, Option<SetThreads>)> {
    match kernel()?.kernel {
        Kernel::Dnnl {
            bf16: Some(f),
            omp_set,
            ..
        } => Some((f, omp_set)),
        _ => None,
    }
}

/// Element types the kernels multiply: float32 everywhere, bfloat16 through oneDNN.
trait GemmElem: Copy + Send + Sync {
    /// One library call: `a [m, k]` times `op(b)` into `nc` float32 columns of `c` (row stride
    /// `ldc`). With `trans_b`, `b` holds rows `[nc, k]` (stride `ldb`) and is used transposed;
    /// otherwise `b` is `[k, nc]` with row stride `ldb`.
    ///
    /// # Safety
    /// `a` must hold `m * k` elements, `b` the elements described, and `c` must be valid for writes
    /// of rows `0..m`, columns `0..nc` at stride `ldc`, with no other thread touching those elements.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        nc: usize,
        k: usize,
        a: *const Self,
        b: *const Self,
        ldb: usize,
        trans_b: bool,
        c: *mut f32,
        ldc: usize,
    ) -> candle_core::Result<()>;
}

impl GemmElem for f32 {
    unsafe fn gemm_raw(
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
        match kernel().map(|k| k.kernel) {
            Some(Kernel::Dnnl { sgemm, omp_set, .. }) => {
                // One OpenMP thread per call (the setting is per calling thread): the parallelism
                // is ours.
                if let Some(set) = omp_set {
                    set(1);
                }
                let tb = if trans_b { b'T' } else { b'N' };
                let st = sgemm(
                    b'N' as _, tb as _, m as i64, nc as i64, k as i64, 1.0, a, k as i64, b,
                    ldb as i64, 0.0, c, ldc as i64,
                );
                if st != 0 {
                    candle_core::bail!("dnnl_sgemm failed with status {st}");
                }
            }
            Some(Kernel::OpenBlas { sgemm }) => {
                let max = i32::MAX as usize;
                if m > max || nc > max || k > max || ldb > max || ldc > max {
                    candle_core::bail!("sgemm: dimensions exceed the 32-bit BLAS interface");
                }
                let tb = if trans_b { TRANS } else { NO_TRANS };
                sgemm(
                    ROW_MAJOR, NO_TRANS, tb, m as i32, nc as i32, k as i32, 1.0, a, k as i32, b,
                    ldb as i32, 0.0, c, ldc as i32,
                );
            }
            Some(Kernel::Own) => super::gemm_f32::sgemm(m, nc, k, a, b, ldb, trans_b, c, ldc),
            None => candle_core::bail!("sgemm: no system kernel loaded"),
        }
        Ok(())
    }
}

impl GemmElem for half::bf16 {
    unsafe fn gemm_raw(
        m: usize,
        nc: usize,
        k: usize,
        a: *const half::bf16,
        b: *const half::bf16,
        ldb: usize,
        trans_b: bool,
        c: *mut f32,
        ldc: usize,
    ) -> candle_core::Result<()> {
        let Some((gemm, omp_set)) = bf16_kernel() else {
            candle_core::bail!("gemm-bf16: no system kernel loaded");
        };
        if let Some(set) = omp_set {
            set(1);
        }
        let tb = if trans_b { b'T' } else { b'N' };
        // `half::bf16` is `repr(transparent)` over its u16 bits, the layout oneDNN's bfloat16 has.
        let st = gemm(
            b'N' as _,
            tb as _,
            m as i64,
            nc as i64,
            k as i64,
            1.0,
            a.cast(),
            k as i64,
            b.cast(),
            ldb as i64,
            0.0,
            c,
            ldc as i64,
        );
        if st != 0 {
            candle_core::bail!("dnnl_gemm_bf16bf16f32 failed with status {st}");
        }
        Ok(())
    }
}

/// A pointer to read-only operands that may cross threads.
#[derive(Clone, Copy)]
struct ConstPtr<T>(*const T);
// SAFETY: only read, while the owning slice is borrowed by the caller of `par_for`.
unsafe impl<T> Send for ConstPtr<T> {}
unsafe impl<T> Sync for ConstPtr<T> {}
impl<T> ConstPtr<T> {
    fn get(self) -> *const T {
        self.0
    }
}

/// `a [m, k]` times `b^T` (`b` is `[n, k]`, `trans_b`) or times `b` (`[k, n]`), row-major, into
/// float32 `c [m, n]`.
///
/// The library runs single-threaded and the product is split by output columns over `cpu::par_for`:
/// mixing OpenMP/pthread pools with candle's made them spin against each other on 2 cores.
fn gemm<T: GemmElem>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    b: &[T],
    trans_b: bool,
    c: &mut [f32],
) -> candle_core::Result<()> {
    use std::sync::Mutex;
    if a.len() < m * k || b.len() < n * k || c.len() < m * n {
        candle_core::bail!("gemm: buffers too small for {m}x{k} * ({n}x{k})^T");
    }
    let threads = super::cpu::par_threads();
    // Small products, or too few columns to share: one call on this thread. Below ~4M multiply-adds
    // (about 0.1 ms on one core) waking a parked worker can cost more than the split saves; but a
    // product of few rows (a decode step) is bound by reading `b`, not by its multiply-adds: from
    // 1 MiB of weights on (about 60 us on one core) two threads read it faster.
    let macs = m * n * k;
    let b_bytes = n * k * std::mem::size_of::<T>();
    let col_block = 64;
    let small = macs < (1 << 22) && b_bytes < (1 << 20);
    let chunks = if threads == 1 || small || n < 2 * col_block {
        1
    } else {
        // Two chunks per thread let a fast thread take over part of a descheduled one's share.
        (2 * threads).min(n / col_block)
    };
    if chunks == 1 {
        let ldb = if trans_b { k } else { n };
        // SAFETY: sizes checked above; `c` is exclusively borrowed.
        return unsafe {
            T::gemm_raw(
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
    let (ap, bp0) = (ConstPtr(a.as_ptr()), ConstPtr(b.as_ptr()));
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
                (unsafe { bp0.get().add(n0 * k) }, k)
            } else {
                // SAFETY: columns n0..n1 of `b` [k, n] are in bounds.
                (unsafe { bp0.get().add(n0) }, n)
            };
            // SAFETY: this task alone writes columns n0..n1 of every row of `c`, which stay inside
            // its m * n elements; `a` and `bp` are in bounds as above.
            let r = unsafe {
                T::gemm_raw(
                    m,
                    n1 - n0,
                    k,
                    ap.get(),
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
/// a contiguous `[k, n]` matrix (GPT-2's `Conv1D` weights, used as stored), float32 or bfloat16 on
/// the CPU. bfloat16 products accumulate in float32 and are rounded to bfloat16 once, at the end.
struct MatmulNt {
    /// bfloat16 operands: return the float32 accumulator instead of rounding it.
    f32_out: bool,
}

/// Operand layout of a [`MatmulNt`] call: `(m, n, k, lhs range, rhs offset, trans_b)`.
type NtLayout = (usize, usize, usize, (usize, usize), usize, bool);

/// Operand layout checks shared by both dtypes.
fn nt_layout(l1: &candle_core::Layout, l2: &candle_core::Layout) -> candle_core::Result<NtLayout> {
    let (m, k) = l1.shape().dims2()?;
    let (n, k2) = l2.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("gemm-nt: inner dimensions differ ({k} vs {k2})");
    }
    let Some(a) = l1.contiguous_offsets() else {
        candle_core::bail!("gemm-nt: contiguous lhs only");
    };
    let trans_b = if l2.is_contiguous() {
        true
    } else if l2.stride() == [1, n] {
        false
    } else {
        candle_core::bail!("gemm-nt: rhs must be contiguous or a transposed contiguous matrix");
    };
    Ok((m, n, k, a, l2.start_offset(), trans_b))
}

impl candle_core::CustomOp2 for MatmulNt {
    fn name(&self) -> &'static str {
        "gemm-nt"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (m, n, k, (a0, a1), b0, trans_b) = nt_layout(l1, l2)?;
        match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let mut c = vec![0f32; m * n];
                let Some(b) = b.get(b0..b0 + n * k) else {
                    candle_core::bail!("gemm-nt: rhs storage too small");
                };
                gemm(m, n, k, &a[a0..a1], b, trans_b, &mut c)?;
                Ok((CpuStorage::F32(c), (m, n).into()))
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
                let Some(b) = b.get(b0..b0 + n * k) else {
                    candle_core::bail!("gemm-nt: rhs storage too small");
                };
                if trans_b && use_amx() {
                    let a = &a[a0..a1];
                    return Ok(if self.f32_out {
                        CpuStorage::F32(super::amx::matmul_nt(m, n, k, a, b, k)?)
                    } else {
                        CpuStorage::BF16(super::amx::matmul_nt(m, n, k, a, b, k)?)
                    })
                    .map(|s| (s, (m, n).into()));
                }
                let mut c = vec![0f32; m * n];
                gemm(m, n, k, &a[a0..a1], b, trans_b, &mut c)?;
                if self.f32_out {
                    return Ok((CpuStorage::F32(c), (m, n).into()));
                }
                Ok((CpuStorage::BF16(to_bf16(&c)), (m, n).into()))
            }
            _ => candle_core::bail!("gemm-nt: float32 or bfloat16 operands of one dtype only"),
        }
    }
}

/// Rounds float32 to bfloat16 (nearest, ties to even), split over the worker pool when large.
/// (`ops::narrow`, which vectorizes: `half`'s scalar conversion took 12% of a 128-token product.)
fn to_bf16(c: &[f32]) -> Vec<half::bf16> {
    let mut out = vec![half::bf16::ZERO; c.len()];
    let block = 1 << 14;
    if c.len() < 2 * block {
        // SAFETY: `half::bf16` is `repr(transparent)` over its u16 bits.
        let o =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u16>(), out.len()) };
        super::ops::narrow_slice(c, o);
    } else {
        let op = super::cpu::SendPtr(out.as_mut_ptr().cast::<f32>());
        super::cpu::par_for(c.len().div_ceil(block), |range| {
            for i in range {
                let (s, e) = (i * block, ((i + 1) * block).min(c.len()));
                // SAFETY: block `i` of `out` is written by this call alone and lies inside `out`.
                let o =
                    unsafe { std::slice::from_raw_parts_mut(op.get().cast::<u16>().add(s), e - s) };
                super::ops::narrow_slice(&c[s..e], o);
            }
        });
    }
    out
}

/// Whether the system kernel multiplies this dtype (float32: any kernel; bfloat16: oneDNN).
fn kernel_takes(dtype: DType) -> bool {
    match dtype {
        DType::F32 => kernel().is_some(),
        DType::BF16 => use_amx() || bf16_kernel().is_some(),
        _ => false,
    }
}

/// A `Conv1D` weight stored `[in, out]`, returned as `(weight [in, out], weight^T [out, in])`, both
/// views of one storage. bfloat16 on an AMX CPU keeps `[out, in]` contiguous, the layout the AMX
/// kernel reads (one transposition at load); otherwise the storage stays as loaded.
pub(crate) fn prepare_conv1d_weight(w: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    if w.device().is_cpu() && w.rank() == 2 && w.dtype() == DType::BF16 && use_amx() {
        let wt = if w.is_contiguous() && !w.track_op() {
            w.apply_op1_no_bwd(&Transpose)?
        } else {
            w.t()?.contiguous()?
        };
        return Ok((wt.t()?, wt));
    }
    let wt = w.t()?;
    Ok((w, wt))
}

/// A `Linear` weight `[out, in]` in the layout the system kernel is fastest with, prepared once at
/// load: with a system kernel or nnscope's own, float32 CPU weights are stored transposed
/// (`[in, out]` contiguous) and returned as the `[out, in]` view of that storage, so shape and values
/// are unchanged. oneDNN's sgemm reads `x W` about 3x faster than `x W^T` at 16 tokens (it re-packs
/// a transposed weight on every call) and 1.3x faster at 128; nnscope's kernel reads `x W` in place.
/// Otherwise the weight is returned as is.
pub(crate) fn prepare_weight(w: Tensor) -> candle_core::Result<Tensor> {
    // float32 only: oneDNN's bfloat16 (AMX) GEMM was faster with the weight as stored, `x W^T`
    // (LLaMA-246M bfloat16 forward, 2 threads: 1x16 44 -> 34 ms, 1x128 136-139 -> 120-127 ms,
    // 8x128 unchanged), and loading skips the copy.
    if w.device().is_cpu() && w.rank() == 2 && w.dtype() == DType::F32 && kernel_takes(w.dtype()) {
        if w.is_contiguous() && !w.track_op() {
            return w.apply_op1_no_bwd(&Transpose)?.t();
        }
        return w.t()?.contiguous()?.t();
    }
    Ok(w)
}

/// `[n, k]` contiguous -> its transpose `[k, n]` contiguous, in cache-sized tiles over the worker
/// pool. candle's strided copy walks the source element by element with an index computation per
/// element; on a 7B checkpoint that made loading take over a minute.
struct Transpose;

impl candle_core::CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "transpose-2d"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (n, k) = layout.shape().dims2()?;
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("transpose-2d: contiguous input only");
        };
        let out = match storage {
            CpuStorage::F32(s) => CpuStorage::F32(transpose(&s[a..b], n, k)),
            CpuStorage::BF16(s) => CpuStorage::BF16(transpose(&s[a..b], n, k)),
            CpuStorage::F16(s) => CpuStorage::F16(transpose(&s[a..b], n, k)),
            _ => candle_core::bail!("transpose-2d: float32, bfloat16 or float16 only"),
        };
        Ok((out, (k, n).into()))
    }
}

fn transpose<T: Copy + Default + Send + Sync>(src: &[T], n: usize, k: usize) -> Vec<T> {
    const TILE: usize = 32;
    let mut dst = vec![T::default(); n * k];
    let dp = super::cpu::SendPtr(dst.as_mut_ptr().cast::<f32>());
    // Tasks are bands of TILE source rows; each writes columns [r0, r1) of every output row.
    super::cpu::par_for(n.div_ceil(TILE), |bands| {
        let d = dp.get().cast::<T>();
        for band in bands {
            let (r0, r1) = (band * TILE, ((band + 1) * TILE).min(n));
            for c0 in (0..k).step_by(TILE) {
                let c1 = (c0 + TILE).min(k);
                for r in r0..r1 {
                    let row = &src[r * k..(r + 1) * k];
                    for (c, &v) in row.iter().enumerate().take(c1).skip(c0) {
                        // SAFETY: output element (c, r) lies inside `dst` (k * n elements) and
                        // column r belongs to this band alone.
                        unsafe { *d.add(c * n + r) = v };
                    }
                }
            }
        }
    });
    dst
}

/// `x [m, k]` times `w^T` (`w [n, k]`) through the system kernel, when one is loaded and the
/// operands suit it (float32, or bfloat16 with oneDNN; CPU; contiguous). `None` means: use candle's
/// matmul.
pub(crate) fn matmul_nt(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    matmul_nt_with(x, w, false)
}

/// [`matmul_nt`] for bfloat16 operands, returning the float32 accumulator unrounded (for a bias to
/// be added before the single rounding torch does). `None` when [`matmul_nt`] would decline.
pub(crate) fn matmul_nt_f32_out(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if x.dtype() != DType::BF16 {
        return Ok(None);
    }
    matmul_nt_with(x, w, true)
}

fn matmul_nt_with(x: &Tensor, w: &Tensor, f32_out: bool) -> candle_core::Result<Option<Tensor>> {
    let dt = x.dtype();
    let cpu2 = |t: &Tensor| t.device().is_cpu() && t.rank() == 2;
    if w.dtype() != dt || !cpu2(x) || !cpu2(w) || !x.is_contiguous() || !kernel_takes(dt) {
        return Ok(None);
    }
    // On a gradient path: candle's matmul, which has a backward (this kernel has none).
    if x.track_op() || w.track_op() {
        return Ok(None);
    }
    let w_ok = w.is_contiguous() || w.stride() == [1, w.dim(0)?];
    if !w_ok {
        return Ok(None);
    }
    // The AMX kernel reads `[n, k]` contiguous weights only; other bfloat16 layouts need oneDNN.
    if dt == DType::BF16 && !(use_amx() && w.is_contiguous()) && bf16_kernel().is_none() {
        return Ok(None);
    }
    x.apply_op2_no_bwd(w, &MatmulNt { f32_out }).map(Some)
}

/// A batch of float32 products `a_i [m, k] * b_i` for `a` `[.., m, k]` and `b` `[.., k, n]` with
/// equal batch dimensions (attention's `q @ k^T` and `p @ v`) through the system kernel, one
/// product per task on the worker pool. `b` is read in place when it is contiguous or a transposed
/// view of a contiguous `[.., n, k]` (`k.transpose(-1, -2)`). `None` means: use candle's matmul
/// (no kernel, other dtypes or devices, a gradient path, shapes candle would reject).
pub(crate) fn batched_matmul_f32(a: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let suits = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op();
    if !suits(a) || !suits(b) || !kernel_takes(DType::F32) {
        return Ok(None);
    }
    let Some((batch, m, k, n)) = super::ops::batched_dims(a, b) else {
        return Ok(None);
    };
    if m < super::ops::MATMUL_MIN_ROWS {
        return Ok(None);
    }
    let r = a.rank();
    let a = a.contiguous()?;
    let bt = b.transpose(r - 2, r - 1)?;
    let (b, trans_b) = if bt.is_contiguous() {
        (bt, true)
    } else {
        (b.contiguous()?, false)
    };
    let mut c = vec![0f32; batch * m * n];
    {
        let (ag, al) = a.storage_and_layout();
        let (bg, bl) = b.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(av)), Storage::Cpu(CpuStorage::F32(bv))) = (&*ag, &*bg)
        else {
            return Ok(None);
        };
        let (Some((a0, _)), Some((b0, _))) = (al.contiguous_offsets(), bl.contiguous_offsets())
        else {
            return Ok(None);
        };
        let (av, bv) = (&av[a0..a0 + batch * m * k], &bv[b0..b0 + batch * n * k]);
        if batch == 1 || batch * m * n * k < 1 << 20 {
            for ((ai, bi), ci) in av
                .chunks_exact(m * k)
                .zip(bv.chunks_exact(n * k))
                .zip(c.chunks_exact_mut(m * n))
            {
                gemm(m, n, k, ai, bi, trans_b, ci)?;
            }
        } else {
            let cp = super::cpu::SendPtr(c.as_mut_ptr());
            let (ap, bp) = (ConstPtr(av.as_ptr()), ConstPtr(bv.as_ptr()));
            let err = std::sync::Mutex::new(None);
            super::cpu::par_for(batch, |range| {
                for i in range {
                    // SAFETY: product `i` reads its own `m * k` and `n * k` elements (inside the
                    // slices above) and alone writes its `m * n` elements of `c`.
                    let res = unsafe {
                        f32::gemm_raw(
                            m,
                            n,
                            k,
                            ap.get().add(i * m * k),
                            bp.get().add(i * n * k),
                            if trans_b { k } else { n },
                            trans_b,
                            cp.get().add(i * m * n),
                            n,
                        )
                    };
                    if let Err(e) = res {
                        if let Ok(mut slot) = err.lock() {
                            *slot = Some(e);
                        }
                    }
                }
            });
            if let Ok(Some(e)) = err.into_inner() {
                return Err(e);
            }
        }
    }
    let mut dims = a.dims()[..r - 2].to_vec();
    dims.extend([m, n]);
    Tensor::from_vec(c, dims, a.device()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The system kernel's products against candle's own matmul, float32 and bfloat16, for 1..=6
    /// rows (a decode step to a short prompt) and column counts that do not divide the blocks. Runs on whatever kernel this machine has; without one, `matmul_nt`
    /// declines and the test checks that it does.
    #[test]
    fn transpose_matches_candle() -> candle_core::Result<()> {
        let w = Tensor::randn(0f32, 1., (130, 70), &Device::Cpu)?;
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let w = w.to_dtype(dt)?;
            let ours = w.apply_op1_no_bwd(&Transpose)?;
            let want = w.t()?.contiguous()?;
            assert_eq!(ours.dims(), want.dims());
            let diff = (ours.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{dt:?}");
        }
        Ok(())
    }

    #[test]
    fn products_match_candle() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (k, n) = (300, 1100);
        let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
        for dt in [DType::F32, DType::BF16] {
            let wd = w.to_dtype(dt)?;
            let prepared = prepare_weight(wd.clone())?;
            for m in 1..=6 {
                let x = Tensor::randn(0f32, 1., (m, k), &dev)?.to_dtype(dt)?;
                let Some(ours) = matmul_nt(&x, &prepared)? else {
                    assert!(!kernel_takes(dt));
                    continue;
                };
                let want = x
                    .to_dtype(DType::F32)?
                    .matmul(&wd.to_dtype(DType::F32)?.t()?)?;
                let err = (ours.to_dtype(DType::F32)? - &want)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                // float32: sums of 300 products in another order; bfloat16: one final rounding
                // (half a unit in the last place is 2^-9 of the value; allow a whole unit).
                let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                let tol = if dt == DType::F32 {
                    1e-4
                } else {
                    scale / 128.0
                };
                assert!(err <= tol, "{dt:?} m={m}: max error {err}");
            }
        }
        Ok(())
    }
}
