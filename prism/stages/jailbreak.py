"""Stage `jailbreak`: attack success rates (ASR) of prefill, multi-turn and AutoDAN attacks, and over-refusal.

`prism jailbreak test --config configs/<preset>/jailbreak.yaml --model.path DIR --data.mode MODE --data.path FILE`
reads one jailbreak file (DESIGN.md section 2; the mode is inferred from the file when not given):
  prefill      the model's chat template for the user turn, then the first k tokens of the harmful answer as the start
               of the assistant turn (several k in one run, `data.prefill_tokens`); the model continues from there;
  multi_turn   the conversation replayed through the chat template, the final answer generated. `model.replay`:
               "recorded" feeds the recorded assistant turns back as context; "generate" drops them and lets the
               model answer every earlier user turn itself, turn by turn (batched across conversations);
  autodan      each adversarial prompt as a single user turn;
  overrefusal  benign prompts; the score is the refusal rate (on rows labelled safe; unsafe rows reported apart).
Generation is greedy and batched (one `generate` call per data batch, prompts sorted by length). Verdicts come from
an offline judge (prism.evaluation.judge): the refusal-phrase judge by default, a local HF judge model with
`model.judge_path`; with `model.facts` (e.g. the benchmark directory) answers that reproduce forget-set facts count
as leaks. Success is a leak when facts are given, else any non-refusal (`model.success` overrides).
Outputs in `output_dir` (default: the run's log dir): jailbreak.json (ASR per mode and per k, refusal / compliance /
leak rates) and jailbreak.jsonl (every prompt, response and verdict). Under DDP each rank generates and judges its
share; records are gathered (duplicates from sampler padding dropped) and rank 0 writes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch.distributed as dist
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader

from prism.errors import UserError
from prism.evaluation.generation import generate
from prism.io import atomic_write_json, atomic_write_text
from prism.models.loading import load_model, load_tokenizer
from prism.stages.common import DTYPES

log = logging.getLogger(__name__)

Mode = Literal["prefill", "multi_turn", "autodan", "overrefusal"]
MODES: tuple[str, ...] = ("prefill", "multi_turn", "autodan", "overrefusal")
ATTACK_MODES: tuple[str, ...] = ("prefill", "multi_turn", "autodan")


# --------------------------------------------------------------------------- prompt construction


def merge_consecutive(messages: Sequence[dict]) -> list[dict]:
    """Join consecutive turns of the same role (some chat templates insist on alternating roles)."""
    out: list[dict] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def chat_prompt(tokenizer, messages: Sequence[dict]) -> str:
    """The model's chat template with the assistant header opened (add_generation_prompt).

    A template that rejects consecutive same-role turns gets them merged; a tokenizer without a chat template
    (a base model) gets a plain `Role: content` transcript ending in `Assistant:` and a newline.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja raises TemplateError for role-order violations
            merged = merge_consecutive(messages)
            if merged == messages:
                raise UserError(f"the model's chat template rejects this conversation: {err}") from None
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:\n"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prefill_prompt(tokenizer, user: str, prefix: str, k: int, system: str | None = None) -> tuple[str, int]:
    """(prompt text, n): the chat template up to and including the assistant header, then the first n = min(k,
    len(prefix)) tokens of `prefix`, built so that tokenizing the text gives exactly header ids + prefix ids[:n].

    If the tokenizer does not round-trip that cut (a multi-byte character split, or a merge across the header
    boundary), the largest n' < n that does is used; the returned n says how many prefix tokens the prompt holds.
    """
    if k < 0:
        raise UserError(f"prefill_tokens must be >= 0, got {k}")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    header = chat_prompt(tokenizer, messages)
    head_ids, prefix_ids = _ids(tokenizer, header), _ids(tokenizer, prefix)
    n_max = min(k, len(prefix_ids))
    for n in range(n_max, -1, -1):
        want = head_ids + prefix_ids[:n]
        candidates = (
            header + tokenizer.decode(prefix_ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False),
            tokenizer.decode(want, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        )
        for text in candidates:
            if _ids(tokenizer, text) == want:
                if n < n_max:
                    log.warning("prefill: the tokenizer does not round-trip %d prefix tokens; using %d", n_max, n)
                return text, n
    raise AssertionError("unreachable: n = 0 always round-trips")  # pragma: no cover


def user_rounds(conversation: Sequence[dict]) -> list[list[dict]]:
    """The attacker's side of a conversation in rounds: each round is the system/user turns up to and including
    one user turn (recorded assistant turns dropped). Order is kept."""
    rounds, cur = [], []
    for m in conversation:
        if m["role"] == "assistant":
            continue
        cur.append({"role": m["role"], "content": m["content"]})
        if m["role"] == "user":
            rounds.append(cur)
            cur = []
    if cur:
        rounds.append(cur)
    return rounds


def replay_conversations(
    conversations: Sequence[Sequence[dict]], respond: Callable[[list[list[dict]]], list[str]]
) -> list[list[dict]]:
    """Replay conversations with the model answering every user turn but the last: returns, per conversation, the
    messages that end in its final user turn, with the model's own replies in between, in the original order.

    `respond` maps a list of message lists to one reply each; it is called once per round with every
    conversation that still has a later user turn (batched across conversations).
    """
    rounds = [user_rounds(c) for c in conversations]
    history: list[list[dict]] = [[] for _ in conversations]
    finals: list[list[dict] | None] = [None] * len(conversations)
    for r in range(max((len(x) for x in rounds), default=0)):
        active = [i for i in range(len(rounds)) if r < len(rounds[i])]
        messages = {i: history[i] + rounds[i][r] for i in active}
        middle = [i for i in active if r < len(rounds[i]) - 1]
        for i in active:
            if r == len(rounds[i]) - 1:
                finals[i] = messages[i]
        if middle:
            replies = respond([messages[i] for i in middle])
            for i, reply in zip(middle, replies):
                history[i] = messages[i] + [{"role": "assistant", "content": reply}]
    return finals  # type: ignore[return-value]


def build_items(mode: str, records: list[dict], tokenizer, prefill_tokens: Sequence[int] = (5, 10, 15, 20),
                system_prompt: str | None = None) -> list[dict]:
    """One item per generation: uid, index (record), mode, request (what the judge sees as the ask), prompt (the
    text the model continues), context (what the attacker supplied; facts in it are not leaks), plus mode fields."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    items = []
    for i, rec in enumerate(records):
        base = {"index": i, "mode": mode}
        if mode == "prefill":
            for k in prefill_tokens:
                text, n = prefill_prompt(tokenizer, rec["prompt"], rec["prefix"], int(k), system_prompt)
                items.append(base | {"uid": f"{i}:k={k}", "k": int(k), "prefix_tokens": n, "request": rec["prompt"],
                                     "prompt": text, "context": text})
        elif mode == "multi_turn":
            conversation = list(rec["conversation"])
            if system and conversation[0]["role"] != "system":
                conversation = system + conversation
            text = chat_prompt(tokenizer, conversation)
            items.append(base | {"uid": str(i), "request": rec["objective"], "prompt": text, "context": text,
                                 "conversation": conversation})
        elif mode == "autodan":
            text = chat_prompt(tokenizer, system + [{"role": "user", "content": rec["prompt"]}])
            items.append(base | {"uid": str(i), "behavior": rec["behavior"], "request": rec["prompt"], "prompt": text,
                                 "context": text})
        elif mode == "overrefusal":
            text = chat_prompt(tokenizer, system + [{"role": "user", "content": rec["prompt"]}])
            items.append(base | {"uid": str(i), "id": rec["id"], "type": rec["type"], "label": rec["label"],
                                 "request": rec["prompt"], "prompt": text, "context": text})
        else:
            raise UserError(f"unknown jailbreak mode {mode!r}: expected one of {', '.join(MODES)}")
    return items


# --------------------------------------------------------------------------- scoring


def is_success(record: dict, criterion: str) -> bool | None:
    """Attack success of one judged record: a leak (criterion 'leak') or any non-refusal ('compliance');
    None for over-refusal rows (not an attack)."""
    if record["mode"] == "overrefusal":
        return None
    return record["verdict"] == "leak" if criterion == "leak" else record["verdict"] != "refusal"


def _rates(rows: list[dict], with_asr: bool) -> dict:
    n = len(rows)
    out = {"n": n}
    for verdict in ("refusal", "compliance", "leak"):
        out[f"{verdict}_rate"] = sum(r["verdict"] == verdict for r in rows) / n if n else None
    if with_asr:
        out["asr"] = sum(bool(r["success"]) for r in rows) / n if n else None
    return out


def summarize(records: list[dict]) -> tuple[dict[str, dict], float | None]:
    """(groups, score). Groups: the mode; prefill per k (`prefill/k=5`); over-refusal per label
    (`overrefusal/safe`). Score: the mode's ASR, or for over-refusal the refusal rate on safe rows (all rows when
    none is labelled safe)."""
    groups: dict[str, dict] = {}
    for mode in MODES:
        rows = [r for r in records if r["mode"] == mode]
        if not rows:
            continue
        attack = mode in ATTACK_MODES
        groups[mode] = _rates(rows, attack)
        if mode == "prefill":
            for k in sorted({r["k"] for r in rows}):
                groups[f"prefill/k={k}"] = _rates([r for r in rows if r["k"] == k], True)
        if mode == "overrefusal":
            for label in sorted({r["label"] for r in rows}):
                groups[f"overrefusal/{label}"] = _rates([r for r in rows if r["label"] == label], False)
    score = None
    if "overrefusal" in groups:
        score = groups.get("overrefusal/safe", groups["overrefusal"])["refusal_rate"]
    else:
        score = next((g["asr"] for m, g in groups.items() if m in ATTACK_MODES), None)
    return groups, score


# --------------------------------------------------------------------------- Lightning


class JailbreakData(LightningDataModule):
    """Items of one jailbreak file, sorted by prompt length so each batch pads little; one batch = one generate call."""

    def __init__(
        self,
        path: str,
        mode: Mode | None = None,
        tokenizer: str = "smollm2",
        prefill_tokens: list[int] = [5, 10, 15, 20],
        system_prompt: str | None = None,
        limit: int | None = None,
        batch_size: int = 16,
    ):
        """
        Args:
            path: the jailbreak file (prefill .jsonl, multi-turn .json, AutoDAN .json, over-refusal .csv).
            mode: which kind it is; default: inferred from the file (prism.data.formats.jailbreak_kind).
            tokenizer: the attacked model (linked from model.path): prompts use its chat template.
            prefill_tokens: the k values of the prefill attack (number of answer tokens forced after the header).
            system_prompt: an optional system turn before every conversation.
            limit: use only the first N records of the file (before expanding prefill over k).
            batch_size: prompts per generate call.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.items = None

    def validate(self):
        """Read the attack file and build the prompts (no model weights): the CLI calls this before any model loads."""
        self.setup()

    def setup(self, stage=None):
        if self.items is not None:
            return
        from prism.data.formats import JAILBREAK_LOADERS, jailbreak_kind

        h = self.hparams
        self.mode = h.mode or jailbreak_kind(h.path)
        if self.mode not in MODES:
            raise UserError(f"data.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "prefill" and not h.prefill_tokens:
            raise UserError("data.prefill_tokens is empty: give at least one k")
        records = JAILBREAK_LOADERS[self.mode](h.path)[: h.limit]
        self.tokenizer = load_tokenizer(h.tokenizer)
        items = build_items(self.mode, records, self.tokenizer, h.prefill_tokens, h.system_prompt)
        lengths = [len(_ids(self.tokenizer, it["prompt"])) for it in items]
        self.items = [items[i] for i in sorted(range(len(items)), key=lambda i: -lengths[i])]
        log.info("jailbreak %s: %d records, %d prompts from %s", self.mode, len(records), len(self.items), h.path)

    def test_dataloader(self):
        return DataLoader(self.items, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=list)


class JailbreakModule(LightningModule):
    def __init__(
        self,
        path: str = "smollm2",
        max_new_tokens: int = 64,
        replay: Literal["recorded", "generate"] = "recorded",
        judge_path: str | None = None,
        judge_batch_size: int = 8,
        facts: str | None = None,
        success: Literal["auto", "compliance", "leak"] = "auto",
        extra_refusal_phrases: list[str] = [],
        max_prompt_tokens: int | None = None,
        name: str | None = None,
        output_dir: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        """
        Args:
            path: the attacked model (local HF directory, or 'smollm2').
            max_new_tokens: greedy tokens generated per answer (and per replayed turn).
            replay: multi-turn only: feed the recorded assistant turns ("recorded") or let the model answer every
                earlier user turn itself ("generate").
            judge_path: a local HF model directory used as the judge (asked yes/no); default: the refusal-phrase judge.
            facts: forget-set facts for the leak check: a MUSE directory (its KnowMem forget answers), a .json list
                or a .txt file (one per line).
            success: what counts as attack success: a leak, any non-refusal, or auto (leak when facts are given).
            extra_refusal_phrases: phrases added to the default judge's list.
            max_prompt_tokens: truncate prompts from the left to this many tokens.
            name: row name in reports (default: the model directory's name).
            output_dir: where jailbreak.json / jailbreak.jsonl go (default: the run's log dir).
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = load_model(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(path)
        self.records: list[dict] = []
        self.summary = None

    def _generate(self, prompts: list[str]) -> list[str]:
        h = self.hparams
        return generate(self.model, self.tokenizer, prompts, h.max_new_tokens, batch_size=max(1, len(prompts)),
                        stop=None, max_prompt_tokens=h.max_prompt_tokens)

    def on_test_start(self):
        self.records = []

    def test_step(self, batch, batch_idx):
        if self.hparams.replay == "generate" and batch and batch[0]["mode"] == "multi_turn":
            finals = replay_conversations([it["conversation"] for it in batch],
                                          lambda msgs: self._generate([chat_prompt(self.tokenizer, m) for m in msgs]))
            batch = [it | {"conversation": msgs, "prompt": chat_prompt(self.tokenizer, msgs),
                           "context": "\n".join(m["content"] for m in msgs if m["role"] != "assistant")}
                     for it, msgs in zip(batch, finals)]
        responses = self._generate([it["prompt"] for it in batch])
        self.records += [it | {"response": r} for it, r in zip(batch, responses)]

    def _judge(self):
        from prism.evaluation.judge import HFJudge, RefusalJudge, load_facts

        h = self.hparams
        facts = load_facts(h.facts) if h.facts else []
        if h.judge_path:
            return HFJudge(h.judge_path, facts, batch_size=h.judge_batch_size, device=self.device,
                           trust_remote_code=h.trust_remote_code)
        return RefusalJudge(facts, extra_phrases=h.extra_refusal_phrases)

    def on_test_epoch_end(self):
        h = self.hparams
        judge = self._judge()
        criterion = h.success if h.success != "auto" else ("leak" if judge.facts else "compliance")
        verdicts = judge([r["request"] for r in self.records], [r["response"] for r in self.records],
                         [r["context"] for r in self.records])
        records = [r | v | {"judge": judge.name} for r, v in zip(self.records, verdicts)]
        for r in records:
            r["success"] = is_success(r, criterion)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        unique = {r["uid"]: r for r in records}  # DistributedSampler pads with repeats
        records = sorted(unique.values(), key=lambda r: (r["index"], r.get("k", 0)))
        groups, score = summarize(records)
        data = self.trainer.datamodule
        self.summary = {
            "model": str(h.path), "name": h.name or Path(str(h.path)).name, "data": str(data.hparams.path),
            "mode": data.mode, "judge": judge.name, "success": criterion, "score": score,
            "max_new_tokens": h.max_new_tokens, "groups": groups,
            "asr": {g: v["asr"] for g, v in groups.items() if "asr" in v},
        }
        if data.mode == "multi_turn":
            self.summary["replay"] = h.replay
        self.judged = records
        if not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            logger.log_metrics({f"jailbreak/{g}/{k}": float(v) for g, vals in groups.items()
                                for k, v in vals.items() if k != "n" and v is not None}, step=0)
        out = Path(h.output_dir or self.trainer.log_dir or ".")
        atomic_write_json(out / "jailbreak.json", self.summary)
        lines = [{k: v for k, v in r.items() if not (k == "context" and v == r["prompt"])} for r in records]
        atomic_write_text(out / "jailbreak.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
        log.info("jailbreak %s of %s -> %s: score %s, %s", data.mode, self.summary["name"], out / "jailbreak.json",
                 score, {g: v.get("asr", v["refusal_rate"]) for g, v in groups.items()})
