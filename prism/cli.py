"""`prism <stage> fit|validate|test --config FILE` (LightningCLI) and plain commands (`prism data synth` ...).

One table maps each stage to its LightningModule and DataModule; jsonargparse derives every flag from their
signatures. User errors (bad files, bad paths) print one line and exit 2; internal failures exit 1.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import sys
import traceback
import warnings
import zipfile
from pathlib import Path

import yaml

from prism.errors import EXIT_INTERNAL, EXIT_USER, TrainingAborted, UserError

log = logging.getLogger("prism.cli")

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


# Step checkpoints of every training stage (the `checkpoint.*` flags): Lightning's ModelCheckpoint writing
# <log dir>/checkpoints/last.ckpt (weights, optimiser, loop counters, data position, RNG) every N optimiser steps.
CHECKPOINT_DEFAULTS = {
    "checkpoint.every_n_train_steps": 50,
    "checkpoint.save_last": True,
    "checkpoint.save_top_k": 0,  # last.ckpt only: a resume point, not a model zoo
    "checkpoint.enable_version_counter": False,
}
# Model-config keys that name a model directory, or a file, checked before anything loads.
MODEL_DIR_KEYS = ("path", "reference", "judge_path")
MODEL_FILE_KEYS = ("target_metrics",)


def _check_model_inputs(model_cfg) -> None:
    """Model directories and the probe of a stage's model config, checked without loading weights."""
    from prism.models.loading import check_model_dir, check_probe_dir

    trust = bool(model_cfg.get("trust_remote_code") or False)
    for key in MODEL_DIR_KEYS:
        value = model_cfg.get(key)
        if value is None:
            continue
        try:
            check_model_dir(value, trust_remote_code=trust)
        except UserError as err:
            raise UserError(f"model.{key}: {err}") from None
    for key in MODEL_FILE_KEYS:
        value = model_cfg.get(key)
        if value is not None and not Path(value).is_file():
            raise UserError(f"model.{key}: file '{value}' not found")
    if model_cfg.get("probe") is not None and model_cfg.get("path") is not None:
        try:
            check_probe_dir(model_cfg.get("probe"), model_cfg.get("path"))
        except UserError as err:
            raise UserError(f"model.probe: {err}") from None


