"""Peak memory of one NPO variant, in a fresh process (so one variant's allocations cannot hide the other's).

    python benchmarks/memory_worker.py npo_cached|npo_resident --batch 4 --seq 32 --steps 2

Prints one JSON line: peak resident set size (VmHWM) after the imports (baseline) and after training, and on a
GPU the peak of torch.cuda.max_memory_allocated. torch's CPU allocations are invisible to tracemalloc, hence RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("npo_cached", "npo_resident")


def _peak_rss_mb() -> float:
    """Peak RSS of this process's address space: VmHWM. Not ru_maxrss: after fork+exec Linux carries the PARENT's
    peak into the child's ru_maxrss, so a worker started by a big bench process would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux; bytes on macOS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    import lightning  # noqa: F401  (imports count in the baseline, not in the variant)
    import transformers  # noqa: F401

    import benchlib
    import prism.stages.unlearn  # noqa: F401

    data = benchlib.prepare_data()
    baseline = _peak_rss_mb()
    kwargs = benchlib.method_kwargs("npo", benchlib.WORK / "unused")
    if args.variant == "npo_resident":
        kwargs["forget_objective"] = benchlib.NPOResidentReference(beta=kwargs["forget_objective"].beta)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = benchlib.run_method(kwargs, data, args.batch, args.seq, warmup=0, steps=args.steps)
    out = {"variant": args.variant, "baseline_rss_mb": baseline, "peak_rss_mb": _peak_rss_mb(),
           "mean_step_seconds": run["mean_step_seconds"]}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
