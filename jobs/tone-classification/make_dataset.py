"""Write the tone-classification data set of the embedded default workflow (Olive's phi-3 tone sample).

Phrases labelled Sad / Joy / Fear / Surprise, built from templates with a fixed seed, so the file is identical on
every machine (its hash is part of the cache key). Usage: python make_dataset.py [OUT_FILE] [--rows N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

SUBJECTS = ["I", "We", "My sister", "Our team", "The old man", "She", "He", "My best friend", "The children", "They"]
TONES: dict[str, dict[str, list[str]]] = {
    "Sad": {
        "verbs": ["lost", "missed", "said goodbye to", "could not find", "buried", "left behind"],
        "objects": ["the family dog", "an old friend", "the last letter", "our home", "the championship", "grandma"],
        "tails": ["and cried all night.", "and the house feels empty.", "and nothing will be the same.",
                  "and it still hurts.", "under a grey sky."],
    },
    "Joy": {
        "verbs": ["won", "celebrated", "finally got", "danced at", "laughed through", "shared"],
        "objects": ["the lottery", "a perfect birthday", "the dream job", "the wedding", "a sunny picnic",
                    "good news"],
        "tails": ["and could not stop smiling!", "and everyone cheered.", "and it was wonderful.",
                  "with a huge grin.", "and felt on top of the world."],
    },
    "Fear": {
        "verbs": ["heard footsteps behind", "was trapped in", "saw a shadow in", "got lost in", "hid from",
                  "froze in front of"],
        "objects": ["the dark basement", "a burning building", "the empty forest", "a stranger", "the storm",
                    "the growling dog"],
        "tails": ["and my heart was pounding.", "and I could not breathe.", "and shook with terror.",
                  "and screamed for help.", "and was too scared to move."],
    },
    "Surprise": {
        "verbs": ["opened the door to", "suddenly found", "never expected", "was shocked by", "stumbled upon",
                  "could not believe"],
        "objects": ["a surprise party", "a hidden letter", "a long-lost cousin", "the secret result",
                    "a twist ending", "snow in July"],
        "tails": ["wow, out of nowhere!", "and gasped.", "what a twist!", "and my jaw dropped.",
                  "totally unexpected!"],
    },
}


def make_rows(n_rows: int, seed: int = 42) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    labels = sorted(TONES)
    while len(rows) < n_rows:
        tone = labels[len(rows) % len(labels)]
        parts = TONES[tone]
        phrase = " ".join(
            [rng.choice(SUBJECTS), rng.choice(parts["verbs"]), rng.choice(parts["objects"]), rng.choice(parts["tails"])]
        )
        if phrase in seen:
            continue
        seen.add(phrase)
        rows.append({"phrase": phrase, "tone": tone})
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: list[dict[str, str]], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", nargs="?", default=str(Path(__file__).parent / "dataset" / "dataset-classification.json"))
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    path = write_jsonl(make_rows(args.rows, args.seed), Path(args.out))
    print(f"wrote {args.rows} rows to {path}")


if __name__ == "__main__":
    main()
