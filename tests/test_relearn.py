import json

import pytest
import torch


@pytest.fixture()
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture()
def tiny_bench(tmp_path):
    """A 6-entity benchmark and a random-init tiny Llama with its own tokenizer: the "unlearned" stand-in knows
    nothing of the forget set, so whatever it recalls after relearning was relearned."""
    from prism.data.synth import synthesize
    from prism.models.commands import tiny_from_benchmark

    data = synthesize(tmp_path / "data", n_forget=6, n_retain=6, n_holdout=6)
    model = tiny_from_benchmark(data, tmp_path / "model", layers=2, hidden=64, heads=4, vocab_size=512)
    return data, model


def test_relearning_raises_forget_knowledge_with_steps(tmp_path, monkeypatch, tiny_bench, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from prism.cli import run_stage
    from prism.models.loading import load_model, load_tokenizer
    from prism.stages.evaluate import BenchmarkEvaluator

    data, model_dir = tiny_bench
    monkeypatch.chdir(tmp_path)  # TensorBoard runs go to ./logs
    out = tmp_path / "relearn"
    eval_args = dict(limit=8, max_new_tokens_verbmem=8, max_new_tokens_knowmem=8)
    cli = run_stage("relearn", [
        "fit", f"--model.path={model_dir}", f"--data.path={data}", "--data.pairing=joint",
        "--data.forget_sources=[qa]", "--data.retain_sources=[]", "--data.forget_limit=12", "--data.batch_size=16",
        "--model.lr=5e-3", "--model.eval_steps=[0,30,60]", f"--model.eval_limit={eval_args['limit']}",
        f"--model.max_new_tokens_verbmem={eval_args['max_new_tokens_verbmem']}",
        f"--model.max_new_tokens_knowmem={eval_args['max_new_tokens_knowmem']}", f"--model.output_dir={out}",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ])
    trainer = cli.trainer
    assert trainer.global_step == 60  # max_steps defaults to the last evaluation step
    assert len(trainer.datamodule.forget) == 12 and len(trainer.datamodule.retain) == 0  # forget subset only

    res = json.loads((out / "relearn.json").read_text())
    assert res["steps"] == [0, 30, 60] and [p["step"] for p in res["points"]] == [0, 30, 60]
    assert res["n_forget_examples"] == 12 and res["lr"] == 5e-3 and res["batch_size"] == 16
    for key in ("verbmem_f", "knowmem_f", "knowmem_r"):
        assert res[key] == [p[key] for p in res["points"]] and len(res[key]) == 3

    # Step 0 is the model before any update: the same numbers as evaluating the untouched checkpoint.
    before, _ = BenchmarkEvaluator(str(data), "muse", **eval_args)(load_model(model_dir), load_tokenizer(model_dir))
    assert res["points"][0]["knowmem_f"] == pytest.approx(before["knowmem_f"])
    assert res["points"][0]["verbmem_f"] == pytest.approx(before["verbmem_f"])

    # The attack works: forget knowledge comes back as relearning goes on.
    f, recall = res["knowmem_f"], [p["knowmem_f_recall"] for p in res["points"]]
    assert f[-1] > f[0] and f[-1] >= 50.0
    assert recall[-1] > recall[0] and recall[-1] >= max(recall[:-1])

    png = (out / "relearn.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(out / "relearn.png").shape[2] in (3, 4)

    events = EventAccumulator(str(trainer.logger.log_dir))
    events.Reload()
    scalars = events.Scalars("relearn/knowmem_f")
    assert [s.step for s in scalars] == [0, 30, 60]
    assert [s.value for s in scalars] == pytest.approx(f)


def test_relearn_rejects_max_steps_below_last_eval_step(tmp_path, monkeypatch, tiny_bench, capsys):
    from prism.cli import main

    data, model_dir = tiny_bench
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["relearn", "fit", f"--model.path={model_dir}", f"--data.path={data}", "--data.pairing=joint",
              "--data.retain_sources=[]", "--model.eval_steps=[0,10]", "--trainer.max_steps=5",
              "--trainer.logger=false", "--trainer.enable_checkpointing=false"])
    assert err.value.code == 2
    assert "max_steps=5 < the last eval step 10" in capsys.readouterr().err
