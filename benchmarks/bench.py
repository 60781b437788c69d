"""`make bench`: speed and memory figures of prism, each a ratio of two things measured side by side in one run.

  step      seconds per optimiser step of each unlearning method / gd (same model, batch, sequence length),
            next to the floor given by the number of forward+backward passes (prism/gd: 3/2 = 1.5)
  memory    peak memory of NPO with cached reference log-probs vs with a resident reference model
            (a fresh process per variant; peak RSS on CPU, torch.cuda.max_memory_allocated on GPU)
  generate  batched vs one-prompt-at-a-time greedy generation on the same 64 KnowMem prompts
  precision tokens/s of the PRISM step in bf16-mixed vs 32-true (where bf16 autocast runs)

Model: the embedded SmolLM2-135M-Instruct; data: the synthesized fictitious benchmark (seed 0, 24 forget and 24
retain entities). Prints a table and writes logs/bench/bench.json (atomically).

    python benchmarks/bench.py [--batch 4 --seq 32 --warmup 1 --steps 3] [--sections step,memory,generate,precision]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

SECTIONS = ("step", "memory", "generate", "precision")
OUT = benchlib.REPO / "logs" / "bench" / "bench.json"


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _passes(kwargs: dict) -> int:
    """Forward+backward passes per step: forget, perturbed forget (SAM), retain."""
    return 1 + bool(kwargs.get("sam_rho")) + (kwargs.get("retain_objective") is not None)


def bench_step(args, data: Path, checkpoint) -> dict:
    out = {"batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps, "clock": benchlib.CLOCK,
           "methods": {}}
    rows = out["methods"]
    # gd (the reference) is timed first and again last: a machine whose load changes during the run shows as drift
    order = ["gd"] + [m for m in args.methods if m != "gd"] + ["gd"] if "gd" in args.methods else list(args.methods)
    gd_runs = []
    for method in order:
        kwargs = benchlib.method_kwargs(method, benchlib.WORK / "unused")
        _log(f"step time: {method} ({args.warmup} warm-up + {args.steps} timed steps, batch {args.batch} x {args.seq})")
        t0 = time.perf_counter()
        run = benchlib.run_method(kwargs, data, args.batch, args.seq, args.warmup, args.steps)
        if method == "gd":
            gd_runs.append(run)
            if len(gd_runs) == 2:  # the reference is both gd runs together
                run = {k: gd_runs[0][k] + gd_runs[1][k] for k in ("step_seconds", "optimizer_seconds", "wall_seconds",
                                                                   "warmup_seconds")}
                out["gd_drift"] = statistics.median(gd_runs[1]["step_seconds"]) / statistics.median(
                    gd_runs[0]["step_seconds"])
        passes_only = [t - o for t, o in zip(run["step_seconds"], run["optimizer_seconds"])]
        rows[method] = {"passes": _passes(kwargs), "step_seconds": run["step_seconds"],
                        "optimizer_seconds": run["optimizer_seconds"], "warmup_seconds": run["warmup_seconds"],
                        "wall_seconds": run["wall_seconds"],
                        "median_step_seconds": statistics.median(run["step_seconds"]),
                        "median_step_seconds_without_optimizer": statistics.median(passes_only)}
        _log(f"  {method}: steps {['%.2f' % t for t in run['step_seconds']]} s (optimizer.step "
             f"{['%.2f' % t for t in run['optimizer_seconds']]}; wall {['%.2f' % t for t in run['wall_seconds']]}), "
             f"{time.perf_counter() - t0:.0f} s in all")
        if "gd" in rows:
            gd = rows["gd"]
            for row in rows.values():
                row["ratio_to_gd"] = row["median_step_seconds"] / gd["median_step_seconds"]
                row["ratio_to_gd_without_optimizer"] = (row["median_step_seconds_without_optimizer"]
                                                        / gd["median_step_seconds_without_optimizer"])
                row["floor_ratio_to_gd"] = row["passes"] / gd["passes"]
        checkpoint(out)
    return out


def bench_memory(args) -> dict:
    out = {}
    for variant in ("npo_cached", "npo_resident"):
        _log(f"memory: {variant} in a fresh process")
        cmd = [sys.executable, str(Path(__file__).with_name("memory_worker.py")), variant,
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.memory_steps)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"memory worker {variant} failed:\n{done.stderr[-3000:]}")
        out[variant] = json.loads(line[len("RESULT "):])
    c, r = out["npo_cached"], out["npo_resident"]
    key = "cuda_peak_mb" if "cuda_peak_mb" in c else "peak_rss_mb"
    out["measure"] = key
    out["ratio_cached_to_resident"] = c[key] / r[key]
    added = (c["peak_rss_mb"] - c["baseline_rss_mb"], r["peak_rss_mb"] - r["baseline_rss_mb"])
    if key == "peak_rss_mb" and min(added) > 0:  # above the imports' baseline: what training itself added
        out["ratio_cached_to_resident_above_baseline"] = added[0] / added[1]
    return out


def bench_generate(args, data: Path) -> dict:
    import torch
    import yaml

    from prism.data.formats import load_muse
    from prism.evaluation.generation import generate
    from prism.evaluation.metrics import KNOWMEM_STOP, knowmem_prompt
    from prism.models.loading import load_model, load_tokenizer

    bench = load_muse(data)
    prompts = [knowmem_prompt(bench.knowmem[f"{role}_qa_icl"], row["question"])
               for role in ("forget", "retain") for row in bench.knowmem[f"{role}_qa"]][: args.prompts]
    if len(prompts) < args.prompts:
        raise RuntimeError(f"only {len(prompts)} KnowMem prompts in {data}")
    preset = yaml.safe_load((benchlib.REPO / "configs" / "smollm2" / "evaluate.yaml").read_text())["model"]
    batch_size = int(preset.get("batch_size", 32))
    model = load_model("smollm2")
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = load_tokenizer("smollm2")
    generate(model, tokenizer, prompts[:2], 4, batch_size=2, stop=KNOWMEM_STOP)  # warm-up

    def timed(bs: int) -> tuple[float, list[str]]:
        _log(f"generate: {len(prompts)} KnowMem prompts, batch size {bs}")
        t0 = benchlib.clock()
        outputs = generate(model, tokenizer, prompts, args.max_new_tokens, batch_size=bs, stop=KNOWMEM_STOP)
        return benchlib.clock() - t0, outputs

    # batched before and after the one-by-one loop: a drift of the machine's speed shows, and is averaged out
    t_batched_1, batched = timed(batch_size)
    t_single, single = timed(1)
    t_batched_2, _ = timed(batch_size)
    t_batched = (t_batched_1 + t_batched_2) / 2
    same = sum(a.strip() == b.strip() for a, b in zip(batched, single))
    return {"prompts": len(prompts), "batch_size": batch_size, "max_new_tokens": args.max_new_tokens,
            "clock": benchlib.CLOCK, "batched_seconds": [t_batched_1, t_batched_2], "one_by_one_seconds": t_single,
            "speedup": t_single / t_batched, "identical_outputs": same, "target_speedup": 5.0}


def bench_precision(args, data: Path) -> dict:
    """The two precisions back to back (not the step section's run: a shared machine's speed drifts)."""
    support = benchlib.bf16_support()
    out = {"support": support, "method": "prism", "clock": benchlib.CLOCK}
    if not support.get("autocast", support.get("native", False)):
        out["skipped"] = "bf16 autocast does not run on this device"
        return out
    kwargs = benchlib.method_kwargs("prism", benchlib.WORK / "unused")
    tokens_per_step = 2 * args.batch * args.seq  # forget + retain batch
    times = {"32-true": [], "bf16-mixed": []}
    for round_ in range(args.precision_rounds):  # alternated, so a drift of the machine's speed hits both alike
        for precision in times:
            _log(f"precision: prism step in {precision} (round {round_ + 1} of {args.precision_rounds})")
            times[precision] += benchlib.run_method(kwargs, data, args.batch, args.seq, args.warmup, args.steps,
                                                    precision=precision)["step_seconds"]
    for precision, t in times.items():
        out[precision] = {"step_seconds": t, "tokens_per_second": tokens_per_step / statistics.median(t)}
    out["ratio_bf16_to_fp32"] = out["bf16-mixed"]["tokens_per_second"] / out["32-true"]["tokens_per_second"]
    return out


def table(result: dict) -> str:
    lines = []
    step = result.get("step")
    if step:
        lines.append(f"seconds per optimiser step / gd  (SmolLM2-135M, batch {step['batch']} x {step['seq']} tokens, "
                     f"median of {step['steps']} steps after {step['warmup']} warm-up; {step['clock']})")
        lines.append(f"  {'method':<14} {'passes':>6} {'s/step':>8} {'ratio':>7} {'w/o opt':>8} {'floor':>7}")
        for name, row in step["methods"].items():
            ratio = f"{row['ratio_to_gd']:.2f}" if "ratio_to_gd" in row else "-"
            no_opt = f"{row['ratio_to_gd_without_optimizer']:.2f}" if "ratio_to_gd" in row else "-"
            floor = f"{row['floor_ratio_to_gd']:.2f}" if "floor_ratio_to_gd" in row else "-"
            lines.append(f"  {name:<14} {row['passes']:>6} {row['median_step_seconds']:>8.2f} {ratio:>7} {no_opt:>8} "
                         f"{floor:>7}")
        lines.append("  (ratio: whole step incl. AdamW; w/o opt: without optimizer.step, the passes alone; "
                     "floor: passes / gd's 2)")
        if "gd_drift" in step:
            lines.append(f"  gd timed first and last: last/first = {step['gd_drift']:.2f} (1.00 = the machine's speed "
                         "did not change during the run)")
    mem = result.get("memory")
    if mem:
        c, r = mem["npo_cached"], mem["npo_resident"]
        k = mem["measure"]
        lines.append(f"peak memory, NPO cached log pi_ref / resident reference model ({k})")
        lines.append(f"  cached {c[k]:.0f} MB, resident {r[k]:.0f} MB: ratio {mem['ratio_cached_to_resident']:.2f}")
        if "ratio_cached_to_resident_above_baseline" in mem:
            lines.append(f"  above the imports' baseline: {c[k] - c['baseline_rss_mb']:.0f} MB vs "
                         f"{r[k] - r['baseline_rss_mb']:.0f} MB: ratio {mem['ratio_cached_to_resident_above_baseline']:.2f}")
    gen = result.get("generate")
    if gen:
        lines.append(f"generation, {gen['prompts']} KnowMem prompts, <= {gen['max_new_tokens']} new tokens ({gen['clock']})")
        lines.append(f"  batched (batch {gen['batch_size']}) {sum(gen['batched_seconds']) / 2:.1f} s, one by one "
                     f"{gen['one_by_one_seconds']:.1f} s: speedup {gen['speedup']:.1f}x (target >= {gen['target_speedup']:.0f}x); "
                     f"identical outputs {gen['identical_outputs']}/{gen['prompts']}")
    prec = result.get("precision")
    if prec:
        sup = prec["support"]
        where = f"{sup['device']}, native bf16: {sup.get('native')} {sup.get('cpu_flags', '')}".rstrip()
        if "skipped" in prec:
            lines.append(f"bf16-mixed vs 32-true: skipped ({prec['skipped']}; {where})")
        else:
            lines.append(f"tokens/s of the prism step, bf16-mixed / 32-true ({where}; s = {prec['clock']})")
            lines.append(f"  32-true {prec['32-true']['tokens_per_second']:.1f}, bf16-mixed "
                         f"{prec['bf16-mixed']['tokens_per_second']:.1f}: ratio {prec['ratio_bf16_to_fp32']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=1, help="the peak is reached in the first step")
    parser.add_argument("--methods", default=",".join(benchlib.MAIN_METHODS),
                        help="comma-separated configs/smollm2/unlearn/<method>.yaml names, or 'all' (gd is the reference)")
    parser.add_argument("--precision-rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    args.methods = benchlib.all_methods() if args.methods == "all" else [m for m in args.methods.split(",") if m]
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    import torch

    from prism.io import atomic_write_json

    data = benchlib.prepare_data()
    result = {
        "env": {"torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
                "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
                "load_average_at_start": list(os.getloadavg())},
    }
    started = time.perf_counter()
    def checkpoint(partial: dict) -> None:
        atomic_write_json(args.out, {**result, "step": partial})

    runs = {"step": lambda: bench_step(args, data, checkpoint), "memory": lambda: bench_memory(args),
            "generate": lambda: bench_generate(args, data),
            "precision": lambda: bench_precision(args, data)}
    for name in SECTIONS:
        if name in sections:
            t0 = time.perf_counter()
            result[name] = runs[name]()
            result[name]["section_seconds"] = time.perf_counter() - t0
            result["env"]["seconds"] = time.perf_counter() - started
            result["env"]["load_average_at_end"] = list(os.getloadavg())
            atomic_write_json(args.out, result)  # after every section: a later failure keeps what was measured
    print(table(result))
    print(f"written {args.out} ({result['env']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
