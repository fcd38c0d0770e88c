//! nnscope's own float32 GEMM for `Linear`/`Conv1D` on the CPU, used when no system library
//! (oneDNN, OpenBLAS) is installed, so `cargo install` users get it without a feature flag; the
//! instruction set is detected at run time.
//!
//! Two kernels, picked per product by its row count (measured on an Intel Xeon, Sapphire Rapids,
//! one thread; `bench --mode matmul --rows M`):
//!
//! - 2 to [`OWN_MAX_ROWS`] rows (prompts of a few dozen tokens, batched decode steps) on CPUs with
//!   AVX-512F: an AVX-512 register-blocked kernel of our own (module `avx512`): a tile of 6 rows x
//!   64 columns stays in 24 zmm accumulators while the inner dimension is walked in blocks of 256.
//!   It reads a weight stored `[in, out]` (what `blas::prepare_weight` gives `Linear`, and GPT-2's
//!   `Conv1D` weights as stored) in place for up to 6 rows, else from a 64 KiB packed panel, and
//!   packs a weight stored `[out, in]` (GPT-2's tied output head) by 16 x 16 transposes in registers.
//!   At 16 rows it reaches 100-105 GFLOP/s on one core against 85-88 for the `gemm` crate (oneDNN
//!   2.6: 132-143); whole 16-token forwards run as fast as with oneDNN's sgemm;
//! - one row (a decode step: the crate's GEMV streams the weight faster, 17-18 GFLOP/s against our
//!   15-17 and oneDNN's 17 at k = n = 1024-4096), more rows, AVX2-only CPUs, and up to 6 rows
//!   against a `[out, in]` weight (packing it would cost more than the product): the `gemm` crate
//!   (candle's kernel) called directly with the layout we have, built with its AVX-512 code
//!   (`x86-v4` feature, also picked at run time), which matches oneDNN's sgemm from 128 rows up
//!   (square 1024: 211-227 GFLOP/s against 220-222) but falls behind below 64 rows.

/// Name reported by `gemm_backend()` when this kernel is in use.
pub(crate) const NAME: &str = "nnscope-sgemm";

/// Whether this CPU runs the kernel (AVX-512F, or AVX2 with FMA).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            || (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[m, nc] = a[m, k] * op(b)` on the calling thread. `a` is row-major `[m, k]`; with `trans_b`,
/// `b` holds `nc` rows of `k` (row stride `ldb`) used transposed, otherwise `b` is `[k, nc]` with row
/// stride `ldb`; `c` has row stride `ldc`.
///
/// # Safety
/// `a` must hold `m * k` elements, `b` the elements described, `c` must be valid for writes of rows
/// `0..m`, columns `0..nc` at stride `ldc`, with no other thread touching those elements.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    nc: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    trans_b: bool,
    c: *mut f32,
    ldc: usize,
) {
    if m == 0 || nc == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if m <= OWN_MAX_ROWS
        && m > 1
        && (!trans_b || m > avx512::MR)
        && k > 0
        && is_x86_feature_detected!("avx512f")
    {
        avx512::sgemm(m, nc, k, a, b, ldb, trans_b, c, ldc);
        return;
    }
    sgemm_crate(m, nc, k, a, b, ldb, trans_b, c, ldc)
}

/// Products of at most this many rows go through our AVX-512 kernel (where the CPU has it), larger
/// ones through the `gemm` crate: at 64 rows the two were level (168 and 162 GFLOP/s, k = n =
/// 1024, one thread), at 128 the crate was ahead in whole forwards (GPT-2 1x128: 215 against
/// 221 ms CPU).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const OWN_MAX_ROWS: usize = 80;

