"""Tokenised forget / retain data for every stage, from any supported benchmark layout."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler

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
        truncated = empty = 0
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for i, ex in enumerate(examples):
            prompt_ids = tokenizer(ex.prompt, add_special_tokens=False).input_ids if ex.prompt else []
            target_ids = tokenizer(ex.target, add_special_tokens=False).input_ids + eos
            ids = prompt_ids + target_ids
            labels = [-100] * len(prompt_ids) + target_ids
            if len(ids) > max_length:
                truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
                empty += all(x == -100 for x in labels)
            self.items.append({"input_ids": ids, "labels": labels, "index": i})
        if truncated:
            log.warning("%s: %d of %d texts are longer than max_length=%d tokens and were truncated",
                        name, truncated, len(examples), max_length)
        if empty:
            log.warning("%s: %d texts keep no answer token after truncation to max_length=%d (the prompt fills it): "
                        "they carry no loss; raise max_length", name, empty, max_length)
        self.truncated, self.without_target = truncated, empty

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


class EpochSampler(DistributedSampler):
    """The order of one pass over a dataset, replayable: a permutation seeded by (seed, epoch, pass within the
    epoch), sharded over data-parallel ranks like DistributedSampler (so Lightning does not wrap it).

    `resume_at` makes the next pass start after the first `start` indices of its shard, so a run resumed mid-epoch
    sees exactly the batches an uninterrupted run would (Lightning restores the loop counters, not the data order).
    """

    def __init__(self, dataset, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.cycle = 0  # passes started in this epoch (the shorter loader of max_size_cycle runs several)
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # Lightning calls it again for the epoch a resumed run is already in
            self.epoch, self.cycle = epoch, 0

    def resume_at(self, epoch: int, cycle: int, start: int) -> None:
        self.epoch, self.cycle, self._start = epoch, cycle, start

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.cycle)) % (2**63))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.total_size > n:  # pad so every rank gets the same number of items
            order += (order * math.ceil(self.total_size / n))[: self.total_size - n]
        order = order[self.rank : self.total_size : self.num_replicas]
        start, self._start = self._start, 0
        self.cycle += 1
        return iter(order[start:])


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning saves in every checkpoint and restores on resume (the `state_dict` /
    `load_state_dict` interface of Lightning's fit loop).

    The position is (epoch, batches the training loop has taken in it), read from the trainer when the checkpoint is
    written: the loader's own count would be one ahead, as Lightning fetches a batch in advance. From it the loader
    finds the pass and the offset of the next batch (a shorter loader cycles under max_size_cycle).
    """

    def __init__(self, dataset, batch_size: int, sampler: EpochSampler, collate_fn, num_workers: int = 0,
                 position=None):
        # A private generator for worker seeds: iterating the data never draws from the global RNG, so a resumed run's
        # global random stream (restored from the checkpoint) stays aligned with an uninterrupted one.
        generator = torch.Generator().manual_seed(sampler.seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                         num_workers=num_workers, generator=generator)
        self.position = position

    def state_dict(self) -> dict:
        where = self.position() if self.position is not None else None
        return {} if where is None else {"epoch": where[0], "batches": where[1]}

    def load_state_dict(self, state: dict) -> None:
        if "batches" not in state:
            return
        cycle, offset = divmod(int(state["batches"]), len(self))
        self.sampler.resume_at(int(state["epoch"]), cycle, offset * self.batch_size)


