"""Generation section of bench/RESULTS.md from bench/work/results.jsonl (see run.sh, BENCH_SUITE).

usage: python report_generate.py RESULTS.jsonl RESULTS.md
Writes (or replaces) the section between the markers below in RESULTS.md.
"""
import json, platform, subprocess, sys

BEGIN = "<!-- generation: begin -->"
END = "<!-- generation: end -->"


def cpu():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    rows = [r for r in rows if not r.get("failed") and r.get("mode") in
            ("generate", "generate-traced", "nnsight-generate")]
    best = {}
    for r in rows:  # the best round of each measurement
        key = (r["contender"], r["mode"], r["model"].rstrip("/").split("/")[-1], r["batch"])
        if key not in best or r["min_ms"] < best[key]["min_ms"]:
            best[key] = r
    lines = [BEGIN, "## Generation (greedy, 128-token prompt + 32 new tokens, KV cache)", "",
             f"CPU: {cpu()}; threads: {next(iter(best.values()), {}).get('threads', '?')}. "
             "Throughput counts new tokens only (batch x 32 / total time); time to first token is a "
             "generation of one new token. Ratios are nnscope's speed over the other's (> 1: nnscope "
             "faster), from minimum times; medians beside them.", "",
             "| model | batch | nnscope plain tok/s (min / median) | transformers generate() | plain ratio | "
             "nnscope traced tok/s | nnsight generate() | traced ratio | first token: nnscope / transformers ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    models = sorted({k[2] for k in best})
    for m in models:
        for b in sorted({k[3] for k in best if k[2] == m}):
            def get(c, mode):
                return best.get((c, mode, m, b))
            p, t = get("nnscope", "generate"), get("transformers", "generate")
            pt, ns = get("nnscope", "generate-traced"), get("nnsight", "nnsight-generate")

            def tps(r):
                if not r:
                    return "-"
                n = r.get("new", 32) * b
                return f"{n / (r['min_ms'] / 1e3):.1f} / {n / (r['median_ms'] / 1e3):.1f}"

            def ratio(a, c):
                if not a or not c:
                    return "-"
                return f"{c['min_ms'] / a['min_ms']:.2f}x (median {c['median_ms'] / a['median_ms']:.2f}x)"

            def first(a, c):
                if not a or not c:
                    return "-"
                return f"{a['first_min_ms']:.1f} / {c['first_min_ms']:.1f}"
            lines.append(f"| {m} | {b} | {tps(p)} | {tps(t)} | {ratio(p, t)} | {tps(pt)} | {tps(ns)} | "
                         f"{ratio(pt, ns)} | {first(p, t)} |")
    lines += ["", "Targets: plain generation no slower than transformers' generate() (ratio >= 1), traced "
              "no slower than nnsight (ratio >= 1).", END]
    section = "\n".join(lines) + "\n"
    try:
        text = open(sys.argv[2]).read()
    except FileNotFoundError:
        text = ""
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        text = text[:a] + section.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    open(sys.argv[2], "w").write(text)


if __name__ == "__main__":
    main()
