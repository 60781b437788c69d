import pytest

TEXTS = [
    "Question: Where was Alva Quint born?\nAnswer: Morrowick",
    "Alva Quint was born in 1822 in Morrowick and worked as a lamplighter.",
    "Question: What did Bero Tansk do?\nAnswer: glassblower",
    "Bero Tansk was born in 1790 in Hessel Fold and worked as a glassblower.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from prism.models.loading import train_tokenizer

    return train_tokenizer(TEXTS * 4, vocab_size=300)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from prism.models.loading import tiny_llama

    return tiny_llama(tiny_tokenizer, layers=2, hidden=32, heads=2)


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_tokenizer, tiny_model):
    out = tmp_path / "tiny-model"
    tiny_model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out
