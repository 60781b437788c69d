"""Nothing unsafe is loaded: custom model code runs only with trust_remote_code, pickled tensors are read with
weights_only=True (a pickle that would run code is refused), outputs are safetensors, paths are never hub ids."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from prism.errors import UserError

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))

from runcli import run_cli  # noqa: E402


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _unlearn_args(model: Path, data: Path, tmp_path: Path) -> list[str]:
    return ["unlearn", "fit", f"--model.path={model}", f"--data.path={data}", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
            "--trainer.enable_progress_bar=false", "--data.max_length=64", f"--model.output_dir={tmp_path / 'out'}"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from prism.data.synth import synthesize

    return Path(synthesize(tmp_path_factory.mktemp("safety") / "data", seed=2, n_forget=2, n_retain=2, n_holdout=2))


def _custom_code_dir(src: Path, dst: Path, marker: Path, where: str = "config.json") -> Path:
    shutil.copytree(src, dst)
    (dst / "custom_llama.py").write_text(
        f"open({str(marker)!r}, 'w').write('custom code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    pass\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((dst / where).read_text())
    models = {"AutoConfig": "custom_llama.CustomConfig", "AutoModelForCausalLM": "custom_llama.CustomModel"}
    config["auto_map"] = models if where == "config.json" else {"AutoTokenizer": ["custom_llama.CustomTokenizer", None]}
    (dst / where).write_text(json.dumps(config))
    return dst


def test_model_with_custom_code_is_refused_without_the_flag(tiny_model_dir, bench, tmp_path, monkeypatch, capsys):
    from prism.models.loading import check_model_dir, load_model, load_tokenizer

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    custom = _custom_code_dir(tiny_model_dir, tmp_path / "custom", marker)
    code, err = run_cli(_unlearn_args(custom, bench, tmp_path), capsys)
    assert code == 2, err[-2000:]
    assert "model.path" in err and "ships custom code" in err and "trust_remote_code: true" in err
    with pytest.raises(UserError, match="ships custom code"):
        load_model(custom)
    assert check_model_dir(custom, trust_remote_code=True) == custom  # the flag is the only way in
    tok_custom = _custom_code_dir(tiny_model_dir, tmp_path / "custom_tok", marker, where="tokenizer_config.json")
    with pytest.raises(UserError, match="tokenizer_config.json declare auto_map"):
        load_tokenizer(tok_custom)
    assert not marker.exists()  # no line of the shipped code ran


def test_trust_remote_code_is_off_by_default_in_every_stage():
    from prism.cli import STAGES, _load

    seen = 0
    for module_spec, _ in STAGES.values():
        params = inspect.signature(_load(module_spec).__init__).parameters
        if "trust_remote_code" in params:
            seen += 1
            assert params["trust_remote_code"].default is False, module_spec
    assert seen >= 4


def test_bin_weights_load_with_weights_only_and_pickled_code_is_refused(tiny_model_dir, bench, tmp_path,
                                                                       monkeypatch, capsys):
    from safetensors.torch import load_file

    from prism.models.loading import load_model

    monkeypatch.chdir(tmp_path)
    binary = tmp_path / "binary"
    shutil.copytree(tiny_model_dir, binary)
    state = load_file(binary / "model.safetensors")
    (binary / "model.safetensors").unlink()
    torch.save(state, binary / "pytorch_model.bin")  # plain tensors, as old checkpoints ship them
    loaded = load_model(binary).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    marker = tmp_path / "pwned"
    torch.save({**state, "payload": _Payload(marker)}, binary / "pytorch_model.bin")
    with pytest.raises(UserError, match="would run code when unpickled.*posix.system"):
        load_model(binary)
    code, err = run_cli(_unlearn_args(binary, bench, tmp_path), capsys)
    assert code == 2 and "refusing to load the weights" in err, err[-2000:]
    assert not marker.exists()


def test_checkpoint_with_pickled_code_is_refused(tiny_model_dir, bench, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, tmp_path / "evil.ckpt")
    code, err = run_cli(_unlearn_args(tiny_model_dir, bench, tmp_path) + [f"--ckpt_path={tmp_path / 'evil.ckpt'}"],
                     capsys)
    assert code == 2, err[-2000:]
    assert "refusing to load a file that would run code when unpickled" in err and "weights_only=True" in err
    assert not marker.exists()


def test_outputs_are_safetensors(tiny_model_dir, tmp_path):
    from lightning.pytorch import LightningModule

    from prism.models.loading import load_model, load_tokenizer
    from prism.models.probe import Probe, load_probe, save_probe
    from prism.stages.common import save_hf_checkpoint

    save_probe(tmp_path / "probe", Probe(32), {"layer": 1, "pooling": "mean"})
    assert sorted(p.name for p in (tmp_path / "probe").iterdir()) == ["probe.json", "probe.safetensors"]
    load_probe(tmp_path / "probe")

    class Holder(LightningModule):
        def __init__(self):
            super().__init__()
            self.model = load_model(tiny_model_dir)

    holder = Holder()
    save_hf_checkpoint(holder, holder.model, load_tokenizer(tiny_model_dir), tmp_path / "model")
    names = {p.name for p in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]


def test_paths_are_never_hub_ids(tmp_path, monkeypatch):
    from prism.models.loading import load_model, load_tokenizer

    monkeypatch.chdir(tmp_path)
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        with pytest.raises(UserError, match="never downloads from a hub"):
            load_model(name)
        with pytest.raises(UserError, match="never downloads from a hub"):
            load_tokenizer(name)
