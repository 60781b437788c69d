"""Data module and unlearning-stage invariants on a tiny benchmark and a tiny random model."""

import pytest
import torch

from prism.data.datamodule import BenchmarkData, collate
from prism.data.synth import synthesize
from prism.models.commands import tiny_from_benchmark
from prism.stages.unlearn import UnlearnModule


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = synthesize(root / "data", seed=1, n_forget=4, n_retain=4, n_holdout=4)
    model = tiny_from_benchmark(data, root / "model", layers=2, hidden=32, heads=2, vocab_size=512)
    return data, model


def make_data(bench, **kw):
    data, model = bench
    dm = BenchmarkData(str(data), tokenizer=str(model), batch_size=3, max_length=256, **kw)
    dm.setup("fit")
    return dm


def test_labels_mask_padding_and_question(bench):
    dm = make_data(bench)
    qa = next(i for i, ex in enumerate(dm.forget_examples) if ex.prompt)
    item = dm.forget[qa]
    prompt_len = len(dm.tokenizer(dm.forget_examples[qa].prompt, add_special_tokens=False).input_ids)
    assert all(x == -100 for x in item["labels"][:prompt_len])
    assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:]
    by_length = sorted(dm.forget, key=lambda x: len(x["input_ids"]))
    batch = collate([by_length[0], by_length[-1]], dm.tokenizer.pad_token_id)
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all()


def test_paired_loader_yields_forget_and_retain_each_step(bench):
    dm = make_data(bench, pairing="paired")
    steps = list(dm.train_dataloader())
    assert steps and all(set(b) >= {"forget", "retain"} for b, *_ in steps)
    # max_size_cycle: the longer set is seen exactly once per epoch, the shorter one cycles to cover it.
    seen = {k: torch.cat([b[k]["index"] for b, *_ in steps]).tolist() for k in ("forget", "retain")}
    longer = max(("forget", "retain"), key=lambda k: len(getattr(dm, k)))
    shorter = "retain" if longer == "forget" else "forget"
    assert sorted(seen[longer]) == list(range(len(getattr(dm, longer))))
    assert set(seen[shorter]) == set(range(len(getattr(dm, shorter))))


def test_cached_reference_logprobs_equal_live_reference_forward(bench):
    data, model = bench
    dm = make_data(bench)
    module = UnlearnModule(path=str(model))
    cached = module.compute_reference_logprobs(dm.forget, dm.tokenizer.pad_token_id, batch_size=3)
    reference = UnlearnModule(path=str(model)).model.eval()
    from prism.objectives import sequence_logprob

    batch = collate([dm.forget[i] for i in range(len(dm.forget))], dm.tokenizer.pad_token_id)
    with torch.no_grad():
        live = sequence_logprob(reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                batch["labels"])
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-4)
    assert cached.std() > 0  # different examples, different log-probs: the index lookup matters


def test_validation_during_unlearning_logs_benchmark_metrics(bench, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from prism.cli import main

    data, model = bench
    args = ["unlearn", "fit", "--config", "configs/tiny/unlearn/npo_gd.yaml", f"--model.path={model}",
            f"--data.path={data}", f"--model.output_dir={tmp_path / 'out'}", "--trainer.max_steps=4",
            "--trainer.val_check_interval=2", "--trainer.check_val_every_n_epoch=null", "--data.batch_size=2",
            "--model.validation={limit: 2, max_new_tokens_verbmem: 4, max_new_tokens_knowmem: 4}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'tb'}"]
    assert main(args) == 0
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*")).parent))
    events.Reload()
    steps = [e.step for e in events.Scalars("val/knowmem_f")]
    assert len(steps) >= 2 and steps == sorted(steps)  # a curve over training, not one point
    assert "val/privleak" in events.Tags()["scalars"]
