//! bfloat16 products on Intel AMX (Sapphire Rapids and later), in Rust, with no system library.
//!
//! Why our own kernel: the oneDNN that Linux distributions ship (2.x) multiplies bfloat16 through
//! `dnnl_gemm_bf16bf16f32`, which repacks both operands into AMX tiles on every call; in `perf` the
//! packing took as long as the products, and whole LLaMA forwards ran at half of PyTorch's speed.
//! PyTorch avoids it with oneDNN 3's matmul primitive and weights reordered once.
//!
//! This kernel needs no reordered weights at all. It computes `C^T = W X^T`: the weight `W [n, k]`
//! (a `Linear` weight as stored, `[out, in]`) is the left operand, whose 16-row x 32-column tiles
//! AMX loads straight from the row-major matrix; the activations `X [m, k]` are the right operand,
//! which AMX wants as pairs of `k` interleaved across tokens (the "VNNI" layout): a 32-bit transpose
//! of `X`, done once per call (`m x k` elements, small next to the `m x n x k` product). Each 16 x 16
//! float32 result tile is transposed on the way out. Products accumulate in float32, as oneDNN's do.
//!
//! Blocking: 32 weight rows x 32 tokens per inner loop (four accumulator tiles, two weight tiles,
//! two activation tiles: all eight tile registers), over the whole `k`; a weight panel
//! (32 x k bfloat16, 256 KiB at k = 4096) stays in L2 while a pass of tokens goes over it, and the
//! pass's packed activations (up to 1 MiB) stay in L2 while the weights stream by. Threads split
//! the weight rows.
//!
//! Use is decided once per process: the CPU must report AMX-TILE and AMX-BF16, and Linux must grant
//! the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`). `NNSCOPE_AMX=0` turns it off.

use half::bf16;
use std::sync::OnceLock;

/// Whether this process multiplies bfloat16 with the AMX kernel.
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let off = std::env::var("NNSCOPE_AMX")
            .map(|v| matches!(v.trim(), "0" | "off" | "false" | "no"))
            .unwrap_or(false);
        !off && imp::enable()
    })
}

/// `a [m, k] (contiguous) * b^T`, `b` being `[n, k]` (row stride `ldb`), bfloat16 operands,
/// float32 accumulation; returns `[m, n]` float32 (`T = f32`) or rounded once to bfloat16
/// (`T = bf16`). Split over the CPU worker pool. Callers check [`available`] first.
pub(crate) fn matmul_nt<T: OutElem>(
    m: usize,
    n: usize,
    k: usize,
    a: &[bf16],
    b: &[bf16],
    ldb: usize,
) -> candle_core::Result<Vec<T>> {
    if !available() {
        candle_core::bail!("amx: not available on this CPU");
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![T::ZERO; m * n]);
    }
    if a.len() < m * k || ldb < k || b.len() < (n - 1) * ldb + k {
        candle_core::bail!("amx: buffers too small for {m}x{k} * ({n}x{k})^T");
    }
    let mut c: Vec<T> = Vec::with_capacity(m * n);
    // The kernel writes every element of `c` (each token x weight-row pair lies in exactly one
    // result tile), so the buffer needs no zeroing; the length is set once it has been written.
    // SAFETY: `c` has capacity for `m * n` elements; the sizes were checked above.
    unsafe { product_into(m, n, k, a, b, ldb, c.as_mut_ptr(), true) };
    // SAFETY: all `m * n` elements were written (see above).
    unsafe { c.set_len(m * n) };
    Ok(c)
}

