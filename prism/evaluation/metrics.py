"""MUSE metrics as pure functions: ROUGE-L, the KnowMem prompt and answer cut, PrivLeak and the Unlearn Score.

Metric dicts everywhere in prism are flat `name -> float` with these keys: `verbmem_f`, `knowmem_f`, `knowmem_r`,
`knowmem_f_recall`, `knowmem_r_recall` (all ROUGE-L ×100), `auc`, `privleak` (percent) and `unlearn_score` (0..1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torchmetrics.functional.text.rouge import rouge_score

KNOWMEM_STOP: tuple[str, ...] = ("\n\n", "\nQuestion", "Question:")


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> dict[str, list[float]]:
    """Per-example ROUGE-L F1 and recall in [0, 1] (caller scales ×100), via torchmetrics.

    torchmetrics' default normalisation (lower-case, non-alphanumerics to spaces) matches the `rouge_score`
    package MUSE uses. An empty prediction or reference scores 0.
    """
    if len(preds) != len(refs):
        raise ValueError(f"rouge_l: {len(preds)} predictions but {len(refs)} references")
    f1, recall = [], []
    for p, r in zip(preds, refs):
        s = rouge_score(p, r, rouge_keys=("rougeL",))
        f1.append(float(s["rougeL_fmeasure"]))
        recall.append(float(s["rougeL_recall"]))
    return {"f1": f1, "recall": recall}


def knowmem_prompt(icl: Sequence[Mapping[str, str]], question: str) -> str:
    """MUSE's few-shot KnowMem prompt: `Question: q\\nAnswer: a\\n\\n` per ICL pair, then the open question."""
    shots = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in icl)
    return f"{shots}Question: {question}\nAnswer: "


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Cut `text` at the earliest occurrence of any stop string (no stripping)."""
    if not stop:
        return text
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def cut_answer(text: str, stop: Sequence[str] = KNOWMEM_STOP) -> str:
    """The answer part of a KnowMem generation: cut at the first stop string, then strip whitespace."""
    return cut_at_stop(text, stop).strip()


def privleak(auc: float, auc_ref: float) -> float:
    """PrivLeak = (AUC − AUC_ref) / AUC_ref × 100.

    With MUSE's AUC convention (see `prism.evaluation.mia.auroc`) a model that still memorises the forget set has
    AUC near 0, so PrivLeak is strongly negative (MUSE News target: −98.7); a model that forgot looks like the
    retrained reference (PrivLeak ≈ 0); over-unlearning shows as a large positive value.
    """
    if auc_ref <= 0:
        raise ValueError(f"privleak: auc_ref must be > 0, got {auc_ref}")
    return (auc - auc_ref) / auc_ref * 100.0


def _clip01(x: float) -> float:
    return 0.0 if math.isnan(x) else min(1.0, max(0.0, x))


def _ratio(m: Mapping[str, float], target: Mapping[str, float], key: str) -> float:
    t = float(target[key])
    if t <= 0:
        raise ValueError(f"unlearn_score: target {key} must be > 0 to normalise by it, got {t}")
    return float(m[key]) / t


def unlearn_score_components(m: Mapping[str, float], target: Mapping[str, float]) -> dict[str, float]:
    """The four clipped factors of the Unlearn Score (see `unlearn_score`)."""
    return {
        "utility": _clip01(_ratio(m, target, "knowmem_r")),
        "forget_knowmem": _clip01(1.0 - _ratio(m, target, "knowmem_f")),
        "forget_verbmem": _clip01(1.0 - _ratio(m, target, "verbmem_f")),
        "privacy": _clip01(1.0 - abs(float(m["privleak"])) / 100.0),
    }


def unlearn_score(m: Mapping[str, float], target: Mapping[str, float]) -> float:
    """Unlearn Score in [0, 1]: geometric mean of utility, unlearning effectiveness and privacy.

    With `T` the target (pre-unlearning) model's metrics and every factor clipped to [0, 1]:

        U = knowmem_r / T.knowmem_r                               (utility kept)
        E = sqrt((1 − knowmem_f / T.knowmem_f) · (1 − verbmem_f / T.verbmem_f))   (effectiveness)
        P = 1 − |privleak| / 100                                   (privacy)
        Unlearn Score = (U · E · P) ** (1/3)

    Effectiveness is itself the geometric mean of its two forget factors (not their arithmetic mean), so a model
    that keeps either its verbatim or its knowledge memorisation at the target level scores 0, like every other
    metric at its failure end. Perfect: knowmem_r ≥ target, knowmem_f = verbmem_f = 0, privleak = 0 → 1.
    """
    c = unlearn_score_components(m, target)
    effectiveness = math.sqrt(c["forget_knowmem"] * c["forget_verbmem"])
    factors = (c["utility"], effectiveness, c["privacy"])
    if min(factors) <= 0.0:
        return 0.0
    return float(math.prod(factors) ** (1.0 / 3.0))
