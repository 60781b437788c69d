"""`prism pipeline --preset smollm2|tiny`: the whole PRISM study, end to end, resumable.

 1 synthesise the benchmark   2 prepare the model       3 fine-tune the target    4 evaluate the target
 5 train the probe            6 unlearn with each method 7 evaluate each          8 relearning attack on each
 9 margins                   10 report

Each step records a hash of its inputs (config files, overrides, upstream hashes) next to its output and is
skipped when both are there and unchanged, so an interrupted run resumes where it stopped. Stages run in this
process through the same CLI a user types, with the preset's config files and paths under --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prism.errors import UserError
from prism.io import atomic_write_json

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class Preset:
    methods: tuple[str, ...]
    synth: dict | None = None  # None: a real benchmark and target model given by --data and --target
    model: str | None = None  # "tiny" (random init with a local tokenizer) or "smollm2" (the embedded default)
    tiny_arch: dict = field(default_factory=dict)


PRESETS = {
    "tiny": Preset(
        synth=dict(seed=0, n_forget=16, n_retain=16, n_holdout=16),
        methods=("prism", "npo_gd", "ga", "sam_npo"),
        model="tiny",
        tiny_arch=dict(layers=2, hidden=64, heads=4, vocab_size=512),
    ),
    "smollm2": Preset(
        synth=dict(seed=0, n_forget=10, n_retain=10, n_holdout=10),
        methods=("prism", "npo_gd", "ga", "sam_npo"),
        model="smollm2",
    ),
    # Real benchmarks: the data and the target model are local paths given on the command line.
    "muse_books": Preset(methods=("prism", "npo_gd", "ga", "sam_npo")),
    "muse_news": Preset(methods=("prism", "npo_gd", "ga", "sam_npo")),
    "wmdp": Preset(methods=("prism", "rmu", "npo_gd")),
}


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _config_text(path: Path) -> str:
    """A config file with the files its groups point at, so editing either invalidates the step."""
    text = path.read_text()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if not key.startswith(" ") and value.endswith(".yaml"):
            text += (path.parent / value).read_text()
    return text


class Pipeline:
    def __init__(self, preset: str, out: Path, methods: list[str], data: Path | None = None, target: Path | None = None):
        self.preset, self.p, self.out, self.methods = preset, PRESETS[preset], out, methods
        self.data = data or out / "data"
        self.target = target or out / "models" / "target"
        self.configs = CONFIGS / preset
        self.hashes: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.total = 0
        self.done = 0

    # --- step bookkeeping -------------------------------------------------------------------------------------
    def step(self, name: str, output: Path, inputs: list, run, upstream: tuple[str, ...] = ()):
        """Run `run()` unless `output` exists with the same input hash; print one line with the elapsed time."""
        self.done += 1
        digest = _digest(name, inputs, [self.hashes[u] for u in upstream])
        stamp = self.out / ".steps" / f"{name.replace('/', '__')}.json"
        label = f"[{self.done:2d}/{self.total}] {name:<22}"
        if output.exists() and stamp.exists() and json.loads(stamp.read_text()).get("hash") == digest:
            self.hashes[name] = digest
            self.seconds[name] = json.loads(stamp.read_text()).get("seconds", 0.0)
            print(f"{label} up to date ({output})", flush=True)
            return
        print(f"{label} running ...", flush=True)
        start = time.perf_counter()
        run()
        if not output.exists():
            raise RuntimeError(f"pipeline step {name} finished without writing {output}")
        seconds = round(time.perf_counter() - start, 1)
        atomic_write_json(stamp, {"hash": digest, "seconds": seconds})
        self.hashes[name], self.seconds[name] = digest, seconds
        print(f"{label} done in {seconds:.1f}s", flush=True)

    def stage(self, stage: str, subcommand: str, config: Path, overrides: dict):
        from prism.cli import run_stage

        args = [subcommand, "--config", str(config)]
        args += [f"--{k}={v}" for k, v in overrides.items()]
        args += [f"--trainer.logger.init_args.save_dir={self.out / 'tensorboard'}"]
        run_stage(stage, args)

    def stage_inputs(self, config: Path, overrides: dict) -> list:
        return [_config_text(config), overrides]

    # --- the study --------------------------------------------------------------------------------------------
    def run(self):
        o, cfg = self.out, self.configs
        data, models, evals, target, probe = self.data, o / "models", o / "eval", self.target, o / "probe"
        self.total = 3 * len(self.methods) + len(self.margin_models) + 4
        if self.p.synth is not None:
            self.total += 3
            self.make_target(data, models / "init", target)
        else:
            self.step("finetune", target / "config.json", [str(data), str(target)], lambda: None)
        self.evaluate("target", target, upstream="finetune", target_metrics=None)
        pr = {"model.path": target, "model.output_dir": probe, "data.path": data}
        self.step("probe", probe / "probe.json", self.stage_inputs(cfg / "probe.yaml", pr),
                  lambda: self.stage("probe", "fit", cfg / "probe.yaml", pr), upstream=("finetune",))
        for method in self.methods:
            config = cfg / "unlearn" / f"{method}.yaml"
            if not config.exists():
                raise UserError(f"unknown method '{method}': no {config}")
            out = models / method
            ul = {"model.path": target, "model.output_dir": out, "data.path": data}
            if "\n  probe:" in config.read_text():
                ul["model.probe"] = probe
            self.step(f"unlearn/{method}", out / "config.json", self.stage_inputs(config, ul),
                      lambda: self.stage("unlearn", "fit", config, ul), upstream=("finetune", "probe"))
            self.evaluate(method, out, upstream=f"unlearn/{method}", target_metrics=evals / "target" / "metrics.json")
        for method in self.methods:
            self.relearn(method)
        self.margins(self.margin_models)
        self.report()

    @property
    def margin_models(self) -> list[str]:
        return ["target", *self.methods[:1]]

    def make_target(self, data: Path, init: Path, target: Path):
        """Steps 1-3: synthesise the benchmark, prepare the model, fine-tune it into the target."""
        from prism.data.synth import synthesize

        self.step("synth", data / "meta.json", [self.p.synth], lambda: synthesize(data, **self.p.synth))
        init = self.prepare_model(init)
        ft = {"model.path": init, "model.output_dir": target, "data.path": data}
        config = self.configs / "finetune.yaml"
        self.step("finetune", target / "config.json", self.stage_inputs(config, ft),
                  lambda: self.stage("finetune", "fit", config, ft), upstream=("synth", "model"))

    def prepare_model(self, out: Path) -> Path:
        if self.p.model == "tiny":
            from prism.models.commands import tiny_from_benchmark

            self.step("model", out / "config.json", [self.p.tiny_arch],
                      lambda: tiny_from_benchmark(self.data, out, **self.p.tiny_arch), upstream=("synth",))
            return out
        from prism.models.loading import embedded_default_dir, prepare_embedded_default

        self.step("model", embedded_default_dir() / "model.safetensors", [str(embedded_default_dir())],
                  prepare_embedded_default)
        return embedded_default_dir()

    def evaluate(self, name: str, model: Path, upstream: str, target_metrics: Path | None):
        out = self.out / "eval" / name
        ev = {"model.path": model, "model.output_dir": out, "model.name": name, "data.path": self.data}
        if target_metrics is not None:
            ev["model.target_metrics"] = target_metrics
        config = self.configs / "evaluate.yaml"
        ups = (upstream,) if target_metrics is None else (upstream, "evaluate/target")
        self.step(f"evaluate/{name}", out / "metrics.json", self.stage_inputs(config, ev),
                  lambda: self.stage("evaluate", "test", config, ev), upstream=ups)

    def relearn(self, method: str):
        out = self.out / "relearn" / method
        rl = {"model.path": self.out / "models" / method, "model.output_dir": out, "data.path": self.data}
        config = self.configs / "relearn.yaml"
        self.step(f"relearn/{method}", out / "relearn.json", self.stage_inputs(config, rl),
                  lambda: self.stage("relearn", "fit", config, rl), upstream=(f"unlearn/{method}",))

    def margins(self, names: list[str]):
        config = self.configs / "margins.yaml"
        for name in names:
            out = self.out / "margins" / name
            model = self.target if name == "target" else self.out / "models" / name
            mg = {"model.path": model, "model.probe": self.out / "probe", "model.reference": self.target,
                  "model.output_dir": out, "data.path": self.data}
            ups = ("probe", "finetune" if name == "target" else f"unlearn/{name}")
            self.step(f"margins/{name}", out / "margins.json", self.stage_inputs(config, mg),
                      lambda: self.stage("margins", "test", config, mg), upstream=ups)

    def report(self):
        from prism.evaluation.report import plot_relearn, relearn_table, write_report

        names = ["target", *self.methods]
        curves = {m: c for m in self.methods if (c := _read_json(self.out / "relearn" / m / "relearn.json"))}
        appendix = ""
        if curves:
            plot_relearn(curves, self.out / "relearn.png")
            appendix = f"\n## Relearning attack\n\n{relearn_table(curves)}\n![relearning curves](relearn.png)\n"
        write_report([self.out / "eval" / n for n in names], self.out, appendix)
        summary = {
            "preset": self.preset,
            "models": {n: str(self.target if n == "target" else self.out / "models" / n) for n in names},
            "methods": {n: _read_json(self.out / "eval" / n / "metrics.json") for n in names},
            "relearn": curves,
            "margins": {n: _read_json(self.out / "margins" / n / "margins.json") for n in self.margin_models},
            "seconds": self.seconds,
        }
        atomic_write_json(self.out / "summary.json", summary)
        print(f"report: {self.out / 'report.md'}\nsummary: {self.out / 'summary.json'}", flush=True)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="prism pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (files of configs/<preset>/unlearn/), or 'all'")
    parser.add_argument("--out", default=None, help="output directory (default: logs/run-<preset>)")
    parser.add_argument("--fresh", action="store_true", help="delete the output directory first")
    parser.add_argument("--data", default=None, help="benchmark directory (real-benchmark presets)")
    parser.add_argument("--target", default=None, help="target model directory (real-benchmark presets)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if preset.synth is None and not (args.data and args.target):
        raise UserError(f"preset {args.preset} needs --data DIR and --target DIR (local benchmark and target model)")
    if args.methods == "all":
        methods = sorted(p.stem for p in (CONFIGS / args.preset / "unlearn").glob("*.yaml"))
    else:
        methods = args.methods.split(",") if args.methods else list(preset.methods)
    out = Path(args.out or f"logs/run-{args.preset}")
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    data, target = (Path(p) if p else None for p in (args.data, args.target))
    Pipeline(args.preset, out, methods, data, target).run()
    print(f"pipeline {args.preset}: {time.perf_counter() - start:.0f}s in all", file=sys.stderr, flush=True)
    return 0
