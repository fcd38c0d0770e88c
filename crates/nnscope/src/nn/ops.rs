//! Python's arithmetic operators as functions: `ops::add(a, b)` is `a + b`, `ops::mul(a, b)` is
//! `a * b`, both broadcasting like torch, and `ops::scale(x, s)` is `x * s` for a Python float.
//!
//! Like the operators in Python, they are not hookpoints: `#[hooked]` leaves calls through an
//! `ops::` path alone, so model code may use them where the Python it ports writes `+` or `*`
//! without adding `.source` entries nnsight would not have.
//!
//! They exist for speed. candle 0.11 adds and multiplies bfloat16 tensors through AVX helpers that
//! are not inlined into its loops (one call per load, per store and per conversion), which made
//! those element-wise ops 40% of a bfloat16 LLaMA forward (measured with `perf` on the bench's
//! 246M checkpoint, 1 x 128 tokens). The kernel here does what torch does for a bfloat16 add or
//! multiply: widen both operands to float32, compute, round to nearest even; so results are
//! bit-identical to candle's and to torch's. Other dtypes, other devices and values on a gradient
//! path go to candle's ops unchanged.

use super::cpu::par_for;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use half::bf16;

/// `a + b` with broadcasting.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, Op::Add)
}

/// `a * b` with broadcasting.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, Op::Mul)
}

/// `x * s` for a Python float `s` (attention's `* scaling`).
///
/// For bfloat16 this is also a matter of numerics: torch multiplies a bfloat16 tensor by a Python
/// float in float32 and rounds once, while candle's `affine` first rounds the factor itself to
/// bfloat16 (1/sqrt(128) becomes 0.0883789 instead of 0.0883883), which changes about one score in
/// forty by a unit in the last place at head_dim 128.
pub fn scale(x: &Tensor, s: f64) -> Result<Tensor> {
    if x.dtype() != DType::BF16 || !x.device().is_cpu() || x.track_op() {
        return x.affine(s, 0.0);
    }
    x.apply_op1_no_bwd(&Bf16Scale(s as f32, Op::Mul))
}

/// `a @ b`: `torch.matmul` for tensors of two or more dimensions with equal batch dimensions (what
/// candle's `Tensor::matmul` takes; anything else goes to it unchanged, errors included).
///
/// `#[hooked]` sends every method call `x.matmul(y)` here (the hookpoint keeps its name). bfloat16
/// CPU tensors are multiplied by the AMX kernel where the CPU has one ([`super::amx`]), one product
/// per head spread over the worker pool: candle 0.11 widens bfloat16 to float32 for every CPU
/// matmul, zero-fills the output and runs the `gemm` crate on a second thread pool that competes
/// with the first, which made attention's two products 15% of a bfloat16 LLaMA forward at 8 x 128
/// tokens (`perf`). The result is the float32 accumulation rounded once, as candle's and torch's.
/// float32 products go through the system kernel `Linear` uses ([`super::blas`]) on the same pool,
/// for the same reason.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(c) = super::blas::batched_matmul_f32(a, b)? {
        return Ok(c);
    }
    let fast = a.dtype() == DType::BF16
        && b.dtype() == DType::BF16
        && a.device().is_cpu()
        && b.device().is_cpu()
        && !a.track_op()
        && !b.track_op()
        && super::amx::available();
    if !fast || !matches!(batched_dims(a, b), Some((_, m, _, _)) if m >= MATMUL_MIN_ROWS) {
        return a.matmul(b);
    }
    // The kernel takes `b` transposed, `[.., n, k]` with rows contiguous: for `q @ k.transpose()`
    // that is `k` itself, no copy.
    let r = a.rank();
    let bt = b.transpose(r - 2, r - 1)?.contiguous()?;
    a.contiguous()?.apply_op2_no_bwd(&bt, &Bf16MatmulNt)
}

