"""Rebuild data/tiny/instructions.jsonl: a small synthetic Dolly-style instruction set.

Templated tasks of growing difficulty (copying, counting, arithmetic, ordering, spelling) so that a
tiny model can learn some of them and a difficulty measure has something to rank. Deterministic:
``python data/tiny/build_tiny_dataset.py`` writes the same file every time.
"""

import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud tiger piano garden window candle forest silver rocket "
         "orange bridge pencil meadow castle dragon lemon harbor").split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def make(rng: random.Random, i: int) -> dict:
    kind = i % 6
    w = rng.sample(WORDS, 4)
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if kind == 0:
        return {"instruction": f"Repeat the word {w[0]}.", "context": "", "response": w[0]}
    if kind == 1:
        n = rng.randint(0, 10)
        return {"instruction": f"Write the number {n} in words.", "context": "", "response": NUMBER_WORDS[n]}
    if kind == 2:
        return {"instruction": f"What is {a} plus {b}?", "context": "", "response": f"{a} plus {b} is {a + b}."}
    if kind == 3:
        items = w[: rng.randint(2, 4)]
        return {"instruction": "Sort these words alphabetically.", "context": ", ".join(items),
                "response": ", ".join(sorted(items))}
    if kind == 4:
        return {"instruction": f"Spell the word {w[1]} backwards.", "context": "", "response": w[1][::-1]}
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
    target = rng.choice(text.split())
    return {"instruction": f"How many times does the word {target} appear?", "context": text,
            "response": f"The word {target} appears {text.split().count(target)} times."}


def main() -> None:
    rng = random.Random(1234)
    rows, seen = [], set()
    i = 0
    while len(rows) < 360:
        rec = make(rng, i)
        i += 1
        key = (rec["instruction"], rec["context"])
        if key in seen:
            continue
        seen.add(key)
        rows.append(rec)
    out = Path(__file__).with_name("instructions.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
