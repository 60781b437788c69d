"""The tiny preset end to end: `prism pipeline --preset tiny` and the outcomes the study must show."""

import json

from prism.cli import main


def test_tiny_pipeline_unlearns_keeps_utility_and_relearning_works(tmp_path):
    out = tmp_path / "run-tiny"
    assert main(["pipeline", "--preset", "tiny", "--methods", "prism,npo_gd", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    target, prism = summary["methods"]["target"], summary["methods"]["prism"]

    # The target memorised both sets; PRISM removed the forget answers and kept most retain answers.
    assert target["knowmem_f"] >= 90 and target["knowmem_r"] >= 90
    rows = [json.loads(line) for line in (out / "eval" / "target" / "generations.jsonl").read_text().splitlines()]
    for task in ("knowmem_f", "knowmem_r"):
        answers = [r for r in rows if r["task"] == task]
        contained = sum(r["reference"].strip() in r["output"] for r in answers)
        assert answers and contained >= 0.9 * len(answers), f"{task}: {contained} of {len(answers)} answers exact"
    assert prism["knowmem_f"] <= 0.2 * target["knowmem_f"]
    assert prism["knowmem_r"] >= 0.8 * target["knowmem_r"]
    for metrics in summary["methods"].values():
        assert {"knowmem_f", "knowmem_r", "verbmem_f", "privleak"} <= set(metrics)
    assert "unlearn_score" in prism

    # The relearning attack works: forget KnowMem of npo_gd grows with relearning steps.
    curve = summary["relearn"]["npo_gd"]
    assert curve["steps"][0] == 0 and len(curve["steps"]) >= 3
    assert curve["knowmem_f"][-1] > curve["knowmem_f"][0]

    assert set(summary["models"]) == {"target", "prism", "npo_gd"}
    assert summary["margins"]["prism"] is not None
    report = (out / "report.md").read_text()
    assert "prism" in report and "npo_gd" in report
    relearn_rows = report.split("## Relearning attack")[1]
    npo_gd_row = next(line for line in relearn_rows.splitlines() if line.startswith("| npo_gd |"))
    assert f"{curve['knowmem_f'][-1]:.1f}" in npo_gd_row
    for png in ("knowmem.png", "unlearn_score.png", "relearn.png"):
        assert (out / png).stat().st_size > 0

    # A second run finds every step up to date and changes nothing.
    before = (out / "summary.json").read_text()
    assert main(["pipeline", "--preset", "tiny", "--methods", "prism,npo_gd", "--out", str(out)]) == 0
    after = json.loads((out / "summary.json").read_text())
    assert after["methods"] == json.loads(before)["methods"]
