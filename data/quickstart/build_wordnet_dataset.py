"""Build the quickstart instruction set from WordNet 3.0 (offline, deterministic).

Reads the WordNet database files directly (``data.*``, ``index.*``, ``cntlist.rev`` as installed by
Debian's ``wordnet-base`` in /usr/share/wordnet) and a list of common English words (Debian's
``wamerican``: /usr/share/dict/words), and writes Dolly-style JSONL records
(``id``, ``instruction``, ``context``, ``response``, ``category``) of three kinds:

- ``Define the word 'X'.``             → the gloss of X's most frequent sense;
- ``Use the word 'X' in a sentence.``  → a WordNet example sentence that contains X;
- ``Give a synonym of 'X'.``           → another word of X's most frequent sense that has one.

Words are single lower-case words of at least 3 letters that appear in the word list, taken from
the most frequent down (frequency = WordNet's SemCor tag counts, ``cntlist.rev``), until each kind
reaches its quota. The held-out split is by word: words are ordered by a sha256 of the word and the
first ones go to eval until it holds ``--eval-size`` records, so no held-out word is seen in
training under any instruction. Same inputs → byte-identical outputs.

Usage (from the repository root)::

    apt-get install -y wordnet-base wamerican
    python data/quickstart/build_wordnet_dataset.py            # writes data/quickstart/{train,eval}.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
# cntlist.rev sense keys encode the part of speech as ss_type 1..5 (5 = adjective satellite).
SS_TYPE_POS = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}
WORD_RE = re.compile(r"^[a-z]{3,}$")
MAX_RESPONSE_CHARS = 120  # with SmolLM2's chat template nearly every record fits in 64 tokens


@dataclass
class Synset:
    words: list[str]
    definition: str
    examples: list[str]


@dataclass
class Lemma:
    word: str
    frequency: int = 0
    pos_frequency: dict[str, int] = field(default_factory=dict)
    senses: dict[str, list[str]] = field(default_factory=dict)  # pos -> synset offsets, most frequent first


def parse_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a WordNet gloss into (definition, quoted example sentences)."""
    examples = [e.strip() for e in re.findall(r'"([^"]+)"', gloss) if e.strip()]
    definition = re.split(r';?\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()
    return definition, examples


def read_synsets(wordnet_dir: Path, pos: str) -> dict[str, Synset]:
    """offset -> Synset for one part of speech (``data.<pos>``; licence header lines skipped)."""
    synsets = {}
    with (wordnet_dir / f"data.{POS_FILES[pos]}").open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.startswith("  "):
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 4:
                raise ValueError(f"{fh.name}:{lineno}: not a WordNet data line")
            count = int(fields[3], 16)
            words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * count:2]]
            definition, examples = parse_gloss(gloss.strip())
            synsets[fields[0]] = Synset(words, definition, examples)
    return synsets


