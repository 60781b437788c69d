"""`prism report RUN_DIR... [--out DIR]`: one Markdown table and two plots comparing runs' MUSE metrics.

Each run directory holds `metrics.json`: a flat dict name -> number, plus "model" and "data" strings (and an
optional "name" used as the row label; the directory name otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from prism.errors import DataFormatError, UserError
from prism.io import atomic_save_figure, atomic_write_text

MAIN_COLUMNS: tuple[str, ...] = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak", "unlearn_score")
NON_METRIC_KEYS = {"name", "model", "data"}


def direction(column: str) -> str:
    """'min' for forget-set memorisation, 'zero' for PrivLeak, 'max' for everything else."""
    if column.startswith(("verbmem_f", "knowmem_f")):
        return "min"
    if column.startswith("privleak"):
        return "zero"
    return "max"


ARROWS = {"min": "↓", "zero": "→0", "max": "↑"}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise UserError(f"run directory '{run_dir}' has no metrics.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(path, f"not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DataFormatError(path, f"expected a JSON object, got {type(data).__name__}")
    row = {"name": str(data.get("name") or Path(run_dir).resolve().name)}
    row.update({k: float(v) for k, v in data.items() if k not in NON_METRIC_KEYS and _is_number(v)})
    for k in ("model", "data"):
        if isinstance(data.get(k), str):
            row[k] = data[k]
    return row


def columns_of(rows: list[dict]) -> list[str]:
    """The main MUSE columns first (when any run has them), then other numeric keys in first-seen order."""
    present = [c for c in MAIN_COLUMNS if any(c in r for r in rows)]
    extra: list[str] = []
    for r in rows:
        extra += [k for k in r if k not in NON_METRIC_KEYS and k not in MAIN_COLUMNS and k not in extra]
    return present + extra


def best_values(rows: list[dict], columns: list[str]) -> dict[str, float]:
    """Best value per column by its direction (ties all count as best)."""
    best = {}
    for c in columns:
        vals = [r[c] for r in rows if c in r]
        if not vals:
            continue
        d = direction(c)
        best[c] = min(vals) if d == "min" else min(vals, key=abs) if d == "zero" else max(vals)
    return best


def _decimals(values: list[float]) -> int:
    """3 decimals for a column of fractions (AUC, Unlearn Score), 2 for percentages."""
    return 3 if values and all(abs(v) <= 1 for v in values) else 2


def markdown_table(rows: list[dict]) -> str:
    columns = columns_of(rows)
    best = best_values(rows, columns)
    lines = [
        "# prism report",
        "",
        "Direction: lower is better for verbmem_f and knowmem_f (↓), closest to 0 is best for privleak (→0), "
        "higher is better for every other column (↑). Best value per column in **bold**.",
        "",
        "| model | " + " | ".join(f"{c} {ARROWS[direction(c)]}" for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    decimals = {c: _decimals([r[c] for r in rows if c in r]) for c in columns}
    for r in rows:
        cells = []
        for c in columns:
            if c not in r:
                cells.append("–")
            else:
                text = f"{r[c]:.{decimals[c]}f}"
                # Compare the formatted values too: equal-looking cells must not differ in boldness.
                is_best = r[c] == best[c] or text == f"{best[c]:.{decimals[c]}f}"
                cells.append(f"**{text}**" if is_best else text)
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    sources = [r for r in rows if "model" in r or "data" in r]
    if sources:
        lines += ["", "Runs:", ""]
        lines += [f"- {r['name']}: model `{r.get('model', '?')}`, data `{r.get('data', '?')}`" for r in sources]
    return "\n".join(lines) + "\n"


def plot_knowmem(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    pts = [r for r in rows if "knowmem_f" in r and "knowmem_r" in r]
    ax.scatter([r["knowmem_f"] for r in pts], [r["knowmem_r"] for r in pts])
    for r in pts:
        ax.annotate(r["name"], (r["knowmem_f"], r["knowmem_r"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if not pts:
        ax.text(0.5, 0.5, "no run has knowmem_f and knowmem_r", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("KnowMem forget (ROUGE-L ×100, lower is better)")
    ax.set_ylabel("KnowMem retain (ROUGE-L ×100, higher is better)")
    ax.set_title("Forgetting vs utility")
    ax.grid(alpha=0.3)
    atomic_save_figure(fig, path)
    plt.close(fig)


def plot_unlearn_score(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if "unlearn_score" in r]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(pts) + 2), 4))
    ax.bar([r["name"] for r in pts], [r["unlearn_score"] for r in pts])
    if not pts:
        ax.text(0.5, 0.5, "no run has unlearn_score", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("Unlearn Score (higher is better)")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", rotation=30)
    ax.set_title("Unlearn Score")
    atomic_save_figure(fig, path)
    plt.close(fig)


def relearn_table(curves: dict[str, dict]) -> str:
    """Markdown: per method, KnowMem and VerbMem of the forget set at each relearning step (curves as relearn.json)."""
    def arrow(values: list[float]) -> str:
        return " → ".join(f"{v:.1f}" for v in values)

    lines = ["| model | steps | KnowMem forget ↓ | VerbMem forget ↓ |", "|---|---|---|---|"]
    for name, c in curves.items():
        steps = ", ".join(map(str, c["steps"]))
        lines.append(f"| {name} | {steps} | {arrow(c['knowmem_f'])} | {arrow(c['verbmem_f'])} |")
    return "\n".join(lines) + "\n"


def plot_relearn(curves: dict[str, dict], path: Path) -> None:
    """One panel per forget metric, one line per method: which model relearns slowest under the same attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in zip(axes, ("knowmem_f", "verbmem_f"), ("KnowMem forget", "VerbMem forget")):
        for name, c in curves.items():
            ax.plot(c["steps"], c[key], marker="o", label=name)
        ax.set_xlabel("relearning steps")
        ax.set_title(f"{label} (lower is more robust)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ROUGE-L F1 ×100")
    axes[0].legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def default_out(run_dirs: list[Path]) -> Path:
    """The deepest directory holding all runs (e.g. `logs/` for `logs/a logs/b`)."""
    return Path(os.path.commonpath([str(Path(d).resolve().parent) for d in run_dirs]))


def write_report(run_dirs: list[Path], out: Path | None = None, appendix: str = "") -> Path:
    """Write report.md (the table, then `appendix`), knowmem.png and unlearn_score.png into `out`; returns the path
    of report.md."""
    if not run_dirs:
        raise UserError("prism report needs at least one run directory")
    run_dirs = [Path(d) for d in run_dirs]
    rows = [read_run(d) for d in run_dirs]
    out = Path(out) if out is not None else default_out(run_dirs)
    report = atomic_write_text(out / "report.md", markdown_table(rows) + appendix)
    plot_knowmem(rows, out / "knowmem.png")
    plot_unlearn_score(rows, out / "unlearn_score.png")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prism report", description="Compare runs' metrics.json in one table.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the runs' common parent)")
    args = parser.parse_args(argv)
    path = write_report(args.run_dirs, args.out)
    print(f"[prism] report written: {path}")
    return 0
