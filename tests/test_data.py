"""orchestrator.passes.common.data on real files through the real `datasets` library: templates, splits, eval
carve-out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.olive import load_workflow
from orchestrator.passes.base import PassError
from orchestrator.passes.common.data import DataError, TextDataSpec, load_splits, text_spec

ROWS = [{"Question": f"q{i}", "Best Answer": f"a{i}", "tone": "Joy" if i % 2 else "Sad", "n": i} for i in range(10)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_config(load: dict[str, Any], **pre: Any) -> dict[str, Any]:
    """An Olive-style (nested "params") data config, as the seeds write it."""
    dc: dict[str, Any] = {"name": "qa", "type": "HuggingfaceContainer", "load_dataset_config": {"params": load}}
    if pre:
        dc["pre_process_data_config"] = {"params": {"dataset_type": "corpus", **pre}}
    return dc


@pytest.fixture
def qa_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "qa.jsonl", ROWS)


def test_template_with_column_names_holding_spaces(tmp_path: Path, qa_file: Path) -> None:
    dc = data_config(
        {"data_name": "json", "data_files": "data/qa.jsonl", "split": "train"},
        text_cols=["Question", "Best Answer"],
        text_template="<|user|>\n{Question}<|end|>\n<|assistant|>\n{Best Answer}\n<|end|> {{literal}} #{n:02d}",
    )
    train, eval_ds = load_splits(dc, base_dir=tmp_path)
    assert eval_ds is None
    assert train.column_names == ["text"]
    assert len(train) == 10
    assert train[3]["text"] == "<|user|>\nq3<|end|>\n<|assistant|>\na3\n<|end|> {literal} #03"


def test_text_cols_without_template_join_with_newlines(tmp_path: Path, qa_file: Path) -> None:
    dc = data_config({"data_name": "json", "data_files": str(qa_file)}, text_cols=["Question", "tone"])
    train, _ = load_splits(dc, base_dir=None)
    assert train[0]["text"] == "q0\nSad"


def test_split_syntax(tmp_path: Path, qa_file: Path) -> None:
    """olive finetune --train_split "train[:80%]" --eval_split "train[80%:]"."""
    dc = data_config({"data_name": "json", "data_files": "data/qa.jsonl"}, text_template="{Question}")
    train, eval_ds = load_splits(dc, base_dir=tmp_path, train_split="train[:80%]", eval_split="train[80%:]")
    assert [r["text"] for r in train] == [f"q{i}" for i in range(8)]
    assert [r["text"] for r in eval_ds] == ["q8", "q9"]
    dc["load_dataset_config"]["params"]["split"] = "train[2:4]"  # the config's own split when no override
    train, _ = load_splits(dc, base_dir=tmp_path)
    assert [r["text"] for r in train] == ["q2", "q3"]


@pytest.mark.parametrize(("size", "n_eval"), [(0.3, 3), (2, 2)])
def test_eval_dataset_size_carves_reproducibly(tmp_path: Path, qa_file: Path, size: float, n_eval: int) -> None:
    dc = data_config({"data_name": "json", "data_files": "data/qa.jsonl"}, text_template="{Question}")
    train, eval_ds = load_splits(dc, base_dir=tmp_path, eval_dataset_size=size, seed=7)
    assert (len(train), len(eval_ds)) == (10 - n_eval, n_eval)
    assert not set(train["text"]) & set(eval_ds["text"])
    train2, eval2 = load_splits(dc, base_dir=tmp_path, eval_dataset_size=size, seed=7)
    assert list(eval2["text"]) == list(eval_ds["text"]) and list(train2["text"]) == list(train["text"])
    with pytest.raises(DataError, match="eval_dataset_size 10 leaves no training rows"):
        load_splits(dc, base_dir=tmp_path, eval_dataset_size=10)


def test_missing_template_column_names_it_and_the_columns(tmp_path: Path, qa_file: Path) -> None:
    dc = data_config({"data_name": "json", "data_files": "data/qa.jsonl"}, text_template="{Question} {Answer}")
    with pytest.raises(PassError) as info:
        load_splits(dc, base_dir=tmp_path)
    assert str(info.value) == (
        "data config 'qa': text_template names column 'Answer' that the data does not have "
        "(columns: Question, Best Answer, tone, n)"
    )
    dc = data_config({"data_name": "json", "data_files": "data/qa.jsonl"}, text_cols=["Question", "answer"])
    with pytest.raises(DataError, match="text_cols names column 'answer'"):
        load_splits(dc, base_dir=tmp_path)


def test_folder_as_data_name(tmp_path: Path) -> None:
    """olive finetune --data_name data/ : datasets autodetects the files in the folder."""
    write_jsonl(tmp_path / "data" / "part-0.jsonl", ROWS[:6])
    write_jsonl(tmp_path / "data" / "part-1.jsonl", ROWS[6:])
    dc = data_config({"data_name": "data/", "split": "train[:50%]"}, text_template="{Question}|{tone}")
    train, eval_ds = load_splits(dc, base_dir=tmp_path, eval_split="train[50%:]")
    assert len(train) == 5 and len(eval_ds) == 5
    assert sorted([*train["text"], *eval_ds["text"]]) == sorted(f"{r['Question']}|{r['tone']}" for r in ROWS)


def test_missing_data_file_names_the_path(tmp_path: Path) -> None:
    dc = data_config({"data_name": "json", "data_files": "data/nope.jsonl"}, text_template="{Question}")
    with pytest.raises(DataError) as info:
        load_splits(dc, base_dir=tmp_path)
    assert str(info.value) == f"data config 'qa': data file {str(tmp_path / 'data/nope.jsonl')!r} not found"


def test_unknown_split_lists_the_known_ones(tmp_path: Path, qa_file: Path) -> None:
    dc = data_config({"data_name": "json", "data_files": "data/qa.jsonl", "split": "trian"}, text_template="{n}")
    with pytest.raises(DataError, match=r"data config 'qa': split 'trian': Unknown split \"trian\".*'train'"):
        load_splits(dc, base_dir=tmp_path)


def test_override_replaces_remote_data_files(tmp_path: Path, qa_file: Path) -> None:
    """A datastore data config: the system downloads the file and hands its local path."""
    dc = data_config(
        {"data_name": "json", "data_files": "azureml://datastores/workspaceblobstore/paths/qa/train.jsonl"},
        text_template="{Question}",
    )
    with pytest.raises(DataError, match="remote resource: the system must download or mount it"):
        load_splits(dc, base_dir=tmp_path)
    train, _ = load_splits(dc, base_dir=tmp_path, data_files_override=str(qa_file))
    assert len(train) == 10


def test_json_form_from_the_workflow_reader(tmp_path: Path, qa_file: Path) -> None:
    """The contract: load_splits takes DataConfig.model_dump(mode="json") (relative paths already resolved)."""
    wf = {
        "input_model": {"type": "HfModel", "model_path": "models/tiny"},
        "data_configs": [
            data_config(
                {"data_name": "json", "data_files": "data/qa.jsonl"},
                text_template="{Question}",
                source_max_len=256,
                corpus_strategy="join",
                pad_to_max_len=False,
                max_samples=4,
            )
        ],
    }
    dc = load_workflow(wf, base_dir=tmp_path).data_configs[0].model_dump(mode="json")
    train, _ = load_splits(dc, base_dir=None)
    assert list(train["text"]) == ["q0", "q1", "q2", "q3"]  # max_samples
    assert text_spec(dc) == TextDataSpec(
        max_len=256, pad_to_max_len=False, corpus_join=True, use_attention_mask=True, strategy="join", max_samples=4
    )
    assert text_spec({"name": "x"}) == TextDataSpec()


# ---- Olive's text-generation strategies (orchestrator.passes.common.text_blocks) -------------------------------
def test_strategies_pack_as_olive_does() -> None:
    from orchestrator.passes.common.text_blocks import pack

    texts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    assert pack(texts, "line-by-line", 2) == [[1, 2], [4, 5], [6, 7], [10]]
    assert pack(texts, "join", 4) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert pack(texts, "join-sliding-window", 4, stride=2) == [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [7, 8, 9, 10]]
    drawn = pack(texts, "join-random", 4, max_samples=5, random_seed=3)
    assert len(drawn) == 5 and all(len(b) == 4 for b in drawn)
    stream = [t for ids in texts for t in ids]
    assert all(any(stream[i : i + 4] == b for i in range(len(stream))) for b in drawn)  # runs of the joined text
    assert drawn == pack(texts, "join-random", 4, max_samples=5, random_seed=3)  # the seed fixes the draw
    assert drawn != pack(texts, "join-random", 4, max_samples=5, random_seed=4)
    lines = pack(texts, "line-by-line-random", 3, max_samples=6, random_seed=0)
    assert len(lines) == 6 and all(b in [ids[:3] for ids in texts] for b in lines)
    with pytest.raises(ValueError, match="no run of 20 tokens"):
        pack(texts, "join-random", 20, max_samples=2, random_seed=0)


def test_random_strategies_need_their_seed_and_a_seed_needs_them() -> None:
    from pydantic import ValidationError

    from orchestrator.schema.models import PreProcessDataConfig

    ok = PreProcessDataConfig(strategy="join-random", max_samples=8, random_seed=42, source_max_len=64)
    assert ok.corpus_strategy == "join-random"
    with pytest.raises(ValidationError, match="set max_samples and random_seed"):
        PreProcessDataConfig(strategy="join-random", max_samples=8)
    with pytest.raises(ValidationError, match="random_seed is read only by the random strategies"):
        PreProcessDataConfig(strategy="join", random_seed=1)
    with pytest.raises(ValidationError, match="stride goes with strategy 'join-sliding-window'"):
        PreProcessDataConfig(strategy="join-sliding-window")


def test_join_random_trains_on_drawn_blocks(tiny_model: Path) -> None:
    """The LoRA tokenizer packs join-random: max_samples full blocks drawn from the whole data, not its first rows."""
    from transformers import AutoTokenizer

    from orchestrator.passes.common.data import text_spec
    from orchestrator.passes.training.lora.train import tokenize

    dc = {"name": "d", "pre_process_data_config": {"strategy": "join-random", "max_samples": 7, "random_seed": 1,
                                                   "source_max_len": 16}}  # fmt: skip
    from datasets import Dataset

    ds = Dataset.from_dict({"text": [f"row {i} says hello there" for i in range(40)]})
    out = tokenize(ds, AutoTokenizer.from_pretrained(tiny_model), text_spec(dc))
    assert len(out) == 7 and all(len(ids) == 16 for ids in out["input_ids"])


@pytest.mark.parametrize(
    "rows",
    [
        [{"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "Joy"}]}],
        [{"conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "Joy"}]}],
        [{"instruction": "hi there", "input": "", "output": "Joy"}],
        [{"prompt": "hi there", "response": "Joy"}],
    ],
    ids=["messages", "sharegpt", "alpaca", "prompt_response"],
)
def test_chat_template_renders_chat_and_instruction_rows(tmp_path: Path, tiny_model: Path, rows: list[Any]) -> None:
    """Olive's chat_template (finetune --use_chat_template): messages, ShareGPT conversations or instruction rows
    rendered with the tokenizer's own chat template, exactly as transformers renders the same conversation."""
    from transformers import AutoTokenizer

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dc = {"name": "d", "load_dataset_config": {"data_name": "json", "data_files": str(tmp_path / "d.jsonl")},
          "pre_process_data_config": {"chat_template": True}}  # fmt: skip
    train, _ = load_splits(dc, base_dir=tmp_path, tokenizer=str(tiny_model))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "Joy"}], tokenize=False
    )
    assert train["text"] == [expected] and "hi there" in expected and "Joy" in expected
    assert text_spec(dc).chat  # the template carries its own special tokens: the trainer adds none
    with pytest.raises(DataError, match="needs the model's tokenizer"):
        load_splits(dc, base_dir=tmp_path)


def test_chat_template_refuses_plain_text_rows_before_training(tmp_path: Path, tiny_model: Path) -> None:
    from orchestrator.engine.data_config_check import check_data_config
    from orchestrator.engine.preflight_error import PreflightError

    (tmp_path / "d.jsonl").write_text('{"text": "no conversation here"}\n')
    dc = {"name": "d", "load_dataset_config": {"data_name": "json", "data_files": "d.jsonl"},
          "pre_process_data_config": {"chat_template": True}}  # fmt: skip
    with pytest.raises(PreflightError, match="needs chat rows"):
        check_data_config(dc, tmp_path, "data_configs[0]")