/// Fewest rows (`m`) for which [`matmul`] leaves candle's kernel. A decode step multiplies one
/// query row per head against the key/value cache, which is a strided view of a larger buffer:
/// candle reads it in place, while the kernels here would first copy it (measured: GPT-2 batch 8
/// generation 30% slower); with one row per head there is little product to speed up anyway.
pub(crate) const MATMUL_MIN_ROWS: usize = 16;

/// `(batch, m, k, n)` when `a [.., m, k] @ b [.., k, n]` is a product candle's `matmul` takes:
/// two or more dimensions, equal batch dimensions (their product is `batch`). `None` otherwise.
pub(crate) fn batched_dims(a: &Tensor, b: &Tensor) -> Option<(usize, usize, usize, usize)> {
    let (ad, bd) = (a.dims(), b.dims());
    let r = ad.len();
    if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
        return None;
    }
    Some((
        ad[..r - 2].iter().product(),
        ad[r - 2],
        ad[r - 1],
        bd[r - 1],
    ))
}

/// `a [.., m, k] * b [.., n, k]^T` for contiguous bfloat16 CPU tensors on AMX (see [`matmul`]).
struct Bf16MatmulNt;

impl candle_core::CustomOp2 for Bf16MatmulNt {
    fn name(&self) -> &'static str {
        "ops-matmul-bf16-amx"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::BF16(av), CpuStorage::BF16(bv)) = (a, b) else {
            candle_core::bail!("ops-matmul-bf16-amx: bfloat16 operands only");
        };
        let (Some((a0, a1)), Some((b0, b1))) = (al.contiguous_offsets(), bl.contiguous_offsets())
        else {
            candle_core::bail!("ops-matmul-bf16-amx: contiguous operands only");
        };
        let (ad, bd) = (al.dims(), bl.dims());
        let r = ad.len();
        let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 2]);
        let batch: usize = ad[..r - 2].iter().product();
        let c = super::amx::batched_matmul_nt(batch, (m, n, k), &av[a0..a1], &bv[b0..b1])?;
        let mut dims = ad[..r - 2].to_vec();
        dims.extend([m, n]);
        Ok((CpuStorage::BF16(c), Shape::from(dims)))
    }
}

/// `x / s` for a Python float `s` (Gemma's soft-capping): a true division in float32, as torch
/// does, where candle's `x / s` multiplies by `1 / s` (rounded to bfloat16 for bfloat16 tensors).
pub fn div_scalar(x: &Tensor, s: f64) -> Result<Tensor> {
    if x.dtype() != DType::BF16 || !x.device().is_cpu() || x.track_op() {
        let d = Tensor::new(s as f32, x.device())?.to_dtype(x.dtype())?;
        return x.broadcast_div(&d);
    }
    x.apply_op1_no_bwd(&Bf16Scale(s as f32, Op::Div))
}

/// Multiplies (`Op::Mul`) or divides (`Op::Div`) by a float32 scalar.
struct Bf16Scale(f32, Op);

impl candle_core::CustomOp1 for Bf16Scale {
    fn name(&self) -> &'static str {
        "ops-scale-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::BF16(x) = s else {
            candle_core::bail!("ops-scale-bf16: bfloat16 only");
        };
        // SAFETY: bf16 is a transparent u16; we only reinterpret the bits.
        let x: &[u16] = unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u16, x.len()) };
        let shape = l.shape().clone();
        let dims = shape.dims();
        let n = shape.elem_count();
        let mut out = vec![bf16::ZERO; n];
        let inner = dims.last().copied().unwrap_or(1).max(1);
        if n == 0 {
            return Ok((CpuStorage::BF16(out), shape));
        }
        let rows = n / inner;
        let strides = l.stride();
        let i1 = strides.last().copied().unwrap_or(1);
        let outer = &dims[..dims.len().saturating_sub(1)];
        let f = self.0;
        let div = matches!(self.1, Op::Div);
        let out_ptr = super::cpu::SendPtr(out.as_mut_ptr() as *mut f32);
        let apply = |v: f32| if div { v / f } else { v * f };
        let work = |range: std::ops::Range<usize>| {
            for r in range {
                let o = row_offset(r, l.start_offset(), outer, strides);
                // SAFETY: row `r` of the output is written by this call only; it lies inside `out`.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        (out_ptr.get() as *mut u16).add(r * inner),
                        inner,
                    )
                };
                if i1 == 1 {
                    scale_row_best(&x[o..o + inner], dst, f, div);
                } else {
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = narrow(apply(widen(x[o + j * i1])));
                    }
                }
            }
        };
        if n < 1 << 15 {
            work(0..rows);
        } else {
            par_for(rows, work);
        }
        Ok((CpuStorage::BF16(out), shape))
    }
}