def read_lemmas(wordnet_dir: Path, common: set[str]) -> dict[str, Lemma]:
    """Common single-word lemmas with their senses (index files) and frequencies (cntlist.rev)."""
    lemmas: dict[str, Lemma] = {}
    for pos, name in POS_FILES.items():
        with (wordnet_dir / f"index.{name}").open(encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("  "):
                    continue
                fields = line.split()
                word, synset_cnt = fields[0], int(fields[2])
                if WORD_RE.match(word) and word in common:
                    lemma = lemmas.setdefault(word, Lemma(word))
                    lemma.senses[pos] = fields[-synset_cnt:]
    with (wordnet_dir / "cntlist.rev").open(encoding="utf-8") as fh:
        for line in fh:
            key, _sense_number, count = line.split()
            word, _, rest = key.partition("%")
            lemma = lemmas.get(word)
            if lemma is not None:
                pos = SS_TYPE_POS[rest[0]]
                lemma.frequency += int(count)
                lemma.pos_frequency[pos] = lemma.pos_frequency.get(pos, 0) + int(count)
    return lemmas


def ordered_senses(lemma: Lemma) -> list[tuple[str, str]]:
    """(pos, offset) pairs: parts of speech by tag count (ties n, v, a, r), senses by frequency."""
    order = sorted(lemma.senses, key=lambda p: (-lemma.pos_frequency.get(p, 0), "nvar".index(p)))
    return [(pos, off) for pos in order for off in lemma.senses[pos]]


def word_forms(word: str) -> str:
    """A regex matching the word and its regular inflections as a whole word (walk, walks, walked, walking)."""
    stems = [re.escape(word)]
    if word.endswith("e"):
        stems.append(re.escape(word[:-1]) + "(?=ing)")
    if word.endswith("y"):
        stems.append(re.escape(word[:-1]) + "(?=ie)")
    return rf"\b(?:{'|'.join(stems)})(?:s|es|ed|d|ing|er|ers|est|ies|ied)?\b"


def as_sentence(text: str) -> str:
    """Capitalise the first letter and end with a full stop unless it already ends a sentence."""
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def make_records(lemma: Lemma, synsets: dict[str, dict[str, Synset]], common: set[str]) -> dict[str, dict]:
    """kind -> record for the kinds this word supports (define / sentence / synonym)."""
    word, senses = lemma.word, ordered_senses(lemma)
    out: dict[str, dict] = {}
    first = synsets[senses[0][0]][senses[0][1]]
    if first.definition and len(first.definition) <= MAX_RESPONSE_CHARS:
        out["define"] = (f"Define the word '{word}'.", as_sentence(first.definition))
    uses = re.compile(word_forms(word), re.IGNORECASE)
    example = next((e for pos, off in senses for e in synsets[pos][off].examples
                    if uses.search(e) and len(e) <= MAX_RESPONSE_CHARS), None)
    if example is not None:
        out["sentence"] = (f"Use the word '{word}' in a sentence.", as_sentence(example))
    for pos, off in senses[:3]:  # only the most frequent senses give natural synonyms
        others = [w for w in synsets[pos][off].words
                  if WORD_RE.match(w) and w in common and word not in w and w not in word]
        if others:
            out["synonym"] = (f"Give a synonym of '{word}'.", others[0])
            break
    return {kind: {"id": f"wn-{kind}-{word}", "instruction": ins, "context": "", "response": resp,
                   "category": f"wordnet_{kind}"} for kind, (ins, resp) in out.items()}


def word_hash(word: str) -> str:
    return hashlib.sha256(f"wordnet-quickstart:{word}".encode()).hexdigest()


def build(wordnet_dir: Path, words_file: Path, quotas: dict[str, int], eval_size: int) -> tuple[list[dict], list[dict]]:
    """(train records, eval records), each sorted by id."""
    common = {w.strip() for w in words_file.read_text(encoding="utf-8").splitlines()}
    synsets = {pos: read_synsets(wordnet_dir, pos) for pos in POS_FILES}
    lemmas = read_lemmas(wordnet_dir, common)
    by_word: dict[str, list[dict]] = defaultdict(list)
    taken = dict.fromkeys(quotas, 0)
    for lemma in sorted(lemmas.values(), key=lambda l: (-l.frequency, l.word)):
        for kind, record in make_records(lemma, synsets, common).items():
            if taken[kind] < quotas[kind]:
                taken[kind] += 1
                by_word[lemma.word].append(record)
        if taken == quotas:
            break
    train: list[dict] = []
    held: list[dict] = []
    for word in sorted(by_word, key=word_hash):
        (held if len(held) < eval_size else train).extend(by_word[word])
    return sorted(train, key=lambda r: r["id"]), sorted(held, key=lambda r: r["id"])


def debian_version(package: str) -> str:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_jsonl(path: Path, records: list[dict]) -> str:
    """Write atomically (temp file + rename); return the sha256 of the bytes."""
    blob = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)
    return hashlib.sha256(blob).hexdigest()


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--words", type=Path, default=Path("/usr/share/dict/words"))
    ap.add_argument("--out", type=Path, default=here)
    ap.add_argument("--define", type=int, default=3000, help="number of 'Define the word' records")
    ap.add_argument("--sentence", type=int, default=1700, help="number of 'Use the word' records")
    ap.add_argument("--synonym", type=int, default=1700, help="number of 'Give a synonym' records")
    ap.add_argument("--eval-size", type=int, default=200, help="held-out records (whole words are held out)")
    args = ap.parse_args()
    for path in (args.wordnet_dir / "data.noun", args.words):
        if not path.is_file():
            raise SystemExit(f"{path} not found: install it with `apt-get install -y wordnet-base wamerican` "
                             "or pass --wordnet-dir / --words")
    quotas = {"define": args.define, "sentence": args.sentence, "synonym": args.synonym}
    train, held = build(args.wordnet_dir, args.words, quotas, args.eval_size)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {
        "source": {"wordnet-base": debian_version("wordnet-base"), "wamerican": debian_version("wamerican")},
        "quotas": quotas, "eval_size": args.eval_size,
        "counts": {split: {kind: sum(r["category"] == f"wordnet_{kind}" for r in rows) for kind in quotas}
                   for split, rows in (("train", train), ("eval", held))},
        "sha256": {"train.jsonl": write_jsonl(args.out / "train.jsonl", train),
                   "eval.jsonl": write_jsonl(args.out / "eval.jsonl", held)},
    }
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
