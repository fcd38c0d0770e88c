"""Turns bench/work/results.jsonl into bench/RESULTS.md (stdout).

Usage: python report.py results.jsonl CHECKPOINT_DIR
Every ratio is computed from the minimum time of each measurement (the least disturbed run on a
shared machine); medians are shown next to them.
"""

import datetime
import json
import os
import platform
import re
import subprocess
import sys


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def dtype_of(r):
    """`float32` or `bfloat16` (nnscope prints candle's `F32`/`BF16`, the Python side torch's names)."""
    d = str(r.get("dtype") or "float32").lower()
    return "bfloat16" if d in ("bf16", "bfloat16") else "float32"


def is_default_forced(r):
    """An nnscope row timed with NNSCOPE_GEMM=nnscope (or an earlier run's `candle`): the default build on a
    machine without oneDNN or OpenBLAS."""
    return str(r.get("gemm_forced") or "").lower() in ("nnscope", "native", "candle", "none")


def best_rounds(rows):
    """One row per measurement: the round with the lowest minimum (peak RSS: the highest seen)."""
    best = {}
    order = []
    for r in rows:
        r["dtype"] = dtype_of(r)
        k = (r.get("contender"), r.get("mode"), r.get("n"), r.get("model"), r.get("batch"), r.get("tokens"),
             r.get("instrumented"), r["dtype"], is_default_forced(r))
        if k not in best:
            best[k] = dict(r)
            order.append(k)
            continue
        b = best[k]
        rss = [x.get("peak_rss_mib") for x in (b, r) if x.get("peak_rss_mib") is not None]
        frss = [x.get("forward_peak_rss_mib") for x in (b, r) if x.get("forward_peak_rss_mib") is not None]
        if r["min_ms"] < b["min_ms"]:
            best[k] = b = dict(r)
        if rss:
            b["peak_rss_mib"] = max(rss)
        if frss:
            b["forward_peak_rss_mib"] = max(frss)
    return [best[k] for k in order]


def forward_flops(cfg, b, t):
    """Multiply-add FLOPs (2 per MAC) of one forward: every Linear/Conv1D, the LM head, QK^T and PV."""
    if cfg["model_type"] == "gpt2":
        h, L, v, inter = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"], cfg.get("n_inner") or 4 * cfg["n_embd"]
        heads, kv, hd = cfg["n_head"], cfg["n_head"], h // cfg["n_head"]
        per_layer = h * 3 * h + h * h + 2 * h * inter
    else:
        h, L, v, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        hd = cfg.get("head_dim") or h // heads
        per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter
    tokens = b * t
    linear = 2 * tokens * (L * per_layer + h * v)
    attn = L * 2 * 2 * b * heads * t * t * hd
    return linear + attn


def ckpt_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def fx(x):
    """A ratio as `1.23x`, or `-` when one side is missing."""
    return "-" if x is None else f"{x:.2f}x"


PINS = {"transformers": "5.24.0", "nnsight": "0.8.1"}  # what run.sh installs (BENCH_TRANSFORMERS, BENCH_NNSIGHT)


def shape_name(model):
    name = os.path.basename(model.rstrip("/"))
    return f"tiny fixture `{name}`" if "fixtures" in model else name


