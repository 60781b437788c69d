"""Tokenised forget / retain data for every stage, from any supported benchmark layout."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from prism.errors import UserError

log = logging.getLogger(__name__)

Source = Literal["raw", "qa"]


@dataclass(frozen=True)
class Example:
    """A training text. `prompt` (may be empty) is context that carries no loss, `target` is learned or unlearned."""

    prompt: str
    target: str


def qa_example(question: str, answer: str, icl: list[dict] = ()) -> Example:
    """The KnowMem evaluation prompt (ICL pairs, then the question), so learned or unlearned knowledge is
    measured in the form it was trained in."""
    from prism.evaluation.metrics import knowmem_prompt

    return Example(knowmem_prompt(icl, question), answer)


def benchmark_examples(fmt: str, path: str | Path, role: Literal["forget", "retain"], sources: list[str]) -> list[Example]:
    """The forget or retain set of a benchmark as examples. Loading validates the files (see prism.data.formats)."""
    from prism.data import formats

    out: list[Example] = []
    if fmt == "muse":
        bench = formats.load_muse(path)
        if "raw" in sources:
            out += [Example("", t) for t in bench.raw["forget" if role == "forget" else "retain1"]]
        if "qa" in sources:
            icl = bench.knowmem.get(f"{role}_qa_icl", [])
            out += [qa_example(r["question"], r["answer"], icl) for r in bench.knowmem[f"{role}_qa"]]
    elif fmt == "tofu":
        splits = formats.load_tofu(path)
        names = sorted(s for s in splits if s.startswith(role))
        out += [qa_example(r["question"], r["answer"]) for r in splits[names[0]]]
    elif fmt == "wmdp":
        root = Path(path)
        corpus = sorted(root.glob(f"{role}*corpus*.jsonl")) or sorted(root.glob(f"*{role}*.jsonl"))
        if not corpus:
            raise UserError(f"{root}: no {role} corpus (expected a file named '{role}*corpus*.jsonl')")
        out += [Example("", t) for t in formats.load_corpus(corpus[0])]
    else:
        raise UserError(f"unknown data format '{fmt}' (expected muse, tofu or wmdp)")
    if not out:
        raise UserError(f"{path}: the {role} set is empty for sources {sources}")
    return out


class TokenizedExamples(Dataset):
    def __init__(self, examples: list[Example], tokenizer, max_length: int, name: str):
        self.items = []
        truncated = 0
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for i, ex in enumerate(examples):
            prompt_ids = tokenizer(ex.prompt, add_special_tokens=False).input_ids if ex.prompt else []
            target_ids = tokenizer(ex.target, add_special_tokens=False).input_ids + eos
            ids = prompt_ids + target_ids
            labels = [-100] * len(prompt_ids) + target_ids
            if len(ids) > max_length:
                truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            self.items.append({"input_ids": ids, "labels": labels, "index": i})
        if truncated:
            log.warning("%s: %d of %d texts are longer than max_length=%d tokens and were truncated",
                        name, truncated, len(examples), max_length)
        self.truncated = truncated

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding; padded positions get attention 0 and label -100."""
    width = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        ids[row, :n] = torch.tensor(x["input_ids"])
        labels[row, :n] = torch.tensor(x["labels"])
        mask[row, :n] = 1
    index = torch.tensor([x["index"] for x in items], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": index}


class BenchmarkData(LightningDataModule):
    """Forget and retain sets of a local benchmark.

    pairing="joint": one loader over forget ∪ retain (fine-tuning the target, relearning uses forget only via
    `retain_sources: []`). pairing="paired": each step yields {"forget": batch, "retain": batch}
    (CombinedLoader, max_size_cycle), the unlearning and probe stages' input.
    """

    def __init__(
        self,
        path: str,
        tokenizer: str = "smollm2",
        format: Literal["muse", "tofu", "wmdp"] = "muse",
        pairing: Literal["joint", "paired"] = "paired",
        forget_sources: list[Source] = ["raw", "qa"],
        retain_sources: list[Source] = ["raw", "qa"],
        forget_limit: int | None = None,
        max_length: int = 128,
        batch_size: int = 8,
        retain_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the config file records them; `path` would clash with model.path
        self.tokenizer = None

    def setup(self, stage: str | None = None):
        if self.tokenizer is not None:
            return
        from prism.models.loading import load_tokenizer

        h = self.hparams
        self.forget_examples = benchmark_examples(h.format, h.path, "forget", h.forget_sources)[: h.forget_limit]
        self.retain_examples = (
            benchmark_examples(h.format, h.path, "retain", h.retain_sources) if h.retain_sources else []
        )
        overlap = len(set(self.forget_examples) & set(self.retain_examples))
        if overlap:
            log.warning("%s: %d examples are in both the forget and the retain set", h.path, overlap)
        self.tokenizer = load_tokenizer(h.tokenizer, padding_side="right")
        self.forget = TokenizedExamples(self.forget_examples, self.tokenizer, h.max_length, f"{h.path} forget")
        self.retain = TokenizedExamples(self.retain_examples, self.tokenizer, h.max_length, f"{h.path} retain")

    def _loader(self, dataset, batch_size, shuffle):
        pad = self.tokenizer.pad_token_id
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers,
                          collate_fn=lambda items: collate(items, pad))

    def train_dataloader(self):
        h = self.hparams
        if h.pairing == "joint":
            joint = torch.utils.data.ConcatDataset([self.forget, self.retain])
            return self._loader(joint, h.batch_size, h.shuffle)
        loaders = {"forget": self._loader(self.forget, h.batch_size, h.shuffle)}
        if len(self.retain):
            loaders["retain"] = self._loader(self.retain, h.retain_batch_size or h.batch_size, h.shuffle)
        return CombinedLoader(loaders, mode="max_size_cycle")
