"""Olive's text-generation strategies: how tokenized texts become training sequences of at most max_len tokens.

- line-by-line: each text is one sequence (truncated), in order; line-by-line-random: max_samples texts drawn at
  random (random_seed), with replacement, as Olive does;
- join: the texts joined into one token stream, cut into contiguous max_len blocks;
- join-sliding-window: the same stream, a block every `stride` tokens (blocks overlap by max_len - stride);
- join-random: max_samples blocks of max_len tokens, each starting at a random text (random_seed) and running on
  through the following texts until it is full; a start too near the end is redrawn (up to random_retries).

Kept apart from the trainer so the packing is testable without a model and shared by every pass that trains.
"""

from __future__ import annotations

from random import Random

STRATEGIES = ("line-by-line", "line-by-line-random", "join", "join-sliding-window", "join-random")


def pack(
    encoded: list[list[int]],
    strategy: str,
    max_len: int,
    *,
    max_samples: int | None = None,
    random_seed: int | None = None,
    stride: int | None = None,
    random_retries: int = 10,
) -> list[list[int]]:
    """Token blocks for `strategy` from per-text token ids (each text already ends with its EOS, if any)."""
    if strategy == "line-by-line":
        return [ids[:max_len] for ids in encoded][:max_samples]
    if strategy == "line-by-line-random":
        rng = Random(random_seed)
        return [encoded[rng.randint(0, len(encoded) - 1)][:max_len] for _ in range(_needs(max_samples, strategy))]
    if strategy in ("join", "join-sliding-window"):
        stream = [tok for ids in encoded for tok in ids]
        step = max_len if strategy == "join" else _stride(stride, max_len)
        blocks = [stream[i : i + max_len] for i in range(0, max(1, len(stream) - max_len + step), step)]
        return [b for b in blocks if b][:max_samples]
    if strategy == "join-random":
        return _join_random(encoded, max_len, _needs(max_samples, strategy), Random(random_seed), random_retries)
    raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")


def _needs(max_samples: int | None, strategy: str) -> int:
    if not max_samples:
        raise ValueError(f"strategy {strategy!r} draws max_samples sequences: set max_samples")
    return max_samples


def _stride(stride: int | None, max_len: int) -> int:
    if stride is None or not 0 < stride <= max_len:
        raise ValueError(f"join-sliding-window needs a stride between 1 and source_max_len ({max_len})")
    return stride


def _join_random(encoded: list[list[int]], max_len: int, n: int, rng: Random, retries: int) -> list[list[int]]:
    blocks = []
    for _ in range(n):
        for _attempt in range(retries):
            start = rng.randint(0, len(encoded) - 1)
            block: list[int] = []
            for ids in encoded[start:]:
                block += ids
                if len(block) >= max_len:
                    break
            if len(block) >= max_len:
                blocks.append(block[:max_len])
                break
    if not blocks:
        total = sum(len(ids) for ids in encoded)
        raise ValueError(
            f"join-random found no run of {max_len} tokens ({total} in all): lower source_max_len or add data"
        )
    return blocks