#[derive(Clone, Copy)]
enum Op {
    Add,
    Mul,
    Div,
}

fn binary(a: &Tensor, b: &Tensor, op: Op) -> Result<Tensor> {
    let fast = a.dtype() == DType::BF16
        && b.dtype() == DType::BF16
        && a.device().is_cpu()
        && b.device().is_cpu()
        && !a.track_op()
        && !b.track_op();
    if !fast {
        return match op {
            Op::Add => a.broadcast_add(b),
            Op::Mul => a.broadcast_mul(b),
            Op::Div => a.broadcast_div(b),
        };
    }
    let shape = a.shape().broadcast_shape_binary_op(b.shape(), "ops")?;
    let a = a.broadcast_as(&shape)?;
    let b = b.broadcast_as(&shape)?;
    a.apply_op2_no_bwd(&b, &Bf16Binary(op))
}

/// Storage offset of row `r` (an index over the `outer` dimensions, row-major) of an operand that
/// starts at `start` with these `strides`.
fn row_offset(r: usize, start: usize, outer: &[usize], strides: &[usize]) -> usize {
    let mut off = start;
    let mut rem = r;
    for (d, st) in outer.iter().zip(strides).rev() {
        off += (rem % d) * st;
        rem /= d;
    }
    off
}

/// bfloat16 bits -> float32 (exact).
#[inline(always)]
pub(crate) fn widen(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// float32 -> bfloat16 bits, rounding to nearest even; NaN stays NaN (quiet). The same rounding as
/// `half::bf16::from_f32` and torch, written branch-free so that the loops vectorize.
#[inline(always)]
pub(crate) fn narrow(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

struct Bf16Binary(Op);

impl candle_core::CustomOp2 for Bf16Binary {
    fn name(&self) -> &'static str {
        match self.0 {
            Op::Add => "ops-add-bf16",
            Op::Mul => "ops-mul-bf16",
            Op::Div => "ops-div-bf16",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::BF16(x), CpuStorage::BF16(y)) = (s1, s2) else {
            candle_core::bail!("{}: bfloat16 operands only", self.name());
        };
        // SAFETY: bf16 is a transparent u16; we only reinterpret the bits.
        let x: &[u16] = unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u16, x.len()) };
        let y: &[u16] = unsafe { std::slice::from_raw_parts(y.as_ptr() as *const u16, y.len()) };
        let shape = l1.shape().clone();
        let dims = shape.dims();
        let n = shape.elem_count();
        let mut out = vec![bf16::ZERO; n];
        if n == 0 {
            return Ok((CpuStorage::BF16(out), shape));
        }
        let inner = dims.last().copied().unwrap_or(1).max(1);
        let rows = n / inner;
        let (s1, s2) = (l1.stride(), l2.stride());
        let (i1, i2) = (
            s1.last().copied().unwrap_or(1),
            s2.last().copied().unwrap_or(1),
        );
        let outer = &dims[..dims.len().saturating_sub(1)];
        // Start of row `r` in an operand: its multi-index over the outer dims times the strides.
        let row_start =
            |r: usize, start: usize, strides: &[usize]| row_offset(r, start, outer, strides);
        let op = self.0;
        let out_ptr = super::cpu::SendPtr(out.as_mut_ptr() as *mut f32);
        let work = |range: std::ops::Range<usize>| {
            for r in range {
                let o1 = row_start(r, l1.start_offset(), s1);
                let o2 = row_start(r, l2.start_offset(), s2);
                // SAFETY: row `r` of the output is written by this call only; it lies inside `out`.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        (out_ptr.get() as *mut u16).add(r * inner),
                        inner,
                    )
                };
                row_best(op, x, o1, i1, y, o2, i2, dst);
            }
        };
        if n < 1 << 15 {
            work(0..rows);
        } else {
            par_for(rows, work);
        }
        Ok((CpuStorage::BF16(out), shape))
    }
}