/// [`sgemm`] through the `gemm` crate, single-threaded.
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_crate(
    m: usize,
    nc: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    trans_b: bool,
    c: *mut f32,
    ldc: usize,
) {
    let (rhs_cs, rhs_rs) = if trans_b {
        (ldb as isize, 1)
    } else {
        (1, ldb as isize)
    };
    // SAFETY: the strides describe the operands the caller vouches for; `read_dst` is false, so
    // `c` is only written (beta = 1, alpha unused).
    gemm::gemm(
        m,
        nc,
        k,
        c,
        1,
        ldc as isize,
        false,
        a,
        1,
        k as isize,
        b,
        rhs_cs,
        rhs_rs,
        0.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Rows of a register tile.
    pub(super) const MR: usize = 6;
    /// 16-wide column vectors of a register tile (64 columns): 6 x 4 accumulators + 4 weight
    /// vectors + 1 broadcast = 29 of the 32 zmm registers.
    const NV: usize = 4;
    const NR: usize = 16 * NV;
    /// Inner-dimension block: a `KC x NR` weight panel (64 KiB) stays in L2 while every row tile
    /// of the block passes over it.
    const KC: usize = 256;
    /// Row block: `MC x KC` of the packed input (up to 1 MiB) stays in L2 across the column panels.
    const MC: usize = 1020;
    /// Prefetch distance of [`pack`], in weight rows.
    const PF: usize = 8;
    /// Prefetch distance of [`pack_t`], in 16-element blocks of a weight row.
    const PF_T: usize = 2;
    /// Prefetch distance of the tile kernel, in rows of the weight panel.
    const PFD: usize = 6;

    /// See [`super::sgemm`]. The caller must have checked that the CPU has AVX-512F.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn sgemm(
        m: usize,
        nc: usize,
        k: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        trans_b: bool,
        c: *mut f32,
        ldc: usize,
    ) {
        sgemm_impl(m, nc, k, a, b, ldb, trans_b, c, ldc)
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn sgemm_impl(
        m: usize,
        nc: usize,
        k: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        trans_b: bool,
        c: *mut f32,
        ldc: usize,
    ) {
        // A packed `KC x NR` weight panel (contiguous, 64-byte aligned) when several row tiles pass
        // over it: read in place, rows `ldb` apart (often a multiple of 4 KiB), the panel's lines
        // fall into a few cache sets and evict each other.
        let packs_b = trans_b || m > MR;
        let mut buf = vec![0f32; if packs_b { KC * NR + 16 } else { 0 }];
        // 64-byte aligned start inside the buffer (16 spare elements); only used when `packs_b`.
        let off = buf.as_ptr().align_offset(64).min(16).min(buf.len());
        let pk = buf.as_mut_ptr().add(off);
        // The input rows, packed per block so that a tile's broadcasts read one stream.
        let use_apk = m > MR;
        let mut abuf: Vec<f32> = Vec::new();
        if use_apk {
            abuf = vec![0f32; m.min(MC).div_ceil(MR) * MR * k.min(KC) + 16];
        }
        let apk = abuf.as_mut_ptr();
        // Row blocks of equal size (multiples of MR), at most MC rows.
        let mcb = m.div_ceil(m.div_ceil(MC)).div_ceil(MR) * MR;
        for i0 in (0..m).step_by(mcb) {
            let mc = mcb.min(m - i0);
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                let acc = k0 > 0;
                if use_apk {
                    pack_a(mc, kc, a.add(i0 * k + k0), k, apk);
                }
                for j0 in (0..nc).step_by(NR) {
                    let w = NR.min(nc - j0);
                    let nv = w.div_ceil(16);
                    let rem = w - 16 * (nv - 1);
                    let mask: __mmask16 = if rem == 16 { 0xffff } else { (1u16 << rem) - 1 };
                    let (bp, lb) = if trans_b {
                        pack_t(kc, w, b.add(j0 * ldb + k0), ldb, pk);
                        (pk as *const f32, NR)
                    } else if mc > MR {
                        pack(kc, w, b.add(k0 * ldb + j0), ldb, pk);
                        (pk as *const f32, NR)
                    } else {
                        (b.add(k0 * ldb + j0), ldb)
                    };
                    let mut i = 0;
                    while i < mc {
                        let mr = MR.min(mc - i);
                        let cp = c.add((i0 + i) * ldc + j0);
                        if use_apk {
                            let ap = apk.add(i * kc);
                            tile(mr, nv, kc, ap, 1, MR, bp, lb, cp, ldc, mask, acc);
                        } else {
                            let ap = a.add((i0 + i) * k + k0);
                            tile(mr, nv, kc, ap, k, 1, bp, lb, cp, ldc, mask, acc);
                        }
                        i += mr;
                    }
                }
            }
        }
    }

    /// Packs `mc` rows of `kc` elements of `a` (row stride `lda`) into tiles of `MR` rows, each
    /// `kc` steps of `MR` consecutive values (the last tile's missing rows are left as they are).
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_a(mc: usize, kc: usize, a: *const f32, lda: usize, dst: *mut f32) {
        // Rows of a tile, 16 elements at a time, transposed in registers (rows past `mr` zero).
        const RM: __mmask16 = (1 << MR) - 1;
        for t0 in (0..mc).step_by(MR) {
            let mr = MR.min(mc - t0);
            let d = dst.add(t0 * kc);
            for p0 in (0..kc).step_by(16) {
                let cols = 16.min(kc - p0);
                let cm: __mmask16 = if cols == 16 {
                    0xffff
                } else {
                    (1u16 << cols) - 1
                };
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, x) in r.iter_mut().enumerate().take(mr) {
                    *x = _mm512_maskz_loadu_ps(cm, a.add((t0 + i) * lda + p0));
                }
                let t = transpose16(r);
                for (q, x) in t.iter().enumerate().take(cols) {
                    _mm512_mask_storeu_ps(d.add((p0 + q) * MR), RM, *x);
                }
            }
        }
    }

    /// Copies `kc` rows of `w` columns (row stride `ldb`) into `dst` with row stride `NR`.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack(kc: usize, w: usize, b: *const f32, ldb: usize, dst: *mut f32) {
        let nv = w.div_ceil(16);
        let rem = w - 16 * (nv - 1);
        let mask: __mmask16 = if rem == 16 { 0xffff } else { (1u16 << rem) - 1 };
        // Masked stores with a mask the compiler cannot see through: a plain copy loop becomes a
        // `memcpy` call per row.
        let full: __mmask16 = std::hint::black_box(0xffff);
        for p in 0..kc {
            let s = b.add(p * ldb);
            let d = dst.add(p * NR);
            // The rows are `ldb` apart, so the hardware prefetchers (which stay within a page) do
            // not see the stream coming: ask for row p + PF now.
            if p + PF < kc {
                let f = s.add(PF * ldb);
                for v in 0..nv {
                    _mm_prefetch::<_MM_HINT_T0>(f.add(16 * v).cast());
                }
            }
            for v in 0..nv {
                let m = if v == nv - 1 { mask } else { full };
                _mm512_mask_storeu_ps(d.add(16 * v), full, _mm512_maskz_loadu_ps(m, s.add(16 * v)));
            }
        }
    }

    /// Packs the transpose of `w` rows of `kc` elements (row stride `ldb`) into `dst` (`kc` rows of
    /// `NR`, columns past `w` zero), in 16 x 16 blocks transposed in registers.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_t(kc: usize, w: usize, b: *const f32, ldb: usize, dst: *mut f32) {
        for j0 in (0..w).step_by(16) {
            let rows = 16.min(w - j0);
            for p0 in (0..kc).step_by(16) {
                let cols = 16.min(kc - p0);
                let cm: __mmask16 = if cols == 16 {
                    0xffff
                } else {
                    (1u16 << cols) - 1
                };
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, x) in r.iter_mut().enumerate().take(rows) {
                    let s = b.add((j0 + i) * ldb + p0);
                    if p0 + 16 * PF_T < kc {
                        _mm_prefetch::<_MM_HINT_T0>(s.add(16 * PF_T).cast());
                    }
                    *x = _mm512_maskz_loadu_ps(cm, s);
                }
                let t = transpose16(r);
                for (q, x) in t.iter().enumerate().take(cols) {
                    _mm512_storeu_ps(dst.add((p0 + q) * NR + j0), *x);
                }
            }
        }
    }

    /// The 16 x 16 transpose of `a` (row `i` of the result is column `i` of `a`).
    #[inline(always)]
    unsafe fn transpose16(a: [__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]);
        }
        // u[4g + c], 128-bit lane L: column 4L + c of rows 4g..4g+4.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            u[4 * g] = _mm512_shuffle_ps::<0x44>(t[4 * g], t[4 * g + 2]);
            u[4 * g + 1] = _mm512_shuffle_ps::<0xee>(t[4 * g], t[4 * g + 2]);
            u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t[4 * g + 1], t[4 * g + 3]);
            u[4 * g + 3] = _mm512_shuffle_ps::<0xee>(t[4 * g + 1], t[4 * g + 3]);
        }
        let mut o = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let v1 = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
            let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
            o[c] = _mm512_shuffle_f32x4::<0x88>(v0, w0);
            o[8 + c] = _mm512_shuffle_f32x4::<0xdd>(v0, w0);
            o[4 + c] = _mm512_shuffle_f32x4::<0x88>(v1, w1);
            o[12 + c] = _mm512_shuffle_f32x4::<0xdd>(v1, w1);
        }
        o
    }

    /// Dispatches to the tile kernel of `mr` rows and `nv` vectors.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        mr: usize,
        nv: usize,
        kc: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        mask: __mmask16,
        acc: bool,
    ) {
        macro_rules! go {
            ($($r:literal),*) => {
                match (mr, nv) {
                    $(
                        ($r, 4) => kern::<$r, 4>(kc, a, ars, acs, b, ldb, c, ldc, mask, acc),
                        ($r, 3) => kern::<$r, 3>(kc, a, ars, acs, b, ldb, c, ldc, mask, acc),
                        ($r, 2) => kern::<$r, 2>(kc, a, ars, acs, b, ldb, c, ldc, mask, acc),
                        ($r, 1) => kern::<$r, 1>(kc, a, ars, acs, b, ldb, c, ldc, mask, acc),
                    )*
                    _ => unreachable!(),
                }
            };
        }
        go!(1, 2, 3, 4, 5, 6)
    }

    /// `c[R, 16 V] (+)= a[R, kc] * b[kc, 16 V]`; the last vector's columns are `mask`ed.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kern<const R: usize, const V: usize>(
        kc: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        mask: __mmask16,
        acc: bool,
    ) {
        let mut cr = [[_mm512_setzero_ps(); V]; R];
        if acc {
            for (r, row) in cr.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    let m = if v == V - 1 { mask } else { 0xffff };
                    *x = _mm512_maskz_loadu_ps(m, c.add(r * ldc + 16 * v));
                }
            }
        }
        let mut bp = b;
        let mut ap = a;
        let kpf = kc.saturating_sub(PFD);
        for p in 0..kc {
            if p < kpf {
                for v in 0..V {
                    _mm_prefetch::<_MM_HINT_T0>(bp.add(PFD * ldb + 16 * v).cast());
                }
            }
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = if v == V - 1 {
                    _mm512_maskz_loadu_ps(mask, bp.add(16 * v))
                } else {
                    _mm512_loadu_ps(bp.add(16 * v))
                };
            }
            for (r, row) in cr.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(r * ars));
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_fmadd_ps(av, bv[v], *x);
                }
            }
            bp = bp.add(ldb);
            ap = ap.add(acs);
        }
        for (r, row) in cr.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                let m = if v == V - 1 { mask } else { 0xffff };
                _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), m, *x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    type Sgemm =
        unsafe fn(usize, usize, usize, *const f32, *const f32, usize, bool, *mut f32, usize);

    /// The dispatching entry point and each kernel on its own, for every row count (the AVX-512
    /// one only where the CPU has AVX-512F).
    fn paths() -> Vec<(&'static str, Sgemm)> {
        let mut p: Vec<(&'static str, Sgemm)> =
            vec![("sgemm", super::sgemm), ("gemm crate", super::sgemm_crate)];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            p.push(("avx512", super::avx512::sgemm));
        }
        p
    }

    /// [`super::sgemm`] against candle's matmul for small row counts (1..=6: decode steps and
    /// short prompts), sizes that are not multiples of the tiles and blocks (16-wide vectors, 64
    /// columns, 6 rows, 256 inner), both weight layouts, and operands inside larger matrices
    /// (`ldb`, `ldc` above the used width), as `blas.rs` passes column blocks.
    #[test]
    fn matches_candle() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let ms = [1, 2, 3, 4, 5, 6, 7, 13, 16, 37, 130, 487];
        let shapes = [
            (1, 1),
            (17, 7),
            (64, 16),
            (65, 257),
            (130, 300),
            (200, 513),
            (15, 40),
        ];
        for &m in &ms {
            for &(n, k) in &shapes {
                if m > 130 && n > 65 {
                    continue;
                }
                let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
                // A weight with 3 extra columns ([out, in] layout) or rows ([in, out] layout), of
                // which the product uses the first n.
                let wt = Tensor::randn(0f32, 1., (n + 3, k), &dev)?; // [out, in]
                let wn = Tensor::randn(0f32, 1., (k, n + 3), &dev)?; // [in, out]
                let av = a.flatten_all()?.to_vec1::<f32>()?;
                for trans_b in [true, false] {
                    let (w, want) = if trans_b {
                        (&wt, a.matmul(&wt.narrow(0, 0, n)?.t()?)?)
                    } else {
                        (&wn, a.matmul(&wn.narrow(1, 0, n)?)?)
                    };
                    let bv = w.flatten_all()?.to_vec1::<f32>()?;
                    let ldb = if trans_b { k } else { n + 3 };
                    let ldc = n + 5;
                    let want = want.to_vec2::<f32>()?;
                    for (path, f) in paths() {
                        let mut c = vec![f32::NAN; m * ldc];
                        // SAFETY: a is m x k, b holds the n used rows/columns at stride ldb, c is m x ldc.
                        unsafe {
                            f(
                                m,
                                n,
                                k,
                                av.as_ptr(),
                                bv.as_ptr(),
                                ldb,
                                trans_b,
                                c.as_mut_ptr(),
                                ldc,
                            )
                        };
                        for i in 0..m {
                            for j in 0..n {
                                let (g, e) = (c[i * ldc + j], want[i][j]);
                                let tol = 1e-4 * (k as f32).sqrt() * (1.0 + e.abs());
                                assert!(
                                (g - e).abs() <= tol,
                                "{path}: m={m} n={n} k={k} trans_b={trans_b} ({i},{j}): {g} vs {e}"
                            );
                            }
                            // Columns past n are not written.
                            for j in n..ldc {
                                assert!(
                                    c[i * ldc + j].is_nan(),
                                    "{path}: m={m} n={n} k={k}: wrote column {j}"
                                );
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