/// A batch of products `a_i [m, k] * b_i^T` (`b_i` being `[n, k]`, rows contiguous), bfloat16 in
/// and out, into `c` (`batch * m * n`): attention's `query @ key^T` and `probs @ value`, one
/// product per head. Heads are spread over the worker pool, each product on one thread.
/// Callers check [`available`] first.
pub(crate) fn batched_matmul_nt(
    batch: usize,
    (m, n, k): (usize, usize, usize),
    a: &[bf16],
    b: &[bf16],
) -> candle_core::Result<Vec<bf16>> {
    if !available() {
        candle_core::bail!("amx: not available on this CPU");
    }
    if a.len() < batch * m * k || b.len() < batch * n * k {
        candle_core::bail!("amx: buffers too small for {batch} x {m}x{k} * ({n}x{k})^T");
    }
    if batch * m * n * k == 0 {
        return Ok(vec![bf16::ZERO; batch * m * n]);
    }
    let mut c: Vec<bf16> = Vec::with_capacity(batch * m * n);
    let cp = crate::nn::cpu::SendPtr(c.as_mut_ptr());
    let one = |i: usize| {
        let (ai, bi) = (
            &a[i * m * k..(i + 1) * m * k],
            &b[i * n * k..(i + 1) * n * k],
        );
        // SAFETY: product `i` writes its own `m * n` elements of `c`'s capacity; sizes checked.
        unsafe { product_into(m, n, k, ai, bi, k, cp.get().add(i * m * n), batch == 1) };
    };
    if batch > 1 && batch * m * n * k >= 1 << 20 {
        crate::nn::cpu::par_for(batch, |range| range.for_each(one));
    } else {
        (0..batch).for_each(one);
    }
    // SAFETY: every product wrote all of its elements.
    unsafe { c.set_len(batch * m * n) };
    Ok(c)
}

/// `a [m, k] * b^T` into `c` (`m * n` elements), on the worker pool when `parallel`.
///
/// # Safety
/// `c` is valid for `m * n` writes; `a` holds `m * k` values and `b` `(n - 1) * ldb + k`, with
/// `ldb >= k` and `m, n, k > 0`; AMX is [`available`].
#[allow(clippy::too_many_arguments)]
unsafe fn product_into<T: OutElem>(
    m: usize,
    n: usize,
    k: usize,
    a: &[bf16],
    b: &[bf16],
    ldb: usize,
    c: *mut T,
    parallel: bool,
) {
    let xp = pack_x(m, k, a, parallel);
    imp::run(m, n, k, xp.as_ptr().cast(), b, ldb, c, parallel);
}

/// Result element types: float32, or bfloat16 rounded once from the float32 accumulator.
pub(crate) trait OutElem: Copy + Send + Sync + 'static {
    /// Zero.
    const ZERO: Self;
    /// Whether this is bfloat16 (the vector store rounds then).
    const BF16: bool;
}

impl OutElem for f32 {
    const ZERO: f32 = 0.0;
    const BF16: bool = false;
}

impl OutElem for bf16 {
    const ZERO: bf16 = bf16::ZERO;
    const BF16: bool = true;
}

/// Tokens per activation tile and weight rows per weight tile.
const TILE: usize = 16;
/// `k` elements per tile row (64 bytes of bfloat16).
const KB: usize = 32;

/// `X [m, k]` in tile order: tile `(mb, kb)` (16 tokens, 32 values of `k`) is 16 rows of
/// 16 pairs, row `p` holding `(X[t][kb*32 + 2p], X[t][kb*32 + 2p + 1])` for the tile's tokens `t`.
/// Tokens past `m` and values past `k` are zeros, so the padded products add nothing.
fn pack_x(m: usize, k: usize, a: &[bf16], parallel: bool) -> Vec<Line> {
    let (mt, kt) = (m.div_ceil(TILE), k.div_ceil(KB));
    // Every line is written by `pack_tile` (padding included).
    let mut lines = vec![Line([0; 16]); mt * kt * TILE];
    let xw = crate::nn::cpu::SendPtr(lines.as_mut_ptr());
    let pack_tile_rows = |tiles: std::ops::Range<usize>| {
        for mb in tiles {
            for kb in 0..kt {
                // SAFETY: tile (mb, kb) is the 16 lines from (mb * kt + kb) * 16, inside `lines`,
                // and this call alone packs token tile `mb`; `pack_tile` reads inside `a`.
                unsafe { imp::pack_tile(m, k, a, mb, kb, xw.get().add((mb * kt + kb) * TILE)) };
            }
        }
    };
    // Large inputs are packed by the worker pool (by token tiles), small ones on this thread.
    if parallel && m * k >= 1 << 16 && mt > 1 {
        crate::nn::cpu::par_for(mt, pack_tile_rows);
    } else {
        pack_tile_rows(0..mt);
    }
    lines
}

