"""`prism <stage> fit|validate|test --config FILE` (LightningCLI) and plain commands (`prism data synth` ...).

One table maps each stage to its LightningModule and DataModule; jsonargparse derives every flag from their
signatures. User errors (bad files, bad paths) print one line and exit 2; internal failures exit 1.
"""

from __future__ import annotations

import importlib
import logging
import sys

from prism.errors import UserError

# stage -> (LightningModule, DataModule), as "module:Class" so `prism --help` imports nothing heavy.
STAGES = {
    "finetune": ("prism.stages.finetune:FinetuneModule", "prism.data.datamodule:BenchmarkData"),
    "probe": ("prism.stages.probe:ProbeModule", "prism.stages.probe:ProbeData"),
    "unlearn": ("prism.stages.unlearn:UnlearnModule", "prism.data.datamodule:BenchmarkData"),
    "evaluate": ("prism.stages.evaluate:EvaluateModule", "prism.stages.evaluate:EvaluationData"),
    "relearn": ("prism.stages.relearn:RelearnModule", "prism.data.datamodule:BenchmarkData"),
    "jailbreak": ("prism.stages.jailbreak:JailbreakModule", "prism.stages.jailbreak:JailbreakData"),
    "margins": ("prism.stages.margins:MarginsModule", "prism.stages.margins:MarginsData"),
}

# command -> "module:function" taking argv.
COMMANDS = {
    "data": "prism.data.commands:main",
    "model": "prism.models.commands:main",
    "report": "prism.evaluation.report:main",
    "pipeline": "prism.pipeline:main",
}


def _load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def run_stage(stage: str, args: list[str]):
    from lightning.pytorch.cli import LightningCLI

    class PrismCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            # The tokenizer always comes from the model being trained.
            if "data.tokenizer" in {a.dest for a in parser._actions} and "model.path" in {a.dest for a in parser._actions}:
                parser.link_arguments("model.path", "data.tokenizer")

    module_cls, data_cls = (_load(s) for s in STAGES[stage])
    return PrismCLI(
        module_cls,
        data_cls,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "default_root_dir": "logs",  # also where the config is saved when the logger is off
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "logs", "name": stage},
            },
        },
    )


def usage() -> str:
    return (
        "usage: prism <stage> fit|validate|test --config FILE [--key=value ...]\n"
        "       prism <command> ...\n\n"
        f"stages:   {', '.join(STAGES)}\n"
        f"commands: {', '.join(COMMANDS)}  (data synth|check, model prepare|tiny, report, pipeline)\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="[prism] %(levelname)s %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    try:
        if name in STAGES:
            run_stage(name, rest)
            return 0
        if name in COMMANDS:
            return int(_load(COMMANDS[name])(rest) or 0)
        print(usage(), file=sys.stderr)
        print(f"prism: error: unknown stage or command '{name}'", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"prism: error: {err}", file=sys.stderr)
        sys.exit(2)


def console():
    sys.exit(main())