def _cli_class():
    import warnings

    from jsonargparse import Namespace
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from prism.stages.common import ResumeRNG

    # Manual optimisation (the unlearn stage) checkpoints the state after the step, which is what resuming needs.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

    class PrismCLI(LightningCLI):
        """LightningCLI plus: inputs validated before any model loads, step checkpoints, exact `--ckpt_path last`."""

        def add_arguments_to_parser(self, parser):
            # The tokenizer always comes from the model being trained.
            if "data.tokenizer" in {a.dest for a in parser._actions} and "model.path" in {a.dest for a in parser._actions}:
                parser.link_arguments("model.path", "data.tokenizer")
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults(CHECKPOINT_DEFAULTS)

        def parse_arguments(self, parser, args):
            super().parse_arguments(parser, args)
            if self.config.get("subcommand"):  # before LightningCLI itself reads the checkpoint's hyperparameters
                self._check_ckpt_path(self.config[self.config.subcommand].get("ckpt_path"))

        def before_instantiate_classes(self):
            cfg = self.config[self.subcommand]
            if "weights_only" in cfg and cfg.get("weights_only") is None:
                cfg.weights_only = True  # --ckpt_path files are unpickled as tensors and plain values only
            # Validation, before any model weights load: model directories and probe, then the data (files, schema,
            # tokenisation), each failing with one message naming the file, record and field (UserError, exit 2).
            _check_model_inputs(cfg.model)
            self._validated_data = self.datamodule_class(
                **{k: v for k, v in cfg.data.as_dict().items() if not k.startswith("__")})  # __path__: its yaml
            if hasattr(self._validated_data, "validate"):
                self._validated_data.validate()
            if self.subcommand == "fit" and cfg.get("ckpt_path") == "last":
                self._pin_resume_version(cfg)

        def instantiate_classes(self):
            super().instantiate_classes()
            # Keep the validated (already read and tokenised) datamodule instead of the fresh copy.
            self.config_init[self.subcommand]["data"] = self.datamodule = self._validated_data

        def instantiate_trainer(self, **kwargs):
            config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
            callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
            if config.get("enable_checkpointing") is False:  # the user turned checkpoints off: honour it
                callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
            return self._instantiate_trainer(config, [*callbacks, ResumeRNG()])

        @staticmethod
        def _check_ckpt_path(ckpt_path):
            if ckpt_path is None or ckpt_path in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
                return
            path = Path(ckpt_path)
            if not path.is_file():
                raise UserError(f"ckpt_path: '{ckpt_path}' is not a file (use 'last' to resume the latest run of "
                                "this configuration)")
            if not zipfile.is_zipfile(path):
                raise UserError(f"ckpt_path: '{ckpt_path}' is truncated or not a checkpoint written by torch.save")

        def _pin_resume_version(self, cfg):
            """`--ckpt_path last` resumes the newest run of THIS configuration: point the logger at its version
            directory, so Lightning finds <version>/checkpoints/last.ckpt and the run keeps logging where it was."""
            logger, dirpath = cfg.trainer.get("logger"), cfg.get("checkpoint", Namespace()).get("dirpath")
            if dirpath or not isinstance(logger, Namespace) or not isinstance(logger.get("init_args"), Namespace):
                return
            init = logger.init_args
            if init.get("version") is not None or init.get("save_dir") is None:
                return
            root = Path(init.save_dir) / (init.get("name") or "")
            candidates = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime,
                                reverse=True)
            keys = ("model", "data", "seed_everything")
            try:
                current = yaml.safe_load(self._parser(self.subcommand).dump(cfg, skip_none=False))
            except Exception:  # noqa: BLE001 - cannot compare: take the newest
                current = None
            for ckpt in candidates:
                run_dir = ckpt.parent.parent
                if not run_dir.name.split("_", 1)[1].isdigit():
                    continue
                try:
                    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
                except (OSError, yaml.YAMLError):
                    saved = None
                if current is None or (isinstance(saved, dict) and all(saved.get(k) == current.get(k) for k in keys)):
                    init.version = int(run_dir.name.split("_", 1)[1])
                    log.info("resuming %s from %s", self.subcommand, ckpt)
                    return
            if candidates:
                log.warning("--ckpt_path last: no checkpoint under %s comes from a run with this model/data "
                            "configuration (%d from others); starting from the beginning", root, len(candidates))

    return PrismCLI


def run_stage(stage: str, args: list[str]):
    module_cls, data_cls = (_load(s) for s in STAGES[stage])
    with warnings.catch_warnings():
        # `prism <stage> ...` hands LightningCLI the arguments after the stage name on purpose
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return _cli_class()(
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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (tests and notebooks swap it; a handler holding the
    stream it was created with would write into a closed one)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging():
    """prism's own messages on stderr; Lightning and transformers keep their handlers (no double lines)."""
    logger = logging.getLogger("prism")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[prism] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def usage() -> str:
    return (
        "usage: prism <stage> fit|validate|test --config FILE [--key=value ...]\n"
        "       prism <command> ...\n\n"
        f"stages:   {', '.join(STAGES)}\n"
        f"commands: {', '.join(COMMANDS)}  (data synth|check, model prepare|tiny, report, pipeline)\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Run a stage or command. Returns 0 on success; failures raise SystemExit: 2 for a user error (one line),
    1 for an aborted run (one line) or an internal error (a line plus the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    _setup_logging()
    # Never reach a model hub: every path in a config is a local file (see prism.models.loading).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
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
        sys.exit(EXIT_USER)
    except pickle.UnpicklingError as err:  # a checkpoint with more than tensors: torch refused to run its code
        reason = next((ln for ln in str(err).splitlines() if "GLOBAL" in ln), str(err).splitlines()[0])
        print(f"prism: error: refusing to load a file that would run code when unpickled ({reason.strip()}); only "
              "tensors and plain values are loaded (weights_only=True)", file=sys.stderr)
        sys.exit(EXIT_USER)
    except TrainingAborted as err:
        print(f"prism: aborted: {err}", file=sys.stderr)
        sys.exit(EXIT_INTERNAL)
    except Exception as err:  # noqa: BLE001 - the last line of defence: a clear line, then the details
        print(f"prism: internal error: {type(err).__name__}: {err}\n"
              "This is a bug in prism or a library it uses, not in your input; please report it with the traceback "
              "below.", file=sys.stderr)
        traceback.print_exc()
        sys.exit(EXIT_INTERNAL)


def console():
    sys.exit(main())
