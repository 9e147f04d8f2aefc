"""GraphSurgeries QuantizeEmbeddingInt8 and ShareEmbeddingLmHead (Olive >= 0.12, olive-recipes' Qwen3.5 int4
recipes) after ModelBuilder int4 on the tiny Phi-3: the int8 embedding and the shared 8-bit LM head keep the
logits as close to fp32 as the int4 build, the model gets smaller, genai generates; an untied model's LM head is
never shared, and a graph with nothing to edit is left as it is, said in the log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import PassError
from tests.test_mixed_precision import _parity, _run, tied_model  # noqa: F401  (fixture)

BOTH = {"surgeries": [{"surgeon": "QuantizeEmbeddingInt8"}, {"surgeon": "ShareEmbeddingLmHead"}]}


def _built(src: Path, out: Path, tone_data: Path, **extra: Any) -> ModelArtifact:
    model, _, _ = _run("ModelBuilder", {"precision": "int4", **extra}, ModelArtifact(format="hf", path=str(src)),
                       out, tone_data)  # fmt: skip
    return model


def test_int8_embedding_shared_with_the_lm_head(tmp_path: Path, tied_model: Path, tone_data: Path) -> None:  # noqa: F811
    import onnx

    from orchestrator.passes.common import onnx_tools

    # the builder's own sharing off: a float embedding Gather and an int4 LM head, as the recipes' bigger models
    built = _built(tied_model, tmp_path / "m", tone_data, extra_options={"shared_embeddings": False})
    out, metrics, log = _run("GraphSurgeries", BOTH, built, tmp_path / "s", tone_data)
    assert any("int8 blocks of 32" in line for line in log) and any("8-bit MatMulNBits" in line for line in log)
    g = onnx.load(str(onnx_tools.onnx_model_file(out.path)), load_external_data=False).graph
    gbq = next(n for n in g.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in g.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    assert next(a.i for a in head.attribute if a.name == "bits") == 8
    assert gbq.input[2] == head.input[2]  # one set of scales (and codes, through a Reshape) for both
    assert metrics["model_size_bytes"] < 0.7 * metrics["size_before_bytes"]
    before, agree_before = _parity(tied_model, Path(built.path))
    after, agree_after = _parity(tied_model, Path(out.path))
    assert after < before + 0.02 and agree_after >= agree_before - 0.05, (before, after)
    assert onnx_tools.generate(Path(out.path), "thanks so much for the help", 4)[1] > 0


def test_untied_lm_head_is_not_shared(tmp_path: Path, tiny_model: Path, tone_data: Path) -> None:
    built = _built(tiny_model, tmp_path / "m", tone_data)
    one, _, log = _run("GraphSurgeries", {"surgeries": [{"surgeon": "QuantizeEmbeddingInt8"}]}, built,
                       tmp_path / "q", tone_data)  # fmt: skip
    rel, agree = _parity(tiny_model, Path(one.path))
    assert rel < 0.25 and agree > 0.5
    with pytest.raises(PassError, match="not tied"):
        _run("GraphSurgeries", BOTH, built, tmp_path / "s", tone_data)


def test_builder_shared_embedding_is_left_as_is(tmp_path: Path, tied_model: Path, tone_data: Path) -> None:  # noqa: F811
    built = _built(tied_model, tmp_path / "m", tone_data)  # the builder ties a tied model's lookup to the head
    _, metrics, log = _run("GraphSurgeries", BOTH, built, tmp_path / "s", tone_data)
    assert sum("nothing to do" in line for line in log) == 2
    assert metrics["model_size_bytes"] == metrics["size_before_bytes"]