def main():
    rows = load(sys.argv[1])
    ckdir = sys.argv[2]
    out = []
    p = out.append
    failed = [r for r in rows if r.get("failed")]
    rows = best_rounds([r for r in rows if not r.get("failed")])

    cpu = sh("lscpu | sed -n 's/^Model name: *//p'") or platform.processor()
    cpuflags = set(sh("grep -m1 '^flags' /proc/cpuinfo").split())
    wanted = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    have = [f for f in wanted if f in cpuflags]
    bf16_hw = "avx512_bf16" in cpuflags or "amx_bf16" in cpuflags
    cores = os.cpu_count()
    mem = sh("free -g | awk '/Mem:/{print $2}'")
    py = {}
    for r in rows:
        for k in ("torch", "transformers", "nnsight"):
            if k in r:
                py[k] = r[k]
    threads = next((r["threads"] for r in rows if "threads" in r), "?")
    lock = open(os.path.join(os.path.dirname(__file__), "..", "Cargo.lock")).read()
    m = re.search(r'name = "candle-core"\nversion = "([^"]+)"', lock)
    candle = m.group(1) if m else "?"
    nns = [r for r in rows if r.get("contender") == "nnscope" and "backend" in r and not is_default_forced(r)]
    backend = next((r["backend"] for r in nns if r["dtype"] == "float32"), "?")
    backend16 = next((r["backend"] for r in nns if r["dtype"] == "bfloat16"), "?")

    p("# nnscope benchmark results\n")
    p(f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    p(f"- Machine: {cpu}, {cores} logical CPUs, {mem} GiB RAM, {platform.system()} {platform.release()}; "
      f"CPU flags: {' '.join(have) if have else 'none of ' + ', '.join(wanted)}")
    p(f"- Threads for every contender: {threads}")
    p(f"- nnscope: candle {candle}, rustc `{sh('rustc --version')}`, matmul backend `{backend}` "
      f"(bfloat16: `{backend16}`)")
    pin = [f"{k} {v}" for k, v in PINS.items() if py.get(k) not in (None, v)]
    p(f"- Python: torch {py.get('torch', '?')}, transformers {py.get('transformers', '?')}, nnsight {py.get('nnsight', '?')}"
      + (f" (NOT the versions run.sh pins: {', '.join(pin)})" if pin else ""))
    p("- dtype float32 unless a table says bfloat16; random weights from `make_checkpoints.py`;")
    p("  the same safetensors files and the same token ids feed every contender.")
    p("- Times in milliseconds, `min / median` over the timed iterations after warm-up, from the best of")
    p("  the rounds (`BENCH_ROUNDS`, each measurement in its own process every round). Ratios use the")
    p("  minimum (the least disturbed run: this machine is shared, so medians can be noisy).\n")

    # Matmul peaks, one table per dtype.
    mm = [r for r in rows if r.get("mode") == "matmul"]
    peaks = {}
    for dt in ("float32", "bfloat16"):
        mmd = [r for r in mm if r["dtype"] == dt]
        if not mmd:
            continue
        p(f"## Matrix multiply (x @ w.T, square {dt})\n")
        sizes = sorted({r["n"] for r in mmd})
        p("| kernel | " + " | ".join(str(n) for n in sizes) + " |")
        p("| --- |" + " --- |" * len(sizes))
        def pick(who):
            if who == "nnscope-default":
                return lambda r: r["contender"] == "nnscope" and is_default_forced(r)
            if who == "nnscope":
                return lambda r: r["contender"] == "nnscope" and not is_default_forced(r)
            return lambda r: r["contender"] == who
        for who in ("torch", "nnscope", "nnscope-default", "candle"):
            sel = [r for r in mmd if pick(who)(r)]
            if not sel:
                continue
            cells = []
            for n in sizes:
                r = next((r for r in sel if r["n"] == n), None)
                cells.append(f"{r['gflops']:.0f} GFLOP/s" if r else "-")
            kb = sel[0].get("backend", "?")
            label = {"torch": "PyTorch (measured peak)", "nnscope": f"nnscope Linear ({kb})",
                     "nnscope-default": f"nnscope Linear without a system library ({kb})",
                     "candle": "candle's own kernel (`gemm` crate)"}[who]
            p(f"| {label} | " + " | ".join(cells) + " |")
        tp = [r["gflops"] for r in mmd if r["contender"] == "torch"]
        np_ = [r["gflops"] for r in mmd if r["contender"] == "nnscope" and not is_default_forced(r)]
        peaks[dt] = max(tp) if tp else None
        nbest = max(np_) if np_ else None
        rel = f" ({100 * nbest / peaks[dt]:.0f}% of it)" if nbest and peaks[dt] else ""
        p(f"\nMeasured {dt} peak (best PyTorch result over these sizes): **{fmt(peaks[dt], 0)} GFLOP/s**; "
          f"nnscope's {dt} `Linear` best: {fmt(nbest, 0)} GFLOP/s{rel}.\n")
    peak = peaks.get("float32")

    fw = [r for r in rows if r.get("mode") in ("plain", "traced", "eager", "nnsight")]

    def get(contender, mode, model, b, t, instrumented=None, dtype="float32", candle_forced=False):
        for r in fw:
            if (r["contender"] == contender and r["mode"] == mode and r["model"] == model and r["batch"] == b
                    and r["tokens"] == t and r["dtype"] == dtype and is_default_forced(r) == candle_forced):
                if instrumented is None or r.get("instrumented") == instrumented:
                    return r
        return None

    def shapes_of(dtype):
        out_ = []
        for r in fw:
            k = (r["model"], r["batch"], r["tokens"])
            if r["dtype"] == dtype and "llama7b" not in r["model"] and k not in out_:
                out_.append(k)
        return out_

    cell = lambda r: f"{r['min_ms']:.2f} / {r['median_ms']:.2f}" if r else "-"
    ratio = lambda a, b_: a["min_ms"] / b_["min_ms"] if a and b_ else None

    def flops_of(model, b, t):
        cfgp = os.path.join(model, "config.json")
        return forward_flops(json.load(open(cfgp)), b, t) if os.path.isfile(cfgp) else None

    p("## Forward passes (float32)\n")
    p("(1) nnscope plain forward, (1') the same built without instrumentation (`--no-default-features`),")
    p("(2) nnscope trace saving every layer's attention probabilities and output, (3) transformers eager")
    p("forward, (4) nnsight trace with the same saves (`attention_interface_1.source.nn_functional_dropout_0`")
    p("and the layer's output).\n")
    p("| model | B x T | (1) nnscope plain | (1') no hooks | (2) nnscope traced | (3) transformers | (4) nnsight | (4)/(2) | (3)/(1) | hooks cost (1)/(1')-1 | nnscope GFLOP/s (% peak) | torch GFLOP/s |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    summary = []
    for model, b, t in shapes_of("float32"):
        name = shape_name(model)
        r1 = get("nnscope", "plain", model, b, t, True)
        r1n = get("nnscope", "plain", model, b, t, False)
        r2 = get("nnscope", "traced", model, b, t)
        r3 = get("transformers", "eager", model, b, t)
        r4 = get("nnsight", "nnsight", model, b, t)
        flops = flops_of(model, b, t)
        gf1 = flops / 1e9 / (r1["min_ms"] / 1e3) if flops and r1 else None
        gf3 = flops / 1e9 / (r3["min_ms"] / 1e3) if flops and r3 else None
        pct = f" ({100 * gf1 / peak:.0f}%)" if gf1 and peak else ""
        hc = ratio(r1, r1n)
        p(f"| {name} | {b}x{t} | {cell(r1)} | {cell(r1n)} | {cell(r2)} | {cell(r3)} | {cell(r4)} | "
          f"{fx(ratio(r4, r2))} | {fx(ratio(r3, r1))} | {fmt(100 * (hc - 1) if hc else None, 1)}% | "
          f"{fmt(gf1, 0)}{pct} | {fmt(gf3, 0)} |")
        summary.append((name, b, t, r1, r1n, r2, r3, r4, gf1, model))
    p("\n(4)/(2) > 1 means nnscope's trace is faster than nnsight's; (3)/(1) > 1 means nnscope's plain forward")
    p("is faster than transformers'.\n")

    # The default build on a machine without a system library: nnscope's own kernel (NNSCOPE_GEMM=nnscope).
    dflt = []
    for name, b, t, r1, *_rest in summary:
        model = _rest[-1]
        rc = get("nnscope", "plain", model, b, t, True, candle_forced=True)
        if rc:
            dflt.append((name, b, t, r1, rc))
    if dflt:
        p("## Default build without a system library (float32)\n")
        bk = dflt[0][4].get("backend", "?")
        forced = dflt[0][4].get("gemm_forced") or "?"
        p(f"(1) as above (`{backend}`), (1c) the same binary with `NNSCOPE_GEMM={forced}` (`{bk}`): what")
        p("`cargo install` users get on a machine without oneDNN or OpenBLAS (`nnscope-sgemm`: nnscope's own")
        p("AVX-512 kernel up to 80 rows, the `gemm` crate with its AVX-512 code above; `candle-gemm`: candle's")
        p("matmul).\n")
        p(f"| model | B x T | (1) best build | (1c) default build (`{bk}`) | (1c)/(1) |")
        p("| --- | --- | --- | --- | --- |")
        for name, b, t, r1, rc in dflt:
            p(f"| {name} | {b}x{t} | {cell(r1)} | {cell(rc)} | {fx(ratio(rc, r1))} |")
        p("")

    # bfloat16.
    summary16 = []
    sh16 = shapes_of("bfloat16")
    if sh16:
        peak16 = peaks.get("bfloat16")
        p("## Forward passes (bfloat16)\n")
        p("The same checkpoints loaded in bfloat16 by every contender (nnscope `--dtype bf16`, transformers and")
        p("nnsight `dtype=torch.bfloat16`); columns as in the float32 table (no instrumentation-free build here),")
        p("plus nnscope's own float32 plain forward (1) at the same shape: f32/bf16 > 1 means bfloat16 is faster.")
        p(f"GFLOP/s are relative to the bfloat16 matmul peak ({fmt(peak16, 0)}).\n")
        p("| model | B x T | (1) nnscope plain | (2) nnscope traced | (3) transformers | (4) nnsight | (4)/(2) | (3)/(1) | nnscope float32 plain | f32/bf16 | nnscope GFLOP/s (% bf16 peak) | torch GFLOP/s |")
        p("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for model, b, t in sh16:
            name = shape_name(model)
            r1 = get("nnscope", "plain", model, b, t, True, dtype="bfloat16")
            r2 = get("nnscope", "traced", model, b, t, dtype="bfloat16")
            r3 = get("transformers", "eager", model, b, t, dtype="bfloat16")
            r4 = get("nnsight", "nnsight", model, b, t, dtype="bfloat16")
            f32 = get("nnscope", "plain", model, b, t, True)
            flops = flops_of(model, b, t)
            gf1 = flops / 1e9 / (r1["min_ms"] / 1e3) if flops and r1 else None
            gf3 = flops / 1e9 / (r3["min_ms"] / 1e3) if flops and r3 else None
            pct = f" ({100 * gf1 / peak16:.0f}%)" if gf1 and peak16 else ""
            p(f"| {name} | {b}x{t} | {cell(r1)} | {cell(r2)} | {cell(r3)} | {cell(r4)} | {fx(ratio(r4, r2))} | "
              f"{fx(ratio(r3, r1))} | {cell(f32)} | {fx(ratio(f32, r1))} | {fmt(gf1, 0)}{pct} | {fmt(gf3, 0)} |")
            summary16.append((name, b, t, r1, r2, r3, r4, f32))
        p("")

    p("## Peak resident memory (MiB)\n")
    p("Each cell: peak of the whole process (loading included) / peak while running the forwards (the")
    p("kernel's high-water mark reset after loading, `clear_refs`). Both include the runtime (Python")
    p("interpreter and torch, or the Rust binary).\n")
    p("| model | B x T | checkpoint | nnscope plain | nnscope traced | transformers | nnsight | nnscope plain / checkpoint |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, b, t, r1, r1n, r2, r3, r4, gf1, model in summary:
        size = ckpt_bytes(model) / 2**20 if os.path.isdir(model) else None
        rss = lambda r: f"{fmt(r.get('peak_rss_mib'), 0)} / {fmt(r.get('forward_peak_rss_mib'), 0)}" if r else "-"
        rel = "-"
        if r1 and size and r1.get("peak_rss_mib"):
            rel = f"{r1['peak_rss_mib'] / size:.2f}x / {fmt((r1.get('forward_peak_rss_mib') or 0) / size, 2)}x"
        p(f"| {name} | {b}x{t} | {fmt(size, 0)} | {rss(r1)} | {rss(r2)} | {rss(r3)} | {rss(r4)} | {rel} |")

    # 7B-shaped LLaMA in bfloat16: each contender in its own process.
    big7 = [r for r in fw if "llama7b" in r["model"]]
    r7 = {}
    if big7:
        m7 = big7[0]["model"]
        t7 = big7[0]["tokens"]
        r7 = {k: get(c, mo, m7, 1, t7, dtype="bfloat16") for k, c, mo in (
            ("plain", "nnscope", "plain"), ("traced", "nnscope", "traced"),
            ("eager", "transformers", "eager"), ("nnsight", "nnsight", "nnsight"))}
        size7 = ckpt_bytes(m7) / 2**30 if os.path.isdir(m7) else None
        p(f"\n## 7B-shaped LLaMA, bfloat16 ({fmt(size7, 1)} GiB checkpoint)\n")
        p(f"One forward of 1 x {t7} tokens after `BENCH_7B_WARMUP` warm-up forwards, each contender in its own")
        p("process; traced = every layer's attention probabilities and output saved.\n")
        p("| | nnscope plain | transformers eager | nnscope traced | nnsight traced |")
        p("| --- | --- | --- | --- | --- |")
        order = ("plain", "eager", "traced", "nnsight")
        sec = lambda r: f"{r['min_ms'] / 1e3:.2f} s" if r else "-"
        gib = lambda r, k: f"{r[k] / 1024:.1f} GiB" if r and r.get(k) else "-"
        p("| forward | " + " | ".join(sec(r7.get(k)) for k in order) + " |")
        p("| load | " + " | ".join(f"{r7[k]['load_ms'] / 1e3:.1f} s" if r7.get(k) and r7[k].get("load_ms") else "-"
                                  for k in order) + " |")
        p("| peak RSS (whole process) | " + " | ".join(gib(r7.get(k), "peak_rss_mib") for k in order) + " |")
        p("| peak RSS (forwards only) | " + " | ".join(gib(r7.get(k), "forward_peak_rss_mib") for k in order) + " |")
        p(f"\ntransformers/nnscope plain: {fx(ratio(r7.get('eager'), r7.get('plain')))}; "
          f"nnsight/nnscope traced: {fx(ratio(r7.get('nnsight'), r7.get('traced')))} (> 1: nnscope faster).\n")

    # Targets.
    p("\n## Targets\n")
    lines = []
    big = [s for s in summary if "fixture" not in s[0]]
    tr = [(s, s[7]["min_ms"] / s[5]["min_ms"]) for s in big if s[5] and s[7]]
    if tr:
        worst = min(tr, key=lambda x: x[1])
        ok = all(x[1] >= 1.0 for x in tr)
        lines.append(f"- traced (2) no slower than nnsight (4) on every checkpoint and shape: **{'met' if ok else 'missed'}** "
                     f"(speedup nnsight/nnscope from {worst[1]:.2f}x at {worst[0][0]} {worst[0][1]}x{worst[0][2]} to "
                     f"{max(x[1] for x in tr):.2f}x; the 1.3x aim is {'met' if all(x[1] >= 1.3 for x in tr) else 'not met'} everywhere)")
    pl = [(s, s[6]["min_ms"] / s[3]["min_ms"]) for s in big if s[3] and s[6]]
    if pl:
        worst = min(pl, key=lambda x: x[1])
        ok = all(x[1] >= 1.0 for x in pl)
        lines.append(f"- plain (1) no slower than transformers eager (3): **{'met' if ok else 'missed'}** "
                     f"(transformers/nnscope from {worst[1]:.2f}x at {worst[0][0]} {worst[0][1]}x{worst[0][2]} to {max(x[1] for x in pl):.2f}x; "
                     f"the 1.3x aim is {'met' if all(x[1] >= 1.3 for x in pl) else 'not met'} everywhere)")
    if summary16:
        where = (f"this CPU has {', '.join(f for f in have if f != 'avx512f')}" if bf16_hw
                 else "this CPU has neither avx512_bf16 nor amx_bf16, so the target does not apply here")
        p16 = [(s, ratio(s[5], s[3])) for s in summary16 if s[3] and s[5]]
        t16 = [(s, ratio(s[6], s[4])) for s in summary16 if s[4] and s[6]]
        parts = []
        for label, xs in (("plain transformers/nnscope", p16), ("traced nnsight/nnscope", t16)):
            if xs:
                w = min(xs, key=lambda x: x[1])
                parts.append(f"{label} worst {w[1]:.2f}x at {w[0][0]} {w[0][1]}x{w[0][2]}")
        allr = [x[1] for x in p16 + t16]
        verdict = ("met" if allr and min(allr) >= 1.0 else "missed") if bf16_hw else "n/a"
        lines.append(f"- bfloat16 no slower than PyTorch bfloat16 where the CPU has AVX512-BF16/AMX: **{verdict}** "
                     f"({where}; {'; '.join(parts) if parts else 'no pairs measured'})")
        own = [(s, ratio(s[7], s[3])) for s in summary16 if s[3] and s[7]]
        if own:
            w = min(own, key=lambda x: x[1])
            lines.append(f"- bfloat16 never slower than nnscope's own float32 (plain forward): "
                         f"**{'met' if w[1] >= 1.0 else 'missed'}** (f32/bf16 from {w[1]:.2f}x at {w[0][0]} "
                         f"{w[0][1]}x{w[0][2]} to {max(x[1] for x in own):.2f}x)")
        else:
            lines.append("- bfloat16 never slower than nnscope's own float32: **not measured** (the bfloat16 "
                         "checkpoints also need their float32 rows: list them in BENCH_MODELS too)")
    else:
        lines.append("- bfloat16 rows: **not run** (BENCH_BF16_MODELS is empty)")
    if dflt:
        rs = [(d, ratio(d[4], d[3])) for d in dflt if "fixture" not in d[0] and ratio(d[4], d[3])]
        if rs:
            w = max(rs, key=lambda x: x[1])
            bk = dflt[0][4].get("backend", "?")
            lines.append(f"- default build (no system library: `{bk}`) <= 1.25x slower than the best build on the checkpoints "
                         f"(`{backend}`): **{'met' if w[1] <= 1.25 else 'missed'}** (default/best up to {w[1]:.2f}x at "
                         f"{w[0][0]} {w[0][1]}x{w[0][2]}, from {min(x[1] for x in rs):.2f}x)")
    elif backend in ("candle-gemm", "nnscope-sgemm"):
        lines.append("- default build <= 1.25x slower than the best build: **not measured** (no system library was "
                     f"found, so every row above is already the default build's kernel, `{backend}`)")
    hk = [(s, s[3]["min_ms"] / s[4]["min_ms"] - 1) for s in summary if s[3] and s[4]]
    if hk:
        worst = max(hk, key=lambda x: x[1])
        med = sorted(x[1] for x in hk)[len(hk) // 2]
        # One noisy cell should not decide it: judged on the median over all shapes, worst shown.
        lines.append(f"- instrumentation with nothing requested <= 3%: **{'met' if med <= 0.03 else 'missed'}** "
                     f"on the median over shapes ({100 * med:.1f}%); worst cell {100 * worst[1]:.1f}% at "
                     f"{worst[0][0]} {worst[0][1]}x{worst[0][2]} (compare (1) with (2) in that row for the noise level)")
    tiny = [s for s in summary if "fixture" in s[0]]
    for s in tiny:
        if s[5] and s[7]:
            r = s[7]["min_ms"] / s[5]["min_ms"]
            lines.append(f"- tiny-fixture trace >= 10x faster than nnsight: **{'met' if r >= 10 else 'missed'}** ({r:.1f}x: "
                         f"{s[5]['min_ms']:.3f} ms vs {s[7]['min_ms']:.3f} ms)")
    if peak:
        g = [(s, s[8]) for s in big if s[8] and s[2] == 128]
        if g:
            worst = min(g, key=lambda x: x[1])
            best = max(g, key=lambda x: x[1])
            lines.append(f"- whole forwards at 128 tokens >= 75% of the measured float32 matmul peak ({peak:.0f} GFLOP/s): "
                         f"**{'met' if worst[1] >= 0.75 * peak else 'missed'}** (from {100 * worst[1] / peak:.0f}% at "
                         f"{worst[0][0]} {worst[0][1]}x{worst[0][2]} to {100 * best[1] / peak:.0f}% at "
                         f"{best[0][0]} {best[0][1]}x{best[0][2]})")
        mmr = [r for r in mm if r["contender"] == "nnscope" and r["dtype"] == "float32"]
        mmbest = max((r["gflops"] for r in mmr), default=None)
        if mmbest:
            lines.append(f"- nnscope's float32 `Linear` kernel >= 80% of the measured peak: "
                         f"**{'met' if mmbest >= 0.8 * peak else 'missed'}** ({mmbest:.0f} GFLOP/s = "
                         f"{100 * mmbest / peak:.0f}% of {peak:.0f})")
    if peaks.get("bfloat16"):
        mmr = [r for r in mm if r["contender"] == "nnscope" and r["dtype"] == "bfloat16"]
        mmbest = max((r["gflops"] for r in mmr), default=None)
        if mmbest:
            lines.append(f"- bfloat16 matmul peak: PyTorch {peaks['bfloat16']:.0f} GFLOP/s, nnscope's bfloat16 `Linear` "
                         f"({backend16}) {mmbest:.0f} GFLOP/s = {100 * mmbest / peaks['bfloat16']:.0f}% of it")
    mem = []
    for s in big:
        if s[3] and s[3].get("peak_rss_mib") and os.path.isdir(s[9]):
            size = ckpt_bytes(s[9]) / 2**20
            mem.append((s, s[3]["peak_rss_mib"] / size, (s[3].get("forward_peak_rss_mib") or 0) / size))
    if mem:
        worst = max(mem, key=lambda x: x[2])
        worstp = max(mem, key=lambda x: x[1])
        lines.append(f"- plain-forward peak memory <= 1.2x checkpoint: **{'met' if worst[2] <= 1.2 else 'missed'}** while "
                     f"running forwards (worst {worst[2]:.2f}x at {worst[0][0]} {worst[0][1]}x{worst[0][2]}); "
                     f"{'met' if worstp[1] <= 1.2 else 'missed'} for the whole process including loading "
                     f"(worst {worstp[1]:.2f}x at {worstp[0][0]} {worstp[0][1]}x{worstp[0][2]})")
    if big7:
        tr7 = r7.get("traced")
        ref = r7.get("eager")
        lines.append(f"- 7B bfloat16 traced forward of {big7[0]['tokens']} tokens next to transformers' time: **measured** "
                     f"(nnscope traced {fmt(tr7['min_ms'] / 1e3 if tr7 else None, 2)} s, transformers eager "
                     f"{fmt(ref['min_ms'] / 1e3 if ref else None, 2)} s; see the 7B section)")
    else:
        lines.append("- 7B bfloat16 traced forward of 32 tokens: **not run** (set BENCH_7B=1)")
    out.extend(lines)
    if failed:
        p("\n## Failed measurements\n")
        for r in failed:
            p(f"- `{r.get('cmd')}`")
    print("\n".join(out))


if __name__ == "__main__":
    main()
