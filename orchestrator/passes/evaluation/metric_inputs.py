"""What a metric is measured on: the evaluated rows of a data config, or the shapes an ONNX graph is timed on.

Why apart: choosing rows (the split, or the rows a fine-tune held out with its eval_dataset_size and seed) and
turning a data config into latency inputs (a dummy container, or padded text shapes) are data work, separate
from measuring; passes.common.data loads and templates the rows, as for LoRA.
"""

from __future__ import annotations

from typing import Any, Protocol

from orchestrator.passes.base import PassContext, PassError


class RowChoice(Protocol):
    """Which rows are evaluated: EvaluateConfig's split, eval_dataset_size and seed."""

    @property
    def split(self) -> str | None: ...
    @property
    def eval_dataset_size(self) -> float | int | None: ...
    @property
    def seed(self) -> int: ...


def data_config(ctx: PassContext, name: str) -> dict[str, Any]:
    """The workflow's data config `name`, as the job carries it."""
    if name not in ctx.job.data_configs:
        known = ", ".join(sorted(ctx.job.data_configs)) or "none"
        raise PassError(f"Evaluate: data config {name!r} is not in the workflow's data_configs (known: {known})")
    return ctx.job.data_configs[name]


def load_texts(ctx: PassContext, name: str, config: RowChoice) -> list[str]:
    """Templated texts of the evaluated rows (passes.common.data loads and templates them, as for LoRA)."""
    from orchestrator.passes.common.data import load_splits

    train, eval_ = load_splits(
        data_config(ctx, name),
        base_dir=None,  # relative data paths resolve against the working directory, as in LoRA
        eval_dataset_size=None if config.split else config.eval_dataset_size,
        train_split=config.split,
        seed=config.seed,
        data_files_override=ctx.job.data_files.get(name),
    )
    ds = eval_ if eval_ is not None else train
    return [str(t) for t in ds["text"]]


def load_labelled(ctx: PassContext, name: str, config: RowChoice) -> tuple[list[dict[str, Any]], str]:
    """Raw rows (label column kept) of the same rows load_texts evaluates, and the data's text_template.

    load_splits keeps only "text", so this mirrors it without the templating: same split, max_samples and
    eval carve-out (train_test_split with the same seed picks the same rows).
    """
    from orchestrator.passes.common import data

    dc = data._parse(data_config(ctx, name), None)
    override = ctx.job.data_files.get(name)
    ds = data._load(dc, config.split or dc.load_dataset_config.split or "train", None, override)
    pre = dc.pre_process_data_config
    if pre is not None and pre.max_samples is not None:
        ds = ds.select(range(min(pre.max_samples, len(ds))))
    if not config.split and config.eval_dataset_size:
        _, ds = data._carve(ds, config.eval_dataset_size, config.seed, dc.name)
    template = (pre.text_template if pre is not None else None) or ""
    return [dict(r) for r in ds], template


def dummy_config(ctx: PassContext, name: str | None) -> dict[str, Any] | None:
    """The data config `name` when it is a dummy container (random token ids, for latency), else None."""
    from orchestrator.schema.models import DUMMY_CONTAINERS

    if not name:
        return None
    dc = data_config(ctx, name)
    return dc if dc.get("type") in DUMMY_CONTAINERS else None


def padded_text_shape(ctx: PassContext, name: str) -> dict[str, Any] | None:
    """Latency of a plain ONNX graph on a text data config, as Olive times it: each sample is padded to
    max_seq_len (pad_to_max_len, Olive's default) and only its shape reaches the timing, so the graph is timed
    on [1, max_seq_len] token inputs with an empty KV cache. None when samples are not padded (their lengths
    need the tokenizer: refused by the caller)."""
    from orchestrator.passes.common.data import text_spec

    dc = data_config(ctx, name)
    spec = text_spec(dc)
    if not spec.pad_to_max_len:
        return None
    ctx.info(f"latency on {name!r}: samples padded to max_seq_len {spec.max_len} (Olive's pad_to_max_len), "
             f"timed as [1, {spec.max_len}] token inputs with an empty KV cache")  # fmt: skip
    params = {"seq_len": spec.max_len, "past_seq_len": 0, "max_seq_len": spec.max_len, "max_samples": 1}
    return {"name": name, "type": "TransformersPromptDummyDataContainer", "load_dataset_config": params}
