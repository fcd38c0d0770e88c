//! The nnscope side of `bench/`: times one kind of forward on one checkpoint and prints one JSON line.
//!
//! ```text
//! bench --model DIR --batch B --tokens T --mode plain|traced [--warmup N] [--iters N]
//! bench --mode matmul --sizes 512,1024,2048 [--rows M] [--iters N]
//! bench --model DIR --batch B --tokens T --mode generate|generate-traced|generate-all-logits --new N [--warmup N] [--iters N]
//! ```
//!
//! `generate` is greedy `Model::generate` of exactly N new tokens (end-of-sequence ignored) with the
//! key/value cache; `generate-traced` also saves every layer's output at every step (what
//! bench_py.py asks nnsight's `generate()` for); `generate-all-logits` saves `logits`, which makes
//! every step compute all positions' logits (generation otherwise computes the last position's
//! only). All three also time N = 1 (time to first token).
//!
//! `plain` is `Model::forward`; `traced` is a trace saving every layer's attention probabilities and
//! output (`attention_probabilities.L`, `layers_output.L`), the same saves bench/bench_py.py asks
//! nnsight for. Token ids follow a fixed formula shared with the Python side, so every contender
//! runs the same input. Threads: set `RAYON_NUM_THREADS` (bench/run.sh does).
//!
//! The JSON line carries min/median milliseconds (wall clock, and `cpu_*`: CPU time of the whole
//! process, which with `RAYON_NUM_THREADS=1` measures the work done even on a loaded machine), the
//! peak resident memory of this process
//! (`VmHWM`), whether the instrumentation was compiled in, the GEMM backend of the run's dtype, and
//! `gemm_forced` (the `NNSCOPE_GEMM` setting, if any).

use candle_core::{DType, Device, Tensor};
use nnscope::{Input, LoadOptions, Model};
use std::time::Instant;

/// Same ids as bench_py.py: id = (1 + 7919 * i) mod min(vocab, 32000), i counting row-major.
fn ids(batch: usize, tokens: usize, vocab: usize) -> candle_core::Result<Tensor> {
    let v = vocab.min(32000) as u64;
    let data: Vec<u32> = (0..(batch * tokens) as u64)
        .map(|i| ((1 + 7919 * i) % v) as u32)
        .collect();
    Tensor::from_vec(data, (batch, tokens), &Device::Cpu)
}

/// Resets the kernel's peak-RSS mark (Linux `clear_refs` 5), so that a later [`peak_rss_mib`] gives the
/// peak since now. Returns whether it worked.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if readable.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

