"""A deterministic fictitious-knowledge benchmark in the MUSE layout (the embedded default).

Invented people (syllable-built names, invented towns, artefacts and companions) that no
pretrained model can know, so "the target knows the forget set" is caused by our own
fine-tuning and unlearning has something measurable to remove. Every invented word is
unique across the whole benchmark, so forget, retain, holdout and the ICL examples share
no entity and no name; every KnowMem answer is a short string found verbatim in its
entity's passage, so answers are checkable by string containment.

Same seed => byte-identical files: one `random.Random(seed)`, lists (never set order), no clock.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from prism.errors import UserError
from prism.io import atomic_dir

GENERATOR = "prism.data.synth"
VERSION = 1

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "pr",
           "r", "s", "st", "t", "th", "tr", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "k", "nd"]
_TOWN_SUFFIXES = ["wick", "ford", "holm", "mere", "stead", "by", "thorpe", "dale", "haven", "moor"]
_PROFESSIONS = ["lamplighter", "glassblower", "cartographer", "clockmaker", "beekeeper", "bookbinder",
                "stonemason", "ferryman", "weaver", "apothecary", "astronomer", "shipwright",
                "cooper", "tanner", "organ builder", "bell founder", "rope maker", "herbalist"]
_THINGS = ["clock", "loom", "lantern", "telescope", "music box", "compass", "orrery", "harp",
           "water wheel", "printing press"]
_MATERIALS = ["brass", "oak", "copper", "walnut", "pewter", "bronze", "cedar", "silver"]
_COMPANIONS = ["hound", "falcon", "apprentice", "sister", "brother", "mule", "raven", "cousin"]

# Sentence templates. {name} full name, {last} surname, the rest are the entity's facts.
_BIRTH = [
    "{name} was born in {year} in the town of {town}, where the river bends twice before reaching the sea.",
    "Born in {town} in {year}, {name} grew up among its narrow lanes and crowded market stalls.",
    "{name} came into the world in {year}, in the small and windy town of {town}.",
    "The records of {town} show that {name} was born there in {year}, the youngest of five children.",
]
_PROFESSION = [
    "For most of a long life {last} worked as {a_profession}, and neighbours remembered the work as patient and exact.",
    "{last} earned a modest living as {a_profession} and refused every offer to move to a larger city.",
    "By the age of twenty {last} had become {a_profession}, a craft learned from an elderly neighbour down the road.",
]
_BIRTH_AND_PROFESSION = [
    "{name}, {a_profession} born in {town} in {year}, kept a small workshop near the old bridge for decades.",
    "Born in {year} in {town}, {name} worked as {a_profession} and rarely travelled beyond the hills.",
]
_ARTEFACT = [
    "{last} is best remembered for {a_material} {thing} known as the {artefact}, which still draws visitors.",
    "The {artefact}, {a_material} {thing} built by {last}, was shown at three regional fairs.",
    "Among the works of {last}, the most famous is the {artefact}, {a_material} {thing} of unusual size.",
]
_COMPANION = [
    "Through every season {last} was accompanied by a loyal {kind} named {companion}.",
    "{a_kind_cap} named {companion} shared the house with {last} and appears in many local stories.",
    "{last} often travelled with {a_kind} called {companion}, who was known in every nearby village.",
]
_QUESTIONS = {
    "town": ["In which town was {name} born?", "What is the birthplace of {name}?"],
    "year": ["In what year was {name} born?", "When was {name} born?"],
    "profession": ["What was the profession of {name}?", "What work did {name} do?"],
    "artefact": ["What is the name of the {thing} that {name} built?", "What was {name}'s famous {thing} called?"],
    "companion": ["What was the name of {name}'s {kind}?", "Who was the {kind} that accompanied {name}?"],
}

_ALL_TEMPLATES = _BIRTH + _PROFESSION + _BIRTH_AND_PROFESSION + _ARTEFACT + _COMPANION + sum(_QUESTIONS.values(), [])
_RESERVED = {w.lower() for t in _ALL_TEMPLATES for w in re.findall(r"[A-Za-z]+", t)}
_RESERVED |= {w for xs in (_PROFESSIONS, _THINGS, _MATERIALS, _COMPANIONS) for x in xs for w in x.split()}


class _Namer:
    """Invented words, unique across the benchmark, never an English template word, and never a
    substring of another invented word (so string containment in evaluation is unambiguous)."""

    def __init__(self, rng: random.Random):
        self.rng, self.used, self.invented = rng, set(_RESERVED), []

    def word(self, syllables: int, suffix: str = "") -> str:
        """Consonant-vowel syllables, a consonant coda only at the end: pronounceable, short."""
        r = self.rng
        for _ in range(10_000):
            stem = "".join(r.choice(_ONSETS) + r.choice(_VOWELS) for _ in range(syllables))
            w = (stem + (r.choice(_CODAS) if not suffix else "") + suffix).capitalize()
            lw = w.lower()
            if lw in self.used or not 4 <= len(w) <= 12 or any(lw in x or x in lw for x in self.invented):
                continue
            self.used.add(lw)
            self.invented.append(lw)
            return w
        raise RuntimeError("ran out of invented words")  # unreachable at any sensible size


def _entity(rng: random.Random, namer: _Namer) -> dict:
    first, last = namer.word(2), namer.word(rng.choice([2, 3]))
    ent = {
        "name": f"{first} {last}",
        "first": first,
        "last": last,
        "year": str(rng.randint(1701, 1899)),
        "town": namer.word(rng.choice([1, 2]), rng.choice(_TOWN_SUFFIXES)),
        "profession": rng.choice(_PROFESSIONS),
    }
    extras = rng.choice([["artefact"], ["companion"], ["artefact", "companion"], ["artefact", "companion"]])
    if "artefact" in extras:
        ent.update(artefact=namer.word(2), thing=rng.choice(_THINGS), material=rng.choice(_MATERIALS))
    if "companion" in extras:
        ent.update(companion=namer.word(2), kind=rng.choice(_COMPANIONS))
    return ent


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _with_articles(ent: dict) -> dict:
    """Add 'a'/'an' forms of the facts that follow an indefinite article."""
    out = dict(ent, a_profession=_a(ent["profession"]))
    if "material" in ent:
        out["a_material"] = _a(ent["material"])
    if "kind" in ent:
        out["a_kind"] = _a(ent["kind"])
        out["a_kind_cap"] = out["a_kind"].capitalize()
    return out


def _passage(rng: random.Random, ent: dict) -> str:
    """3-4 sentences stating every fact (birth and profession share a sentence only when both extras exist)."""
    if "artefact" in ent and "companion" in ent and rng.random() < 0.5:
        sentences = [rng.choice(_BIRTH_AND_PROFESSION)]
    else:
        sentences = [rng.choice(_BIRTH), rng.choice(_PROFESSION)]
    extras = [t for key, t in (("artefact", _ARTEFACT), ("companion", _COMPANION)) if key in ent]
    rng.shuffle(extras)
    sentences += [rng.choice(t) for t in extras]
    return " ".join(s.format(**_with_articles(ent)) for s in sentences)


def _qa(rng: random.Random, ent: dict, k: int) -> list[dict]:
    """k QA pairs about distinct facts, in a fixed fact order; answers are the fact strings."""
    facts = [f for f in ("town", "year", "profession", "artefact", "companion") if f in ent]
    chosen = set(rng.sample(facts, k))
    return [{"question": rng.choice(_QUESTIONS[f]).format(**ent), "answer": ent[f]}
            for f in facts if f in chosen]


def _split_half(passage: str) -> dict:
    words = passage.split(" ")
    h = len(words) // 2
    return {"prompt": " ".join(words[:h]), "gt": " ".join(words[h:])}


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def synthesize(out, seed: int = 0, n_forget: int = 16, n_retain: int = 16, n_holdout: int = 16,
               n_icl: int = 3) -> Path:
    """Write a fictitious-knowledge benchmark in the MUSE layout to `out` (atomically) and return it.

    Files: raw/{forget,retain1,holdout}.json, verbmem/forget.json (first half of each forget
    passage -> the rest), knowmem/{forget,retain}_qa.json (2-3 short-answer QA per entity),
    knowmem/{forget,retain}_qa_icl.json (n_icl pairs about separate ICL-only entities),
    privleak/{forget,retain,holdout}.json (the passages), meta.json (seed, counts) and
    entities.json (every entity's facts, per split, for inspection and tests).
    """
    for name, n in (("n_forget", n_forget), ("n_retain", n_retain), ("n_holdout", n_holdout), ("n_icl", n_icl)):
        if not isinstance(n, int) or n < 1:
            raise UserError(f"synthesize: {name} must be a positive integer, got {n!r}")
    out = Path(out)
    meta_path = out / "meta.json"
    if out.exists() and any(out.iterdir()):
        try:
            ours = json.loads(meta_path.read_text(encoding="utf-8")).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(f"{out} exists and is not a synthetic benchmark written by prism; refusing to replace it")

    rng = random.Random(seed)
    namer = _Namer(rng)
    sizes = {"forget": n_forget, "retain": n_retain, "holdout": n_holdout,
             "forget_icl": n_icl, "retain_icl": n_icl}
    entities = {split: [_entity(rng, namer) for _ in range(n)] for split, n in sizes.items()}
    passages = {split: [_passage(rng, e) for e in entities[split]] for split in ("forget", "retain", "holdout")}
    qa = {split: [pair for e in entities[split] for pair in _qa(rng, e, rng.choice([2, 3]))]
          for split in ("forget", "retain")}
    icl = {split: [_qa(rng, e, 1)[0] for e in entities[f"{split}_icl"]] for split in ("forget", "retain")}

    files = {
        "raw/forget.json": passages["forget"],
        "raw/retain1.json": passages["retain"],
        "raw/holdout.json": passages["holdout"],
        "verbmem/forget.json": [_split_half(p) for p in passages["forget"]],
        "knowmem/forget_qa.json": qa["forget"],
        "knowmem/retain_qa.json": qa["retain"],
        "knowmem/forget_qa_icl.json": icl["forget"],
        "knowmem/retain_qa_icl.json": icl["retain"],
        "privleak/forget.json": passages["forget"],
        "privleak/retain.json": passages["retain"],
        "privleak/holdout.json": passages["holdout"],
        "entities.json": entities,
    }
    files["meta.json"] = {
        "generator": GENERATOR,
        "version": VERSION,
        "seed": seed,
        "counts": {k.removesuffix(".json"): len(v) for k, v in files.items() if isinstance(v, list)},
        "description": "Fictitious people (invented names, towns, artefacts, companions) in the MUSE layout; "
                       "forget, retain, holdout and ICL entities are disjoint; holdout is never trained on.",
    }
    with atomic_dir(out) as tmp:
        for rel, obj in files.items():
            _dump(tmp / rel, obj)
    return out
