"""The committed WordNet quickstart set and its builder (on a miniature WordNet; no wordnet-base needed)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pocl_core.data import load_samples

QUICKSTART = Path(__file__).resolve().parents[2] / "data" / "quickstart"


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_wordnet_dataset", QUICKSTART / "build_wordnet_dataset.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_committed_files_load_and_hold_out_whole_words():
    train, dropped_train = load_samples(QUICKSTART / "train.jsonl")
    held, dropped_held = load_samples(QUICKSTART / "eval.jsonl")
    assert dropped_train == dropped_held == 0
    assert 5000 <= len(train) <= 8000 and 150 <= len(held) <= 300
    words = lambda samples: {s.sample_id.split("-", 2)[2] for s in samples}  # noqa: E731
    assert not words(train) & words(held)
    info = json.loads((QUICKSTART / "build_info.json").read_text())
    assert sum(info["counts"]["train"].values()) == len(train) and sum(info["counts"]["eval"].values()) == len(held)
    assert (QUICKSTART / "LICENSE.wordnet").read_text().count("WordNet 3.0 Copyright 2006 by Princeton University") == 1


def test_gloss_and_word_forms(builder):
    assert builder.parse_gloss('move fast; go quickly; "he ran home"; "she runs daily"') == (
        "move fast; go quickly", ["he ran home", "she runs daily"])
    assert builder.parse_gloss("a domestic animal") == ("a domestic animal", [])
    import re
    forms = re.compile(builder.word_forms("bake"), re.IGNORECASE)
    assert all(forms.search(t) for t in ("Bake it", "she bakes", "baked bread", "baking now"))
    assert not forms.search("a bakery")
    assert re.search(builder.word_forms("carry"), "he carried it") and not re.search(builder.word_forms("car"), "a cart")


def write_mini_wordnet(root: Path) -> Path:
    wn = root / "wordnet"
    wn.mkdir()
    header = "  1 This software and database is being provided to you\n"
    (wn / "data.noun").write_text(header + (
        "00000001 05 n 02 dog 0 domestic_dog 0 000 | a domesticated canid; \"the dog barked all night\"  \n"
        "00000002 05 n 02 cat 0 true_cat 0 000 | a feline mammal; \"the cat sat\"  \n"
        "00000003 05 n 02 house 0 home 0 000 | a dwelling; \"they built a house\"  \n"))
    (wn / "data.verb").write_text(header + "00000004 29 v 02 run 0 sprint 0 000 00 | move fast; \"he ran home\"  \n")
    for name in ("adj", "adv"):
        (wn / f"data.{name}").write_text(header)
        (wn / f"index.{name}").write_text(header)
    (wn / "index.noun").write_text(header + "cat n 1 0 1 1 00000002  \ndog n 1 0 1 1 00000001  \n"
                                   "house n 1 0 1 1 00000003  \n")
    (wn / "index.verb").write_text(header + "run v 1 0 1 1 00000004  \n")
    (wn / "cntlist.rev").write_text("dog%1:05:00:: 1 40\ncat%1:05:00:: 1 30\nhouse%1:05:00:: 1 20\nrun%2:29:00:: 1 10\n")
    (root / "words").write_text("cat\ndog\nhome\nhouse\nrun\nsprint\n")
    return wn


def test_builder_is_deterministic_and_splits_by_word(builder, tmp_path):
    wn = write_mini_wordnet(tmp_path)
    quotas = {"define": 3, "sentence": 10, "synonym": 10}
    train, held = builder.build(wn, tmp_path / "words", quotas, eval_size=1)
    assert (train, held) == builder.build(wn, tmp_path / "words", quotas, eval_size=1)
    records = {r["id"]: r for r in train + held}
    assert records["wn-define-dog"]["response"] == "A domesticated canid."
    assert records["wn-sentence-dog"]["response"] == "The dog barked all night."
    assert "wn-sentence-run" not in records  # 'ran' is irregular: not recognised as a use of 'run'
    assert records["wn-synonym-run"]["response"] == "sprint"
    assert records["wn-synonym-house"]["response"] == "home"
    assert "wn-synonym-dog" not in records  # 'domestic dog' is not a single common word
    assert "wn-define-run" not in records  # the define quota (3) went to the more frequent words
    held_words = {r["id"].split("-", 2)[2] for r in held}
    assert len(held_words) == 1 and not held_words & {r["id"].split("-", 2)[2] for r in train}
    assert all(r["context"] == "" and r["instruction"] for r in train + held)