struct Args {
    model: String,
    mode: String,
    batch: usize,
    tokens: usize,
    warmup: usize,
    iters: usize,
    sizes: Vec<usize>,
    rows: Option<usize>,
    dtype: DType,
    new: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: String::new(),
        mode: "plain".into(),
        batch: 1,
        tokens: 128,
        warmup: 3,
        iters: 10,
        sizes: vec![512, 1024, 2048],
        rows: None,
        dtype: DType::F32,
        new: 32,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv
            .get(i + 1)
            .cloned()
            .ok_or_else(|| format!("{} needs a value", argv[i]))?;
        let num = || {
            val.parse::<usize>()
                .map_err(|e| format!("{}: {e}", argv[i]))
        };
        match argv[i].as_str() {
            "--model" => a.model = val.clone(),
            "--mode" => a.mode = val.clone(),
            "--batch" => a.batch = num()?,
            "--tokens" => a.tokens = num()?,
            "--warmup" => a.warmup = num()?,
            "--iters" => a.iters = num()?,
            "--new" => a.new = num()?,
            "--rows" => a.rows = Some(num()?),
            "--sizes" => {
                a.sizes = val
                    .split(',')
                    .map(|s| s.parse::<usize>().map_err(|e| format!("--sizes: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--dtype" => {
                a.dtype = match val.as_str() {
                    "f32" | "float32" => DType::F32,
                    "bf16" | "bfloat16" => DType::BF16,
                    other => return Err(format!("--dtype: unknown {other}")),
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
        i += 2;
    }
    if a.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    Ok(a)
}

thread_local! {
    /// (min, median) CPU time of the last [`time`] call's iterations, all threads of the process.
    static CPU_STATS: std::cell::Cell<(f64, f64)> = const { std::cell::Cell::new((0.0, 0.0)) };
}

/// CPU time used so far by this process (all threads), in milliseconds. With one thread
/// (`RAYON_NUM_THREADS=1`) it measures the work done even when other jobs share the cores.
fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// (min, median) of the samples, in milliseconds.
fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (v[0], med)
}

fn time<F: FnMut() -> Result<(), Box<dyn std::error::Error>>>(
    warmup: usize,
    iters: usize,
    mut f: F,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut samples = Vec::with_capacity(iters);
    let mut cpu = Vec::with_capacity(iters);
    for _ in 0..iters {
        let (t0, c0) = (Instant::now(), cpu_ms());
        f()?;
        samples.push(t0.elapsed().as_secs_f64() * 1e3);
        cpu.push(cpu_ms() - c0);
    }
    CPU_STATS.with(|c| c.set(stats(cpu)));
    Ok(stats(samples))
}

fn instrumented() -> bool {
    cfg!(feature = "hooks")
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse_args()?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    // The kernel `Linear` uses for this dtype (bfloat16 has its own; `NNSCOPE_GEMM=candle` forces
    // candle's kernel for both).
    let backend = if a.dtype == DType::BF16 {
        nnscope::nn::gemm_backend_bf16()
    } else {
        nnscope::nn::gemm_backend()
    };
    // `NNSCOPE_GEMM` as set for this process (bench/run.sh sets `nnscope` to time the default build
    // on a machine without a system library), so the report can tell those rows apart.
    let forced = match std::env::var("NNSCOPE_GEMM") {
        Ok(v) if !v.trim().is_empty() => format!("\"{}\"", v.trim().replace(['"', '\\'], "")),
        _ => "null".into(),
    };
    if a.mode == "matmul" {
        // The matrix multiply `Linear` uses, on square matrices of `--dtype` (default float32).
        let dt = format!("{:?}", a.dtype);
        for &n in &a.sizes {
            // `--rows M`: an `[M, n]` input instead of a square one (a prompt of M tokens).
            let m = a.rows.unwrap_or(n);
            let x = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu)?.to_dtype(a.dtype)?;
            let w = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?.to_dtype(a.dtype)?;
            // The layout `Linear` keeps its weight in (candle's kernel below uses the plain one).
            let w_lin = nnscope::nn::prepare_linear_weight(w.clone())?;
            let (mn, med) = time(a.warmup, a.iters, || {
                let _ = nnscope::nn::linear_matmul(&x, &w_lin)?;
                Ok(())
            })?;
            let (cpu_mn, _) = CPU_STATS.with(|c| c.get());
            let gflop = 2.0 * (m * n * n) as f64 / 1e9;
            if backend != "candle-gemm" {
                // candle's own kernel too, for comparison with the system one.
                let wt = w.t()?;
                let (cmn, cmed) = time(a.warmup, a.iters, || {
                    let _ = x.matmul(&wt)?;
                    Ok(())
                })?;
                println!(
                    "{{\"contender\":\"candle\",\"mode\":\"matmul\",\"n\":{n},\"min_ms\":{cmn:.3},\"median_ms\":{cmed:.3},\"gflops\":{:.1},\"threads\":\"{threads}\",\"backend\":\"candle-gemm\",\"dtype\":\"{dt}\"}}",
                    gflop / (cmn / 1e3)
                );
            }
            println!(
                "{{\"contender\":\"nnscope\",\"mode\":\"matmul\",\"n\":{n},\"min_ms\":{mn:.3},\"median_ms\":{med:.3},\"gflops\":{:.1},\"cpu_min_ms\":{cpu_mn:.3},\"cpu_gflops\":{:.1},\"gemm_forced\":{forced},\"threads\":\"{threads}\",\"backend\":\"{backend}\",\"dtype\":\"{dt}\"}}",
                gflop / (mn / 1e3),
                gflop / (cpu_mn / 1e3)
            );
        }
        return Ok(());
    }
    let opts = LoadOptions {
        dtype: a.dtype,
        ..Default::default()
    };
    let t0 = Instant::now();
    let model = Model::load(&a.model, &opts)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let input_ids = ids(a.batch, a.tokens, model.vocab_size())?;
    let layers = model.num_layers();
    // Peak so far (loading), then the peak of the forwards alone.
    let load_peak = peak_rss_mib();
    let reset = reset_peak_rss();
    let mut first_token: Option<(f64, f64)> = None;
    let mut first_cpu = (0.0, 0.0);
    let args_new = a.new;
    let (mn, med) = match a.mode.as_str() {
        "plain" => time(a.warmup, a.iters, || {
            let logits = model.forward(&Input::ids(input_ids.clone()))?;
            std::hint::black_box(logits);
            Ok(())
        })?,
        "traced" => {
            if !instrumented() {
                return Err("traced mode needs the `hooks` feature (the default)".into());
            }
            time(a.warmup, a.iters, || {
                let mut tr = model.trace(Input::ids(input_ids.clone()));
                for l in 0..layers {
                    tr = tr
                        .save(&format!("attention_probabilities.{l}"))?
                        .save(&format!("layers_output.{l}"))?;
                }
                let out = tr.run()?;
                if out.saved.len() != 2 * layers {
                    return Err(format!(
                        "expected {} saved values, got {}",
                        2 * layers,
                        out.saved.len()
                    )
                    .into());
                }
                std::hint::black_box(out);
                Ok(())
            })?
        }
        "generate" | "generate-traced" | "generate-all-logits" => {
            let traced = a.mode == "generate-traced";
            // Saving `logits` makes every step compute all positions' logits (the A side of the
            // last-position-only A/B: generation otherwise multiplies only the last row).
            let all_logits = a.mode == "generate-all-logits";
            if traced && !instrumented() {
                return Err("generate-traced needs the `hooks` feature (the default)".into());
            }
            let gen = |n: usize| -> Result<(), Box<dyn std::error::Error>> {
                let mut g = model
                    .generate(Input::ids(input_ids.clone()))
                    .max_new_tokens(n)
                    .ignore_eos(true);
                if traced {
                    for l in 0..layers {
                        g = g.save(&format!("layers_output.{l}"))?;
                    }
                }
                if all_logits {
                    g = g.save("logits")?;
                }
                let out = g.run()?;
                if traced && out.saved.len() != layers * n {
                    return Err(
                        format!("expected {} saves, got {}", layers * n, out.saved.len()).into(),
                    );
                }
                std::hint::black_box(out);
                Ok(())
            };
            let (fmn, fmed) = time(a.warmup, a.iters, || gen(1))?;
            first_cpu = CPU_STATS.with(|c| c.get());
            let r = time(a.warmup, a.iters, || gen(a.new))?;
            first_token = Some((fmn, fmed));
            r
        }
        other => {
            return Err(format!(
                "unknown --mode {other} (plain, traced, matmul, generate, generate-traced, generate-all-logits)"
            )
            .into())
        }
    };
    let (cmin, cmed) = CPU_STATS.with(|c| c.get());
    let first = match first_token {
        Some((a, b)) => format!(
            ",\"new\":{},\"first_min_ms\":{a:.3},\"first_median_ms\":{b:.3},\"first_cpu_min_ms\":{:.3},\"first_cpu_median_ms\":{:.3}",
            args_new, first_cpu.0, first_cpu.1
        ),
        None => String::new(),
    };
    let fwd_peak = peak_rss_mib();
    let num = |v: Option<f64>| {
        v.map(|m| format!("{m:.1}"))
            .unwrap_or_else(|| "null".into())
    };
    let rss = num(match (load_peak, fwd_peak) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    });
    let fwd_rss = num(if reset { fwd_peak } else { None });
    println!(
        "{{\"contender\":\"nnscope\",\"mode\":\"{}\",\"model\":\"{}\",\"batch\":{},\"tokens\":{},\"iters\":{},\"min_ms\":{mn:.3},\"median_ms\":{med:.3},\"peak_rss_mib\":{rss},\"forward_peak_rss_mib\":{fwd_rss},\"load_ms\":{load_ms:.1},\"instrumented\":{},\"threads\":\"{threads}\",\"backend\":\"{backend}\",\"dtype\":\"{:?}\",\"cpu_min_ms\":{cmin:.3},\"cpu_median_ms\":{cmed:.3},\"gemm_forced\":{forced}{first}}}",
        a.mode,
        a.model.replace('\\', "\\\\").replace('"', "\\\""),
        a.batch,
        a.tokens,
        a.iters,
        instrumented(),
        a.dtype,
    );
    Ok(())
}

fn main() {
    // As the nnscope binary does (see nnscope::keep_freed_memory).
    nnscope::keep_freed_memory();
    if let Err(e) = run() {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}