/// `row` compiled for AVX2 when the CPU has it (the crate itself targets baseline x86-64, whose
/// SSE2 has no 8-wide integer shifts or packs: the widen/round steps then take four times the work).
#[allow(clippy::too_many_arguments)]
fn row_best(
    op: Op,
    x: &[u16],
    o1: usize,
    i1: usize,
    y: &[u16],
    o2: usize,
    i2: usize,
    dst: &mut [u16],
) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2_fma() {
        // SAFETY: the CPU has the features the function is compiled for (checked just above).
        return unsafe { row_avx2(op, x, o1, i1, y, o2, i2, dst) };
    }
    row(op, x, o1, i1, y, o2, i2, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn row_avx2(
    op: Op,
    x: &[u16],
    o1: usize,
    i1: usize,
    y: &[u16],
    o2: usize,
    i2: usize,
    dst: &mut [u16],
) {
    row(op, x, o1, i1, y, o2, i2, dst)
}

/// `dst[i] = round(src[i] * f)` (or `/ f` with `div`), contiguous bfloat16 rows, with AVX2 where
/// the CPU has it.
fn scale_row_best(src: &[u16], dst: &mut [u16], f: f32, div: bool) {
    #[inline(always)]
    fn run(src: &[u16], dst: &mut [u16], f: f32, div: bool) {
        if div {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = narrow(widen(v) / f);
            }
        } else {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = narrow(widen(v) * f);
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(src: &[u16], dst: &mut [u16], f: f32, div: bool) {
        run(src, dst, f, div)
    }
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2_fma() {
        // SAFETY: the CPU has the features the function is compiled for (checked just above).
        return unsafe { run_avx2(src, dst, f, div) };
    }
    run(src, dst, f, div)
}

/// `dst[i] = narrow(src[i])` (float32 to bfloat16 bits, rounded as torch rounds), with AVX2 where
/// the CPU has it.
pub(crate) fn narrow_slice(src: &[f32], dst: &mut [u16]) {
    #[inline(always)]
    fn run(src: &[f32], dst: &mut [u16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = narrow(s);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(src: &[f32], dst: &mut [u16]) {
        run(src, dst)
    }
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2_fma() {
        // SAFETY: the CPU has the features the function is compiled for (checked just above).
        return unsafe { run_avx2(src, dst) };
    }
    run(src, dst)
}

/// One row: `dst[j] = x[o1 + j*i1] op y[o2 + j*i2]`, with the common stride patterns as tight loops.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row(op: Op, x: &[u16], o1: usize, i1: usize, y: &[u16], o2: usize, i2: usize, dst: &mut [u16]) {
    let n = dst.len();
    macro_rules! run {
        ($f:expr) => {
            match (i1, i2) {
                (1, 1) => {
                    for ((d, &a), &b) in dst.iter_mut().zip(&x[o1..o1 + n]).zip(&y[o2..o2 + n]) {
                        *d = narrow($f(widen(a), widen(b)));
                    }
                }
                (1, 0) => {
                    let b = widen(y[o2]);
                    for (d, &a) in dst.iter_mut().zip(&x[o1..o1 + n]) {
                        *d = narrow($f(widen(a), b));
                    }
                }
                (0, 1) => {
                    let a = widen(x[o1]);
                    for (d, &b) in dst.iter_mut().zip(&y[o2..o2 + n]) {
                        *d = narrow($f(a, widen(b)));
                    }
                }
                _ => {
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = narrow($f(widen(x[o1 + j * i1]), widen(y[o2 + j * i2])));
                    }
                }
            }
        };
    }
    match op {
        Op::Add => run!(|a: f32, b: f32| a + b),
        Op::Mul => run!(|a: f32, b: f32| a * b),
        Op::Div => run!(|a: f32, b: f32| a / b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `matmul` on bfloat16 (the AMX kernel where the CPU has one) against the float32 product of
    /// the same values rounded once: attention's two shapes (`q @ k^T` with `k` transposed as a
    /// view, `p @ v` with `v` contiguous), one batch of one, and float32 calls (both layouts of `b`).
    #[test]
    fn matmul_is_the_float32_product_rounded_once() -> Result<()> {
        let dev = Device::Cpu;
        let bf = |t: Tensor| t.to_dtype(DType::BF16);
        // 2 x 5 heads of 67 tokens: enough work to be split over the worker pool.
        let q = bf(Tensor::randn(0f32, 1., (2, 5, 67, 64), &dev)?)?;
        let k = bf(Tensor::randn(0f32, 1., (2, 5, 67, 64), &dev)?)?;
        let p = bf(Tensor::rand(0f32, 1., (2, 5, 67, 67), &dev)?)?;
        let one = bf(Tensor::randn(0f32, 1., (1, 130, 48), &dev)?)?;
        let w = bf(Tensor::randn(0f32, 1., (1, 48, 20), &dev)?)?;
        for (a, b) in [(&q, &k.transpose(2, 3)?), (&p, &k), (&one, &w)] {
            let got = matmul(a, b)?;
            let want = a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?;
            assert_eq!(got.dims(), want.dims());
            assert_eq!(got.dtype(), DType::BF16);
            let (got, want) = (
                got.to_dtype(DType::F32)?,
                want.flatten_all()?.to_vec1::<f32>()?,
            );
            for (g, w) in got.flatten_all()?.to_vec1::<f32>()?.iter().zip(&want) {
                // One rounding of a float32 sum (whose order may differ): within a bfloat16 unit.
                assert!((g - w).abs() <= w.abs() / 128.0 + 1e-6, "{g} vs {w}");
            }
        }
        let f = Tensor::randn(0f32, 1., (8, 67, 64), &dev)?;
        let g = Tensor::randn(0f32, 1., (8, 64, 35), &dev)?;
        // float32: the system kernel where there is one (summation order may differ from candle's).
        let diff = (matmul(&f, &g)? - f.matmul(&g)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff <= 1e-5, "{diff}");
        let ft = Tensor::randn(0f32, 1., (8, 35, 64), &dev)?;
        let diff = (matmul(&f, &ft.transpose(1, 2)?)? - f.matmul(&ft.transpose(1, 2)?)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff <= 1e-5, "{diff}");
        // Mismatched shapes keep candle's error.
        assert!(matmul(&q, &q).is_err());
        Ok(())
    }

    /// Against candle's own bfloat16 ops (the same float32-then-round arithmetic), with broadcasts
    /// in every position and a non-contiguous operand.
    #[test]
    fn matches_candle_bf16() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 3., (2, 3, 5, 70), &dev)?.to_dtype(DType::BF16)?;
        let cases = [
            Tensor::randn(0f32, 3., (2, 3, 5, 70), &dev)?,
            Tensor::randn(0f32, 3., (2, 1, 5, 70), &dev)?,
            Tensor::randn(0f32, 3., (70,), &dev)?,
            Tensor::randn(0f32, 3., (2, 3, 5, 1), &dev)?,
            Tensor::randn(0f32, 3., (2, 3, 70, 5), &dev)?.transpose(2, 3)?,
        ];
        for b in cases {
            let b = b.to_dtype(DType::BF16)?;
            for (ours, theirs) in [
                (add(&a, &b)?, a.broadcast_add(&b)?),
                (mul(&a, &b)?, a.broadcast_mul(&b)?),
                (add(&b, &a)?, b.broadcast_add(&a)?),
            ] {
                assert_eq!(ours.dims(), theirs.dims());
                let o: Vec<u16> = ours
                    .flatten_all()?
                    .to_vec1::<bf16>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                let t: Vec<u16> = theirs
                    .flatten_all()?
                    .to_vec1::<bf16>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                assert_eq!(o, t);
            }
        }
        // Large enough for the parallel path.
        let big = Tensor::randn(0f32, 1., (4, 16, 128), &dev)?.to_dtype(DType::BF16)?;
        let big2 = Tensor::randn(0f32, 1., (4, 16, 128), &dev)?.to_dtype(DType::BF16)?;
        let o = add(&big, &big2)?.to_dtype(DType::F32)?;
        let t = big.add(&big2)?.to_dtype(DType::F32)?;
        assert_eq!(
            o.flatten_all()?.to_vec1::<f32>()?,
            t.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    /// bfloat16 scaling is float32 multiply-then-round (torch's), float32 is candle's affine.
    #[test]
    fn scale_like_torch() -> Result<()> {
        let dev = Device::Cpu;
        let s = 1.0 / 128f64.sqrt();
        let x = Tensor::randn(0f32, 3., (2, 3, 70), &dev)?;
        let xb = x.to_dtype(DType::BF16)?;
        for t in [xb.clone(), xb.transpose(1, 2)?] {
            let ours = scale(&t, s)?;
            let want: Vec<u16> = t
                .flatten_all()?
                .to_vec1::<bf16>()?
                .iter()
                .map(|v| bf16::from_f32(v.to_f32() * s as f32).to_bits())
                .collect();
            let got: Vec<u16> = ours
                .flatten_all()?
                .to_vec1::<bf16>()?
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, want);
        }
        assert_eq!(
            scale(&x, s)?.flatten_all()?.to_vec1::<f32>()?,
            (&x * s)?.flatten_all()?.to_vec1::<f32>()?
        );
        // Division by a float: float32 true division, rounded once.
        let ours = div_scalar(&xb, 50.0)?;
        let want: Vec<u16> = xb
            .flatten_all()?
            .to_vec1::<bf16>()?
            .iter()
            .map(|v| bf16::from_f32(v.to_f32() / 50.0).to_bits())
            .collect();
        let got: Vec<u16> = ours
            .flatten_all()?
            .to_vec1::<bf16>()?
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(got, want);
        let want: Vec<f32> = x
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v / 50.0)
            .collect();
        assert_eq!(div_scalar(&x, 50.0)?.flatten_all()?.to_vec1::<f32>()?, want);
        Ok(())
    }

    #[test]
    fn rounding_and_nan() {
        for v in [
            1.0f32,
            -2.5,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            3.4e38,
            -0.0,
            f32::INFINITY,
            1e-40,
        ] {
            assert_eq!(narrow(v), bf16::from_f32(v).to_bits(), "{v}");
        }
        assert!(widen(narrow(f32::NAN)).is_nan());
    }

    #[test]
    fn other_dtypes_use_candle() -> Result<()> {
        let a = Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?;
        let b = Tensor::new(&[10f32], &Device::Cpu)?;
        assert_eq!(add(&a, &b)?.to_vec1::<f32>()?, vec![11., 12., 13.]);
        assert_eq!(mul(&a, &b)?.to_vec1::<f32>()?, vec![10., 20., 30.]);
        Ok(())
    }
}