/// One cache line. Tile buffers are vectors of lines so that every 64-byte tile row is one aligned
/// line (a large `Vec<u32>` from malloc is 16-byte aligned, which splits each row over two lines).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::{bf16, OutElem, KB, TILE};

    /// A float32 result tile, stored whole by `tilestored`.
    #[repr(C, align(64))]
    struct OutTile([[f32; TILE]; TILE]);
    use std::arch::asm;

    /// The 64-byte tile configuration `ldtilecfg` reads (palette 1).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Tiles 0-3 accumulate (weight tile i x activation tile j -> tile 2i + j), 4-5 hold weight
    /// tiles (`rows` weight rows each), 6-7 activation tiles (always 16 pairs x 16 tokens).
    fn config(rows0: usize, rows1: usize) -> TileConfig {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        let set = |cfg: &mut TileConfig, t: usize, rows: usize| {
            cfg.rows[t] = rows as u8;
            cfg.colsb[t] = 64;
        };
        set(&mut cfg, 0, rows0);
        set(&mut cfg, 1, rows0);
        set(&mut cfg, 4, rows0);
        if rows1 > 0 {
            set(&mut cfg, 2, rows1);
            set(&mut cfg, 3, rows1);
            set(&mut cfg, 5, rows1);
        }
        set(&mut cfg, 6, TILE);
        set(&mut cfg, 7, TILE);
        cfg
    }

    /// CPUID says AMX-TILE and AMX-BF16, and Linux grants this process the tile data state.
    pub(super) fn enable() -> bool {
        // SAFETY: CPUID is available on every x86-64 CPU; leaf 7 is read only when the CPU has it.
        let cpu = {
            use std::arch::x86_64::{__cpuid, __cpuid_count};
            if __cpuid(0).eax < 7 {
                return false;
            }
            let r = __cpuid_count(7, 0);
            (r.edx >> 24) & 1 == 1 && (r.edx >> 22) & 1 == 1
        };
        // Results leave the kernel through AVX-512 (every AMX CPU has it; checked all the same).
        let vector = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl");
        if !cpu || !vector {
            return false;
        }
        #[cfg(target_os = "linux")]
        {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call asking for a permission; it changes nothing else.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            rc == 0
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }

    use crate::nn::cpu::SendPtr as Ptr;

    /// Weight rows per task block.
    const NB: usize = 2 * TILE;
    /// The fewest tokens per pass over the weights.
    const MC: usize = 128;

    /// Tokens per pass over the weights: as many as keep their packed activations (`2 k` bytes a
    /// token) within about 1 MiB of L2, at least `MC`. Each pass streams every weight of the
    /// product from memory once; at 8 x 128 tokens, 128-token passes read a layer's weights
    /// from DRAM eight times.
    fn tokens_per_pass(k: usize) -> usize {
        const BUDGET: usize = 1 << 20;
        (BUDGET / (2 * k.max(1)) / (2 * TILE) * (2 * TILE)).max(MC)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn run<T: OutElem>(
        m: usize,
        n: usize,
        k: usize,
        xp: *const u32,
        b: &[bf16],
        ldb: usize,
        c: *mut T,
        parallel: bool,
    ) {
        let blocks = n.div_ceil(NB);
        let threads = crate::nn::cpu::par_threads();
        let xp = Ptr(xp.cast_mut());
        let bp = Ptr(b.as_ptr().cast_mut());
        let cp = Ptr(c);
        let work = |range: std::ops::Range<usize>| {
            // SAFETY: `matmul_nt` checked the sizes and allocated `c` for `m * n` elements; this
            // task writes only columns of its own weight-row blocks; AMX was enabled for the
            // process by `available`.
            unsafe { panel(m, n, k, xp.get(), bp.get(), ldb, cp.get(), range) }
        };
        // Small products on this thread: waking the pool costs more than it saves. But a product
        // that reads 1 MiB of weights or more is split however few its tokens: a decode step is
        // bound by reading weights, and two threads read them faster than one (as in `blas::gemm`).
        let small = m * n * k < (1 << 21) && n * k * 2 < (1 << 20);
        if !parallel || threads == 1 || blocks < 2 || small {
            work(0..blocks);
        } else {
            crate::nn::cpu::par_for(blocks, work);
        }
    }

    /// A weight block's partial last `k` block, zero-padded, two tiles of 16 rows.
    #[repr(C, align(64))]
    struct TailTiles([[bf16; KB]; 2 * TILE]);

    /// Weight-row blocks `range` (32 rows each) times every token.
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel<T: OutElem>(
        m: usize,
        n: usize,
        k: usize,
        xp: *const u32,
        b: *const bf16,
        ldb: usize,
        c: *mut T,
        range: std::ops::Range<usize>,
    ) {
        let ldc = n;
        let kt = k.div_ceil(KB);
        let kfull = k / KB;
        let mt = m.div_ceil(TILE);
        let tile_words = TILE * TILE;
        let stride_b = (ldb * 2) as isize;
        let mut out = OutTile([[0f32; TILE]; TILE]);
        // The partial last `k` block is loaded from here: loading it from `b` would read past the
        // row, and past the buffer on the last row. (Copying whole weight blocks into tile order,
        // as GEMM libraries do, measured no faster: tile loads straight from the matrix are as fast
        // once results leave in whole lines.)
        let mut tail = TailTiles([[bf16::ZERO; KB]; 2 * TILE]);
        let mut current = (usize::MAX, usize::MAX);
        let pass_tiles = tokens_per_pass(k) / TILE;
        for mc0 in (0..mt).step_by(pass_tiles) {
            let mc1 = (mc0 + pass_tiles).min(mt);
            for blk in range.clone() {
                let n0 = blk * NB;
                let rows = (n - n0).min(NB);
                let (r0, r1) = (rows.min(TILE), rows.saturating_sub(TILE));
                if current != (r0, r1) {
                    let cfg = config(r0, r1);
                    asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
                    current = (r0, r1);
                }
                if kfull < kt {
                    let k0 = kfull * KB;
                    for (r, dst) in tail.0.iter_mut().enumerate().take(rows) {
                        let src = b.add((n0 + r) * ldb + k0);
                        for (q, v) in dst.iter_mut().enumerate() {
                            *v = if k0 + q < k { *src.add(q) } else { bf16::ZERO };
                        }
                    }
                }
                let w0 = b.add(n0 * ldb);
                // Not dereferenced when the block has one weight tile (it may then lie past `b`).
                let w1 = b.wrapping_add((n0 + TILE) * ldb);
                // The next block's weights are fetched while this one computes: the hardware
                // prefetcher does not follow 32 rows at once, and at 128 tokens the products wait
                // on memory otherwise. Each pass over the tokens prefetches a share of its rows,
                // one cache line per row per `k` block.
                let passes = (mc1 - mc0).div_ceil(2);
                let next_rows = if blk + 1 < range.end {
                    (n - n0 - rows).min(NB)
                } else {
                    0
                };
                let per_pass = next_rows.div_ceil(passes);
                let next = b.wrapping_add((n0 + NB) * ldb);
                let mut mb = mc0;
                while mb < mc1 {
                    let pass = (mb - mc0) / 2;
                    let (p0, p1) = (
                        (pass * per_pass).min(next_rows),
                        ((pass + 1) * per_pass).min(next_rows),
                    );
                    let two = mb + 1 < mc1;
                    let x0 = xp.add(mb * kt * tile_words);
                    // Not dereferenced when the pass has one token tile.
                    let x1 = xp.wrapping_add((mb + 1) * kt * tile_words);
                    asm!("tilezero tmm0", "tilezero tmm1", options(nomem, nostack));
                    if r1 > 0 {
                        asm!("tilezero tmm2", "tilezero tmm3", options(nomem, nostack));
                    }
                    let first = if r1 > 0 && two && kfull > 0 {
                        // The full `k` blocks, software-pipelined: tile registers are not renamed,
                        // so each load is issued as soon as the products reading its register
                        // are (see `full_2x2`).
                        full_2x2(w0, w1, stride_b, x0, x1, kfull, |kb| {
                            for r in p0..p1 {
                                prefetch(next.add(r * ldb + kb * KB));
                            }
                        });
                        kfull
                    } else {
                        0
                    };
                    for kb in first..kt {
                        let (wa, wb, ws) = if kb < kfull {
                            (w0.add(kb * KB), w1.wrapping_add(kb * KB), stride_b)
                        } else {
                            (tail.0[0].as_ptr(), tail.0[TILE].as_ptr(), (KB * 2) as isize)
                        };
                        let xa = x0.add(kb * tile_words);
                        let xb = x1.wrapping_add(kb * tile_words);
                        if kb < kfull {
                            for r in p0..p1 {
                                prefetch(next.add(r * ldb + kb * KB));
                            }
                        }
                        step(r1 > 0, two, wa, wb, ws, xa, xb);
                    }
                    // Tile (i, j) holds C^T for weight rows n0 + 16i.., tokens (mb + j) * 16...
                    let tiles: &[(usize, usize)] = match (r1 > 0, two) {
                        (true, true) => &[(0, 0), (0, 1), (1, 0), (1, 1)],
                        (true, false) => &[(0, 0), (1, 0)],
                        (false, true) => &[(0, 0), (0, 1)],
                        (false, false) => &[(0, 0)],
                    };
                    for &(i, j) in tiles {
                        store(2 * i + j, &mut out);
                        let rows_i = if i == 0 { r0 } else { r1 };
                        let t0 = (mb + j) * TILE;
                        let dst = c.add(t0 * ldc + n0 + i * TILE);
                        write_transposed(&out, rows_i, (m - t0).min(TILE), dst, ldc);
                    }
                    mb += if two { 2 } else { 1 };
                }
            }
        }
        asm!("tilerelease", options(nomem, nostack));
    }

    /// `k` blocks `0..kfull` of a full 2 x 2 block (weight rows from `w0`/`w1`, row stride `ws`
    /// bytes; token tiles from `x0`/`x1`, 256 words per `k` block), into tiles 0-3. `each(kb)` runs
    /// once per `k` block (the caller's prefetches).
    #[inline(always)]
    unsafe fn full_2x2(
        w0: *const bf16,
        w1: *const bf16,
        ws: isize,
        x0: *const u32,
        x1: *const u32,
        kfull: usize,
        mut each: impl FnMut(usize),
    ) {
        let tw = TILE * TILE;
        asm!(
            "tileloadd tmm4, [{wa} + {ws}*1]",
            "tileloadd tmm6, [{xa} + {s64}*1]",
            "tileloadd tmm7, [{xb} + {s64}*1]",
            "tileloadd tmm5, [{wb} + {ws}*1]",
            wa = in(reg) w0, wb = in(reg) w1, ws = in(reg) ws,
            xa = in(reg) x0, xb = in(reg) x1, s64 = in(reg) 64isize,
            options(nostack, readonly)
        );
        for kb in 0..kfull - 1 {
            each(kb);
            let n = kb + 1;
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm4, [{wa} + {ws}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm6, [{xa} + {s64}*1]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm5, [{wb} + {ws}*1]",
                "tileloadd tmm7, [{xb} + {s64}*1]",
                wa = in(reg) w0.add(n * KB), wb = in(reg) w1.add(n * KB), ws = in(reg) ws,
                xa = in(reg) x0.add(n * tw), xb = in(reg) x1.add(n * tw), s64 = in(reg) 64isize,
                options(nostack, readonly)
            );
        }
        each(kfull - 1);
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            options(nomem, nostack)
        );
    }

    /// One `k` block (32 values) of a 2 x 2 (or smaller) block: weight tiles from `wa`/`wb` (row
    /// stride `ws` bytes), token tiles from `xa`/`xb`, accumulated into tiles 0-3.
    #[inline(always)]
    unsafe fn step(
        two_w: bool,
        two_x: bool,
        wa: *const bf16,
        wb: *const bf16,
        ws: isize,
        xa: *const u32,
        xb: *const u32,
    ) {
        match (two_w, two_x) {
            (true, true) => asm!(
                "tileloadd tmm4, [{wa} + {ws}*1]",
                "tileloadd tmm6, [{xa} + {s64}*1]",
                "tileloadd tmm7, [{xb} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{wb} + {ws}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                wa = in(reg) wa, wb = in(reg) wb, ws = in(reg) ws,
                xa = in(reg) xa, xb = in(reg) xb, s64 = in(reg) 64isize,
                options(nostack, readonly)
            ),
            (true, false) => asm!(
                "tileloadd tmm4, [{wa} + {ws}*1]",
                "tileloadd tmm6, [{xa} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{wb} + {ws}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                wa = in(reg) wa, wb = in(reg) wb, ws = in(reg) ws,
                xa = in(reg) xa, s64 = in(reg) 64isize,
                options(nostack, readonly)
            ),
            (false, true) => asm!(
                "tileloadd tmm4, [{wa} + {ws}*1]",
                "tileloadd tmm6, [{xa} + {s64}*1]",
                "tileloadd tmm7, [{xb} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                wa = in(reg) wa, ws = in(reg) ws,
                xa = in(reg) xa, xb = in(reg) xb, s64 = in(reg) 64isize,
                options(nostack, readonly)
            ),
            (false, false) => asm!(
                "tileloadd tmm4, [{wa} + {ws}*1]",
                "tileloadd tmm6, [{xa} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                wa = in(reg) wa, ws = in(reg) ws,
                xa = in(reg) xa, s64 = in(reg) 64isize,
                options(nostack, readonly)
            ),
        }
    }

    /// Asks for the cache line at `p` (a hint: never faults).
    #[inline(always)]
    unsafe fn prefetch(p: *const bf16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }

    /// `vpermt2ps` indices of one butterfly stage of the 16 x 16 transpose: with `b` the stage's
    /// block size, row `i` (bit `b` clear) takes `[r_i | r_j]` at `lo`, row `j = i + b` at `hi`.
    const fn butterfly(b: usize, hi: bool) -> [u32; 16] {
        let mut idx = [0u32; 16];
        let mut c = 0;
        while c < 16 {
            let first = c & b == 0;
            idx[c] = match (hi, first) {
                (false, true) => c,
                (false, false) => 16 + c - b,
                (true, true) => c + b,
                (true, false) => 16 + c,
            } as u32;
            c += 1;
        }
        idx
    }

    /// One butterfly stage of the transpose (block size `B`), unrolled so that the tile stays in
    /// registers.
    #[inline(always)]
    unsafe fn stage<const B: usize>(r: &mut [std::arch::x86_64::__m512; TILE]) {
        use std::arch::x86_64::*;
        let lo = _mm512_loadu_si512(const { butterfly(B, false) }.as_ptr().cast());
        let hi = _mm512_loadu_si512(const { butterfly(B, true) }.as_ptr().cast());
        for i in 0..TILE {
            if i & B == 0 {
                let (ri, rj) = (r[i], r[i + B]);
                r[i] = _mm512_permutex2var_ps(ri, lo, rj);
                r[i + B] = _mm512_permutex2var_ps(ri, hi, rj);
            }
        }
    }

    /// Packs tile `(mb, kb)` of `X [m, k]` (tokens `16 mb..`, values `32 kb..`) into the 16 lines
    /// at `dst`: line `p` holds pair `p` of every token. The 16 token rows (64 bytes each, zeros
    /// past `m` and `k`) are loaded and transposed as 32-bit words, the pairs kept whole.
    ///
    /// # Safety
    /// `dst` points to 16 writable lines; `a` holds `m * k` values; the CPU has AVX-512BW (checked
    /// by `enable`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pack_tile(
        m: usize,
        k: usize,
        a: &[bf16],
        mb: usize,
        kb: usize,
        dst: *mut super::Line,
    ) {
        use std::arch::x86_64::*;
        let k0 = kb * KB;
        let cols = (k - k0).min(KB);
        let kmask: u32 = if cols == KB {
            u32::MAX
        } else {
            (1u32 << cols) - 1
        };
        let mut r: [__m512; TILE] = std::array::from_fn(|j| {
            let t = mb * TILE + j;
            if t < m {
                let v = _mm512_maskz_loadu_epi16(kmask, a.as_ptr().add(t * k + k0).cast());
                _mm512_castsi512_ps(v)
            } else {
                _mm512_setzero_ps()
            }
        });
        stage::<8>(&mut r);
        stage::<4>(&mut r);
        stage::<2>(&mut r);
        stage::<1>(&mut r);
        for (p, v) in r.iter().enumerate() {
            _mm512_store_ps(dst.add(p).cast(), *v);
        }
    }

    /// Writes result tile `out` (row = weight row, column = token) token by token: token `t`'s
    /// first `rows` values go to `dst + t * ldc`, for `t < tokens`, rounded to bfloat16 when `T`
    /// is. The tile is transposed in registers (four butterfly stages of `vpermt2ps`, which swap
    /// off-diagonal blocks of 8, 4, 2 and 1); the scalar loop it replaces took 29% of the kernel.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn write_transposed<T: OutElem>(
        out: &OutTile,
        rows: usize,
        tokens: usize,
        dst: *mut T,
        ldc: usize,
    ) {
        use std::arch::x86_64::*;
        let mut r: [__m512; TILE] = std::array::from_fn(|q| _mm512_loadu_ps(out.0[q].as_ptr()));
        stage::<8>(&mut r);
        stage::<4>(&mut r);
        stage::<2>(&mut r);
        stage::<1>(&mut r);
        let mask = ((1u32 << rows) - 1) as u16;
        for (t, &v) in r.iter().enumerate().take(tokens) {
            let p = dst.add(t * ldc);
            if T::BF16 {
                // Round to nearest even, as `ops::narrow` (and torch) do; NaN stays a quiet NaN.
                let x = _mm512_castps_si512(v);
                let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
                let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd);
                let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(x, bias));
                let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(0x40));
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                let bits = _mm512_mask_blend_epi32(nan, rounded, quiet);
                let packed = _mm512_cvtepi32_epi16(bits);
                if rows == TILE {
                    _mm256_storeu_si256(p.cast(), packed);
                } else {
                    _mm256_mask_storeu_epi16(p.cast(), mask, packed);
                }
            } else if rows == TILE {
                _mm512_storeu_ps(p.cast(), v);
            } else {
                _mm512_mask_storeu_ps(p.cast(), mask, v);
            }
        }
    }

    /// Stores accumulator tile `t` (0-3) into `out`.
    #[inline(always)]
    unsafe fn store(t: usize, out: &mut OutTile) {
        let o = out.0.as_mut_ptr().cast::<f32>();
        match t {
            0 => {
                asm!("tilestored [{o} + {s}*1], tmm0", o = in(reg) o, s = in(reg) 64isize, options(nostack))
            }
            1 => {
                asm!("tilestored [{o} + {s}*1], tmm1", o = in(reg) o, s = in(reg) 64isize, options(nostack))
            }
            2 => {
                asm!("tilestored [{o} + {s}*1], tmm2", o = in(reg) o, s = in(reg) 64isize, options(nostack))
            }
            _ => {
                asm!("tilestored [{o} + {s}*1], tmm3", o = in(reg) o, s = in(reg) 64isize, options(nostack))
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    use super::bf16;
    pub(super) fn enable() -> bool {
        false
    }
    pub(super) unsafe fn pack_tile(
        _m: usize,
        _k: usize,
        _a: &[bf16],
        _mb: usize,
        _kb: usize,
        _dst: *mut super::Line,
    ) {
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run<T: super::OutElem>(
        _m: usize,
        _n: usize,
        _k: usize,
        _xp: *const u32,
        _b: &[bf16],
        _ldb: usize,
        _c: *mut T,
        _parallel: bool,
    ) {
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: usize, n: usize, k: usize, a: &[bf16], b: &[bf16], ldb: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for q in 0..k {
                    s += a[i * k + q].to_f64() * b[j * ldb + q].to_f64();
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    /// Products against a float64 reference for shapes that do not fill the tiles: 1..=40 tokens,
    /// weight rows and `k` not multiples of 16/32, a row stride wider than `k`.
    #[test]
    fn products_match_reference() -> candle_core::Result<()> {
        if !available() {
            eprintln!("amx: this CPU has no AMX; the kernel is not used here");
            return Ok(());
        }
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for &(m, n, k, pad) in &[
            (1, 1, 1, 0),
            (1, 16, 32, 0),
            (3, 50, 70, 5),
            (16, 32, 64, 0),
            (17, 33, 100, 0),
            (33, 64, 256, 3),
            (40, 95, 37, 0),
            (130, 70, 96, 0),
            (70, 40, 600, 0),
            (200, 33, 1000, 7),
        ] {
            let ldb = k + pad;
            let a: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rnd())).collect();
            let b: Vec<bf16> = (0..n * ldb).map(|_| bf16::from_f32(rnd())).collect();
            let c = matmul_nt::<f32>(m, n, k, &a, &b, ldb)?;
            let c16 = matmul_nt::<bf16>(m, n, k, &a, &b, ldb)?;
            let want = reference(m, n, k, &a, &b, ldb);
            for i in 0..m {
                for j in 0..n {
                    let (got, w) = (c[i * n + j], want[i * n + j]);
                    assert!(
                        (got - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "m={m} n={n} k={k}: c[{i}][{j}] = {got}, want {w}"
                    );
                    // bfloat16 results: the float32 result rounded once.
                    assert_eq!(c16[i * n + j], bf16::from_f32(got));
                }
            }
        }
        Ok(())
    }

    /// Infinities and NaN leave the kernel as `half` rounds them: `inf * 0` is a quiet NaN,
    /// `inf * 1` stays infinite, in float32 and bfloat16 alike.
    #[test]
    fn special_values_round_like_half() -> candle_core::Result<()> {
        if !available() {
            eprintln!("amx: this CPU has no AMX; the kernel is not used here");
            return Ok(());
        }
        let (m, n, k) = (2, 16, 32);
        let mut a = vec![bf16::ONE; m * k];
        a[0] = bf16::INFINITY;
        let mut b = vec![bf16::ONE; n * k];
        b[0] = bf16::ZERO;
        let c = matmul_nt::<f32>(m, n, k, &a, &b, k)?;
        let c16 = matmul_nt::<bf16>(m, n, k, &a, &b, k)?;
        assert!(c[0].is_nan() && c[1] == f32::INFINITY && c[n] == k as f32 - 1.0);
        for (got, want) in c16.iter().zip(&c) {
            assert_eq!(got.to_bits(), bf16::from_f32(*want).to_bits());
        }
        Ok(())
    }
}
