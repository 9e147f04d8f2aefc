"""Quality metrics of a scored model: perplexity, and accuracy by label log-likelihood or greedy output.

Why apart: they are pure functions of a Scorer and rows (no pass, no timing), so they are read, tested and
changed on their own. Accuracy scores each candidate label by its log-likelihood after the prompt (deterministic
and meaningful even for tiny random models); `method: generate` compares greedy output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from orchestrator.passes.base import PassError
from orchestrator.passes.evaluation.scorers import Scorer


def _log_softmax(x: Any) -> Any:
    import numpy as np

    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def perplexity(scorer: Scorer, texts: Sequence[str], max_length: int = 512) -> dict[str, float]:
    """Token-level perplexity = exp(mean next-token NLL) over all texts (each truncated to max_length)."""
    total_nll, total = 0.0, 0
    for text in texts:
        ids = scorer.encode(text)[:max_length]
        if len(ids) < 2:
            continue
        logp = _log_softmax(scorer.logits(ids)[:-1])
        total_nll -= float(sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1)))
        total += len(ids) - 1
    if total == 0:
        raise PassError("Evaluate: perplexity needs texts of at least 2 tokens; the data gave none")
    loss = total_nll / total
    return {"perplexity": math.exp(loss), "eval_loss": loss, "n_tokens": float(total)}


def continuation_logprob(scorer: Scorer, prompt: str, continuation: str) -> float:
    """log p(continuation | prompt), over the tokens of encode(prompt + continuation) past the common prefix,
    so BPE merges across the boundary are scored as the model saw them in training."""
    p_ids = scorer.encode(prompt)
    ids = scorer.encode(prompt + continuation)
    k = 0
    while k < min(len(p_ids), len(ids)) and p_ids[k] == ids[k]:
        k += 1
    k = max(k, 1)
    if k >= len(ids):
        return 0.0
    logp = _log_softmax(scorer.logits(ids)[k - 1 : -1])
    return float(sum(logp[j, ids[k + j]] for j in range(len(ids) - k)))


def prompt_prefix(template: str, label_col: str) -> str:
    """The template up to the label's placeholder: what the model sees before it should say the label."""
    from orchestrator.passes.common.data import template_columns

    fields = template_columns(template)
    if label_col not in fields:
        raise PassError(
            f"Evaluate: the prompt template has no {{{label_col}}} placeholder (fields: {fields}); set "
            "user_config.prompt_template or user_config.label_col"
        )
    return template[: template.index("{" + label_col + "}")]


def accuracy(
    scorer: Scorer,
    rows: Sequence[dict[str, Any]],
    *,
    template: str,
    label_col: str,
    labels: Sequence[str] | None = None,
    method: str = "loglik",
    max_new_tokens: int = 8,
    chat: bool = False,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Fraction of rows whose label the model picks: the most likely candidate (loglik) or greedy output."""

    def label_of(row: dict[str, Any]) -> str:
        value = row[label_col]
        return str(labels[value]) if labels is not None and isinstance(value, int) else str(value)

    from orchestrator.passes.common.data import _render

    if not rows:
        raise PassError("Evaluate: accuracy needs labelled rows; the data gave none")
    prefix = prompt_prefix(template, label_col)
    if label_col not in rows[0]:
        raise PassError(
            f"Evaluate: label_col {label_col!r} is not a column of the data (columns: {', '.join(rows[0])}); "
            "set user_config.label_col"
        )
    candidates = list(labels) if labels else sorted({label_of(r) for r in rows})
    if num_classes is not None and len(candidates) != num_classes:
        raise PassError(
            f"Evaluate: num_classes {num_classes} but the candidate labels are {len(candidates)} ({candidates}); "
            "fix num_classes or set user_config.labels"
        )
    correct = 0
    for row in rows:
        prompt = _render(prefix, {k: v for k, v in row.items() if k != label_col})
        if chat:
            prompt = scorer.chat_prompt(prompt)
        gold = label_of(row)
        if method == "loglik":
            scores = [continuation_logprob(scorer, prompt, c) for c in candidates]
            pred = candidates[max(range(len(candidates)), key=scores.__getitem__)]
        else:
            out = scorer.decode(scorer.generate_ids(scorer.encode(prompt), max_new_tokens)).strip().lower()
            pred = next((c for c in candidates if out.startswith(c.lower())), None)
        correct += pred == gold
    return {"accuracy": correct / len(rows), "n_samples": float(len(rows))}