def run_seed() -> int:
    """The run's seed (Lightning's seed_everything exports it), so the data order follows the configured seed."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def loop_position(datamodule: LightningDataModule) -> tuple[int, int] | None:
    """(epoch, batches the fit loop has taken in it); an epoch's end counts as the next epoch's start."""
    trainer = datamodule.trainer
    if trainer is None:
        return None
    epoch = trainer.current_epoch
    taken = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    if taken >= trainer.num_training_batches:
        epoch, taken = epoch + 1, 0
    return epoch, taken


def resumable_loader(datamodule: LightningDataModule, dataset, batch_size: int, shuffle: bool, seed: int,
                     collate_fn=None, num_workers: int = 0) -> ResumableLoader:
    """A training loader of `datamodule` whose order is seeded per epoch, sharded over the strategy's data-parallel
    ranks, and whose position goes into every checkpoint (exact resume)."""
    trainer = datamodule.trainer
    shard = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
    shard = shard or {"num_replicas": 1, "rank": 0}
    sampler = EpochSampler(dataset, shuffle, seed, num_replicas=shard["num_replicas"], rank=shard["rank"])
    return ResumableLoader(dataset, batch_size, sampler, collate_fn=collate_fn, num_workers=num_workers,
                           position=lambda: loop_position(datamodule))


class BenchmarkData(LightningDataModule):
    """Forget and retain sets of a local benchmark.

    pairing="joint": one loader over forget ∪ retain (fine-tuning the target, relearning uses forget only via
    `retain_sources: []`). pairing="paired": each step yields {"forget": batch, "retain": batch}
    (CombinedLoader, max_size_cycle), the unlearning and probe stages' input.
    Shuffling is seeded per epoch and the position is checkpointed, so `--ckpt_path last` resumes on the same batches.
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
        seed: int | None = None,
    ):
        """
        Args:
            seed: seed of the shuffling order (default: the run's seed_everything).
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # the config file records them; `path` would clash with model.path
        self.tokenizer = None

    def validate(self):
        """Read, check and tokenise the data (no model weights): the CLI calls this before any model loads, so a bad
        file fails in seconds with a message naming it. Idempotent; `setup` calls it too."""
        if self.tokenizer is not None:
            return
        from prism.models.loading import load_tokenizer

        h = self.hparams
        for key in ("max_length", "batch_size", "retain_batch_size", "forget_limit"):
            value = h[key]
            if value is not None and value < 1:
                raise UserError(f"data.{key} must be at least 1, got {value}")
        if not h.forget_sources:
            raise UserError("data.forget_sources is empty: give at least one of raw, qa")
        self.forget_examples = benchmark_examples(h.format, h.path, "forget", h.forget_sources)[: h.forget_limit]
        self.retain_examples = (
            benchmark_examples(h.format, h.path, "retain", h.retain_sources) if h.retain_sources else []
        )
        overlap = len(set(self.forget_examples) & set(self.retain_examples))
        if overlap:
            log.warning("%s: %d examples are in both the forget and the retain set", h.path, overlap)
        tokenizer = load_tokenizer(h.tokenizer, padding_side="right")
        self.forget = TokenizedExamples(self.forget_examples, tokenizer, h.max_length, f"{h.path} forget")
        self.retain = TokenizedExamples(self.retain_examples, tokenizer, h.max_length, f"{h.path} retain")
        self.tokenizer = tokenizer

    def setup(self, stage: str | None = None):
        self.validate()

    def _loader(self, dataset, batch_size: int, shuffle: bool, seed_offset: int = 0) -> ResumableLoader:
        pad = self.tokenizer.pad_token_id
        seed = (self.hparams.seed if self.hparams.seed is not None else run_seed()) + seed_offset
        return resumable_loader(self, dataset, batch_size, shuffle, seed, lambda items: collate(items, pad),
                                self.hparams.num_workers)

    def val_dataloader(self):
        """One item per rank: stages that validate (unlearn with `validation`) run the benchmark evaluator, which
        shards the benchmark over ranks itself and gathers the records."""
        return DataLoader([0], batch_size=1)

    def train_dataloader(self):
        h = self.hparams
        if h.pairing == "joint":
            joint = torch.utils.data.ConcatDataset([self.forget, self.retain])
            return self._loader(joint, h.batch_size, h.shuffle)
        loaders = {"forget": self._loader(self.forget, h.batch_size, h.shuffle)}
        if len(self.retain):
            loaders["retain"] = self._loader(self.retain, h.retain_batch_size or h.batch_size, h.shuffle, seed_offset=1)
        return CombinedLoader(loaders, mode="max_size_cycle")
