"""MUSE evaluation of one model: VerbMem, KnowMem (forget / retain) and PrivLeak with four MIA scores.

Distributed use: every rank calls `evaluate_muse(..., rank=r, world=w)` on its shard of every example list, the
caller gathers the returned records from all ranks and calls `metrics_from_records(all_records, auc_ref)`; the
metrics of the full set do not depend on how it was split (AUC needs all scores, so it is computed from records).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from prism.evaluation.generation import generate
from prism.evaluation.metrics import KNOWMEM_STOP, cut_answer, knowmem_prompt, privleak, rouge_l
from prism.evaluation.mia import SCORE_NAMES, auroc, mia_scores

if TYPE_CHECKING:
    from prism.data.formats import MuseBenchmark

T = TypeVar("T")

GENERATION_TASKS: tuple[str, ...] = ("verbmem_f", "knowmem_f", "knowmem_r")
MIA_TASKS: tuple[str, ...] = ("mia_forget", "mia_holdout")
# MUSE reports AUC and PrivLeak of Min-40%; the other scores get an `auc_<name>` each.
PRIMARY_SCORE = "min_k"


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Every `world`-th item starting at `rank` (strided, so long and short examples spread over ranks)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard: need 0 <= rank < world, got rank={rank}, world={world}")
    return list(items[rank::world])


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


def metrics_from_records(records: Sequence[dict], auc_ref: float = 0.5) -> dict[str, float]:
    """Flat metrics from per-example records (possibly gathered from several ranks).

    verbmem_f / knowmem_f / knowmem_r: mean ROUGE-L F1 ×100; knowmem_*_recall: mean ROUGE-L recall ×100;
    auc: Min-K% AUROC forget vs holdout (MUSE convention), privleak from it; auc_loss, auc_zlib, auc_min_k_pp.
    """
    out: dict[str, float] = {}
    for task in GENERATION_TASKS:
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        out[task] = 100.0 * _mean([r["rouge_f1"] for r in rows])
        if task.startswith("knowmem"):
            out[f"{task}_recall"] = 100.0 * _mean([r["rouge_recall"] for r in rows])
    forget = [r for r in records if r["task"] == "mia_forget"]
    holdout = [r for r in records if r["task"] == "mia_holdout"]
    if forget and holdout:
        for name in SCORE_NAMES:
            auc = auroc([r[name] for r in forget], [r[name] for r in holdout])
            out["auc" if name == PRIMARY_SCORE else f"auc_{name}"] = auc
        out["privleak"] = privleak(out["auc"], auc_ref)
    return out


def _generation_records(task, prompts, outputs, refs, indices) -> list[dict]:
    scores = rouge_l(outputs, refs)
    return [
        {"task": task, "index": i, "prompt": p, "output": o, "reference": r, "rouge_f1": f, "rouge_recall": rc}
        for i, p, o, r, f, rc in zip(indices, prompts, outputs, refs, scores["f1"], scores["recall"])
    ]


def evaluate_muse(
    model,
    tokenizer,
    bench: MuseBenchmark,
    batch_size: int = 16,
    max_new_tokens_verbmem: int = 128,
    max_new_tokens_knowmem: int = 32,
    min_k: float = 0.4,
    auc_ref: float = 0.5,
    limit: int | None = None,
    progress: bool = False,
    rank: int = 0,
    world: int = 1,
    mia_max_length: int = 2048,
) -> tuple[dict[str, float], list[dict]]:
    """Evaluate `model` on a MUSE benchmark; returns (metrics, records).

    `limit` keeps the first `limit` examples of each list (before sharding). Records, one per example:
    generation tasks (`verbmem_f`, `knowmem_f`, `knowmem_r`) as
    {task, index, prompt, output, reference, rouge_f1, rouge_recall} (ROUGE in [0, 1]; VerbMem's reference is the
    gt cut to `max_new_tokens_verbmem` tokens, KnowMem's output is cut at the stop strings), and MIA tasks
    (`mia_forget`, `mia_holdout`) as {task, index, loss, zlib, min_k, min_k_pp} (higher = more non-member).
    With world > 1 the metrics cover this rank's shard only; gather records and use `metrics_from_records`.
    """

    def take(items: Sequence[T]) -> list[tuple[int, T]]:
        indexed = list(enumerate(items))[: limit if limit is not None else None]
        return shard(indexed, rank, world)

    records: list[dict] = []

    # VerbMem: continue the prompt; compare with the gt cut to as many tokens as may be generated (MUSE).
    verb = take(bench.verbmem_forget)
    if verb:
        prompts = [d["prompt"] for _, d in verb]
        refs = [
            tokenizer.decode(
                tokenizer(d["gt"], add_special_tokens=False)["input_ids"][:max_new_tokens_verbmem],
                skip_special_tokens=True,
            )
            for _, d in verb
        ]
        # No stop strings: prose legitimately contains blank lines.
        outputs = generate(model, tokenizer, prompts, max_new_tokens_verbmem, batch_size, stop=None, progress=progress)
        records += _generation_records("verbmem_f", prompts, outputs, refs, [i for i, _ in verb])

    # KnowMem: few-shot QA, answer cut at the first stop string.
    for task, qa_key, icl_key in (("knowmem_f", "forget_qa", "forget_qa_icl"), ("knowmem_r", "retain_qa", "retain_qa_icl")):
        qa = take(bench.knowmem.get(qa_key, []))
        if not qa:
            continue
        icl = bench.knowmem.get(icl_key, [])
        prompts = [knowmem_prompt(icl, d["question"]) for _, d in qa]
        raw = generate(model, tokenizer, prompts, max_new_tokens_knowmem, batch_size, stop=KNOWMEM_STOP, progress=progress)
        outputs = [cut_answer(o) for o in raw]
        records += _generation_records(task, prompts, outputs, [d["answer"] for _, d in qa], [i for i, _ in qa])

    # PrivLeak: MIA scores of the forget (members) and holdout (non-members) texts.
    for task, key in (("mia_forget", "forget"), ("mia_holdout", "holdout")):
        texts = take(bench.privleak.get(key, []))
        if not texts:
            continue
        scores = mia_scores(model, tokenizer, [t for _, t in texts], batch_size, mia_max_length, min_k, progress)
        for j, (i, _) in enumerate(texts):
            records.append({"task": task, "index": i} | {name: float(scores[name][j]) for name in SCORE_NAMES})

    return metrics_from_records(records, auc_ref), records
