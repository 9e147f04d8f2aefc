"""Reliability, second round (issue 20): an input is never written, tracking and cache heal, no silent wrong
training, no secret in any file, every user error one line with exit 2.

Each case here failed before the change that fixed it (an input damaged, an internal error, a silent exit 0 or a
secret printed). The fast cases run the CLI in-process like tests/test_bad_inputs.py and share its helpers; the
few that need real work (a killed MLflow, damaged cache entries, a real MLflow server, a full disk) come after.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import test_bad_inputs
from tests.test_bad_inputs import (
    REPO,
    TEMPLATE,
    _edit_json,
    _write,
    assert_one_line,
    cli,
    ft,
    run_config,
    snapshot,
    workflow,
)

# test_bad_inputs' fixtures: a working folder with the tone rows and a copy of the tiny model, checked untouched
case = test_bad_inputs.case
model_snapshot = test_bad_inputs.model_snapshot

MAX_LINE = 700  # an error line about paths stays short (the issue saw one of 48,687 characters)


def _rows(c: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (c / "d.jsonl").read_text().splitlines()]


def _jsonl(path: Path, rows: list[Any]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _without(rows: list[dict[str, Any]], key: str, every: int) -> list[dict[str, Any]]:
    """rows with `key` dropped from all but every `every`-th row."""
    return [r if i % every == 0 else {k: v for k, v in r.items() if k != key} for i, r in enumerate(rows)]


def _raw_wf(c: Path, name: str, text: str) -> list[Any]:
    return ["run", "--config", _write(c / name, text)]


def _wf_text(c: Path, lora_extra: str = "", training_extra: str = "", top: str = "") -> str:
    """The test workflow as JSON text, with raw JSON spliced in (numbers like 1e999 survive as written)."""
    wf = workflow(c)
    text = json.dumps(wf)
    text = text.replace('"lora_r": 4', '"lora_r": 4' + lora_extra, 1)
    text = text.replace('"max_steps": 1', '"max_steps": 1' + training_extra, 1)
    return text[:-1] + top + "}" if top else text


YAML_WF = """\
workflow_id: rel
input_model: {type: HfModel, model_path: m}
data_configs:
  - name: d
    type: HuggingfaceContainer
    load_dataset_config: {data_name: json, data_files: d.jsonl, split: train}
    pre_process_data_config: {text_template: "{phrase} {tone}", source_max_len: 32}
passes:
  lora:
    type: LoRA
    train_data_config: d
    lora_r: 4
    training_args:
      max_steps: 1
      learning_rate: LR
engine: {output_dir: out, cache_dir: cache}
"""


def _yaml(c: Path, lr: str = "1e-4", extra: str = "") -> list[Any]:
    return _raw_wf(c, "wf.yaml", YAML_WF.replace("LR", lr) + extra)


def _link(c: Path, name: str, target: str) -> Path:
    (c / name).symlink_to(target)
    return c / name


def _adapter(c: Path, name: str = "ad") -> Path:
    (c / name).mkdir()
    _write(c / name / "adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4}))
    return c / name


def _data_folder(c: Path) -> Path:
    (c / "dd").mkdir()
    shutil.copy(c / "d.jsonl", c / "dd" / "train.jsonl")
    return c / "dd"


def _folder_wf(c: Path, **engine: Any) -> list[Any]:
    wf = workflow(c)
    wf["engine"].update(engine)
    return run_config(c, wf)


# ---- the case table: (id, setup(case) -> argv, substrings of the one error line) -------------------------------
CASES: list[tuple[str, Any, tuple[str, ...]]] = [
    # 1. an input is never written: output/cache folders apart from every input, symlinks resolved
    (
        "out_inside_model",
        lambda c: ft(out="m/out"),
        ("engine.output_dir", "is inside the input input_model.model_path"),
    ),
    ("out_is_model", lambda c: ft(out="m"), ("engine.output_dir", "is the input input_model.model_path")),
    ("out_contains_model", lambda c: ft(out="."), ("input_model.model_path", "is inside the output folder")),
    ("out_links_to_model", lambda c: _link(c, "ol", "m") and ft(out="ol"), ("engine.output_dir", "resolved")),
    ("out_inside_model_by_link", lambda c: _link(c, "ml", "m") and ft(out="ml/o"), ("is inside the input",)),
    ("model_link_into_out", lambda c: _link(c, "o", "m") and ft(model="o", out="o/x"), ("is inside the input",)),
    (
        "out_inside_data_folder",
        lambda c: _data_folder(c) and ["finetune", "-m", "m", "-d", "./dd", "--text_template", TEMPLATE, "-o", "dd/o"],
        ("engine.output_dir", "data_configs[0]"),
    ),
    (
        "out_contains_data_file",
        lambda c: _data_folder(c) and ft(data="dd/train.jsonl", out="dd"),
        ("data_configs[0].load_dataset_config.data_files", "is inside the output folder"),
    ),
    ("cache_inside_model", lambda c: _folder_wf(c, cache_dir="m/cache"), ("engine.cache_dir", "input_model")),
    ("cache_is_data_folder", lambda c: _data_folder(c) and _folder_wf(c, cache_dir="."), ("cache folder",)),
    (
        "out_inside_adapter",
        lambda c: _adapter(c) and ["auto-opt", "-m", "m", "--adapter_path", "ad", "-o", "ad/onnx"],
        ("engine.output_dir", "input_model.adapter_path"),
    ),
    # symlinks inside an input folder that a copy could not take
    ("model_link_loop_up", lambda c: _link(c, "m/loop", "..") and ft(), ("m/loop", "a loop")),
    ("model_link_loop_self", lambda c: _link(c, "m/self", ".") and ft(), ("m/self", "a loop")),
    ("model_link_dangling", lambda c: _link(c, "m/extra.bin", "nowhere") and ft(), ("extra.bin", "does not exist")),
    ("model_link_outside", lambda c: (c / "ext").mkdir() or _link(c, "m/ext", "../ext") and ft(), ("outside",)),
    ("model_path_dangling", lambda c: _link(c, "mm", "gone") and ft(model="mm"), ("mm is a symlink", "not exist")),
    ("model_path_loop", lambda c: _link(c, "mm", "mm") and ft(model="mm"), ("symlink loop",)),
    (
        "adapter_link_loop",
        lambda c: (
            _adapter(c) and _link(c, "ad/up", "..") and ["auto-opt", "-m", "m", "--adapter_path", "ad", "-o", "o"]
        ),
        ("input_model.adapter_path", "a loop"),
    ),
    # 4. the whole data set read before anything runs
    (
        "label_missing_35_of_40",
        lambda c: _jsonl(c / "d2.jsonl", _without(_rows(c), "tone", 8)) and ft(data="d2.jsonl"),
        ("35 of 40 rows have no value for 'tone'", "line 2"),
    ),
    (
        "label_null_in_some_rows",
        lambda c: (
            _jsonl(c / "d2.jsonl", [{**r, "tone": None} if i in (3, 9) else r for i, r in enumerate(_rows(c))])
            and ft(data="d2.jsonl")
        ),
        ("2 of 40 rows have no value for 'tone'",),
    ),
    (
        "label_a_list",
        lambda c: _jsonl(c / "d2.jsonl", [{**r, "tone": [r["tone"]]} for r in _rows(c)]) and ft(data="d2.jsonl"),
        ("'tone' holds a list",),
    ),
    (
        "json_array_rows_missing",
        lambda c: _write(c / "a.json", json.dumps(_without(_rows(c), "phrase", 2))) and ft(data="a.json"),
        ("20 of 40 rows have no value for 'phrase'",),
    ),
    (
        "columns_of_unequal_length",
        lambda c: (
            _write(c / "c.json", json.dumps({"phrase": ["a", "b", "c"], "tone": ["Joy", "Sad"]})) and ft(data="c.json")
        ),
        ("unequal length", "'phrase': 3", "'tone': 2"),
    ),
    (
        "csv_row_short",
        lambda c: _write(c / "t.csv", "phrase,tone\nhello,Joy\nsad day\n") and ft(data="t.csv"),
        ("1 of 2 rows have no value for 'tone'",),
    ),
    (
        "gzip_jsonl_missing",
        lambda c: (
            _write(
                c / "d.jsonl.gz",
                gzip.compress("".join(json.dumps(r) + "\n" for r in _without(_rows(c), "tone", 2)).encode()),
            )
            and ft(data="d.jsonl.gz")
        ),
        ("20 of 40 rows have no value for 'tone'",),
    ),
    ("template_unbalanced_open", lambda c: ft(template="{phrase} {tone"), ("text_template", "unbalanced '{'")),
    ("template_unbalanced_close", lambda c: ft(template="{phrase} tone}"), ("text_template", "unbalanced '}'")),
    ("template_nested_brace", lambda c: ft(template="{phr{ase} {tone}"), ("text_template", "unbalanced")),
    ("split_selects_no_rows", lambda c: ft("--train_split", "train[40:]"), ("train[40:]", "selects no rows", "40")),
    ("split_percent_rounds_to_none", lambda c: ft("--train_split", "train[:1%]"), ("selects no rows",)),
    (
        "held_out_every_row",
        lambda c: run_config(c, _with_lora(c, eval_dataset_size=40)),
        ("passes.lora", "leaves none of the 40 rows"),
    ),
    # 4. config.json against the weights (safetensors headers), the tokenizer
    (
        "llama_config_over_phi3_weights",
        lambda c: _edit_json(c / "m/config.json", model_type="llama", architectures=["LlamaForCausalLM"]) or ft(),
        ("LlamaForCausalLM", "Phi-3", "missing", "would not use"),
    ),
    (
        "config_wider_than_weights",
        lambda c: _edit_json(c / "m/config.json", intermediate_size=704) or ft(),
        ("has shape [128, 352]", "needs [128, 704]"),
    ),
    (
        "config_more_layers_than_weights",
        lambda c: _edit_json(c / "m/config.json", num_hidden_layers=3) or ft(),
        ("model.layers.2.", "missing"),
    ),
    (
        "config_fewer_layers_than_weights",
        lambda c: _edit_json(c / "m/config.json", num_hidden_layers=1) or ft(),
        ("model.layers.1.", "would not use"),
    ),
    (
        "config_model_type_typo",
        lambda c: _edit_json(c / "m/config.json", model_type="phi33") or ft(),
        ("'phi33'", "phi3"),
    ),
    (
        "tokenizer_json_not_a_tokenizer",
        lambda c: _write(c / "m/tokenizer.json", '{"a": 1}') and ft(),
        ("not a tokenizer",),
    ),
    ("tokenizer_json_a_list", lambda c: _write(c / "m/tokenizer.json", "[1, 2]") and ft(), ("not a tokenizer",)),
    (
        "tokenizer_json_bad_model",
        lambda c: _write(c / "m/tokenizer.json", '{"model": {"type": "NoSuchModel"}}') and ft(),
        ("tokenizer.json", "tokenizers library"),
    ),
    # 4. numbers: finite, in sane ranges, never booleans (CLI, JSON and YAML)
    ("lr_1e999_flag", lambda c: ft("--learning_rate", "1e999"), ("learning_rate", "finite")),
    (
        "lr_1e999_json",
        lambda c: _raw_wf(c, "wf.json", _wf_text(c, training_extra=', "learning_rate": 1e999')),
        ("learning_rate", "finite"),
    ),
    ("lr_1e999_yaml", lambda c: _yaml(c, "1e999"), ("learning_rate", "finite")),
    ("lr_too_large", lambda c: ft("--learning_rate", "50"), ("learning_rate", "<= 10")),
    ("epochs_1e999", lambda c: ft("--num_train_epochs", "1e999"), ("num_train_epochs", "finite")),
    ("seed_past_32_bits", lambda c: ft("--seed", str(2**32)), ("training_args.seed", "4294967295")),
    ("beta_one", lambda c: ft("--adam_beta2", "1.0"), ("adam_beta2", "< 1")),
    (
        "max_steps_past_64_bits",
        lambda c: _raw_wf(c, "wf.json", _wf_text(c).replace('"max_steps": 1', '"max_steps": 1180591620717411303424')),
        ("max_steps", "out of range"),
    ),
    ("lora_r_2_31_flag", lambda c: ft("--lora_r", str(2**31)), ("lora_r", "65536")),
    (
        "lora_r_2_31_json",
        lambda c: _raw_wf(c, "wf.json", _wf_text(c).replace('"lora_r": 4', '"lora_r": 2147483648')),
        ("lora_r", "65536"),
    ),
    (
        "lora_r_true_json",
        lambda c: _raw_wf(c, "wf.json", _wf_text(c).replace('"lora_r": 4', '"lora_r": true')),
        ("lora_r", "boolean"),
    ),
    (
        "lora_r_true_yaml",
        lambda c: _raw_wf(c, "wf.yaml", YAML_WF.replace("LR", "1e-4").replace("lora_r: 4", "lora_r: true")),
        ("lora_r", "boolean"),
    ),
    (
        "lora_alpha_nan_yaml",
        lambda c: _raw_wf(
            c, "wf.yaml", YAML_WF.replace("LR", "1e-4").replace("lora_r: 4", "lora_r: 4\n    lora_alpha: .nan")
        ),
        ("lora_alpha", "finite"),
    ),
    (
        "lora_dropout_inf_json",
        lambda c: _raw_wf(c, "wf.json", _wf_text(c, lora_extra=', "lora_dropout": 1e999')),
        ("lora_dropout", "finite"),
    ),
    (
        "eval_size_true_json",
        lambda c: _raw_wf(c, "wf.json", _wf_text(c, lora_extra=', "eval_dataset_size": true')),
        ("eval_dataset_size", "boolean"),
    ),
    # Olive's finetune puts --max_seq_len in the data config (pre_process_data_config.max_seq_len)
    ("max_seq_len_2_31_flag", lambda c: ft("--max_seq_len", str(2**31)), ("max_seq_len", "1048576")),
    (
        "seq_len_true_yaml",
        lambda c: _raw_wf(
            c, "wf.yaml", YAML_WF.replace("LR", "1e-4").replace("source_max_len: 32", "source_max_len: true")
        ),
        ("source_max_len", "boolean"),
    ),
    # 4. YAML 1.2: duplicate keys refused (key and line named)
    (
        "yaml_duplicate_key",
        lambda c: _raw_wf(c, "wf.yaml", YAML_WF.replace("LR", "1e-4").replace("lora_r: 4", "lora_r: 4\n    lora_r: 8")),
        ("'lora_r' appears twice", "line 13"),
    ),
    (
        "yaml_duplicate_section",
        lambda c: _yaml(c, extra="engine: {output_dir: other}\n"),
        ("'engine' appears twice", "line 17"),
    ),
    # 6. encodings, folders, URIs: one line, exit 2, never an internal error
    (
        "config_latin1_json",
        lambda c: _raw_wf(c, "wf.json", _wf_text(c).replace("bad-inputs", "caf\xe9").encode("latin-1")),
        ("wf.json", "not UTF-8", "Latin-1"),
    ),
    (
        "config_latin1_yaml",
        lambda c: _raw_wf(c, "wf.yaml", ("# caf\xe9\n" + YAML_WF.replace("LR", "1e-4")).encode("latin-1")),
        ("wf.yaml", "line 1", "Latin-1"),
    ),
    (
        "config_cp1252_yaml",
        lambda c: _raw_wf(c, "wf.yaml", ("# \u201cquoted\u201d\n" + YAML_WF).encode("cp1252")),
        ("Windows-1252",),
    ),
    (
        "config_utf16_without_bom",
        lambda c: _raw_wf(c, "wf.json", _wf_text(c).encode("utf-16-le")),
        ("not UTF-8", "UTF-16"),
    ),
    (
        "config_is_a_folder",
        lambda c: (c / "cfg.json").mkdir() or ["run", "--config", c / "cfg.json"],
        ("cfg.json is a folder",),
    ),
    (
        "data_latin1",
        lambda c: (
            _write(c / "l.jsonl", '{"phrase": "caf\xe9", "tone": "Joy"}\n'.encode("latin-1")) and ft(data="l.jsonl")
        ),
        ("l.jsonl", "not UTF-8", "Latin-1"),
    ),
    (
        "out_dangling_link",
        lambda c: _link(c, "out", "nowhere") and ft(out="out"),
        ("engine.output_dir", "does not exist"),
    ),
    ("out_link_loop", lambda c: _link(c, "out", "out") and ft(out="out"), ("engine.output_dir", "symlink loop")),
    (
        "out_under_dangling_link",
        lambda c: _link(c, "o", "nowhere") and ft(out="o/sub"),
        ("engine.output_dir", "does not exist"),
    ),
    (
        "cache_link_loop",
        lambda c: _link(c, "cl", "cl") and _folder_wf(c, cache_dir="cl"),
        ("engine.cache_dir", "symlink loop"),
    ),
    ("tracking_sqlite_two_slashes", lambda c: ft("--tracking-uri", "sqlite://mlruns.db"), ("three slashes",)),
    ("tracking_sqlite_no_slashes", lambda c: ft("--tracking-uri", "sqlite:mlruns.db"), ("three slashes",)),
    ("tracking_unknown_scheme", lambda c: ft("--tracking-uri", "htp://127.0.0.1:5000"), ("unknown scheme 'htp'",)),
    (
        "tracking_db_not_sqlite",
        lambda c: _write(c / "x.db", "not a database") and ft("--tracking-uri", f"sqlite:///{c}/x.db"),
        ("not an SQLite database",),
    ),
    (
        "tracking_db_dangling",
        lambda c: _link(c, "t.db", "gone/t.db") and ft("--tracking-uri", f"sqlite:///{c}/t.db"),
        ("t.db is a symlink",),
    ),
    (
        "tracking_db_inside_model",
        lambda c: ft("--tracking-uri", f"sqlite:///{c}/m/ml.db"),
        ("tracking URI", "is inside the input input_model.model_path"),
    ),
    ("template_without_fields", lambda c: ft(template="just text"), ("text_template", "names no column")),
    # 5. a secret written where a flag belongs is refused without being echoed
    (
        "hf_token_string_in_system",
        lambda c: run_config(c, workflow(c, systems={"local": {"type": "LocalSystem", "config": {"hf_token": HF}}})),
        ("systems.local.config.hf_token", "hf_token: true", "not shown"),
    ),
    (
        "hf_token_string_in_docker_system_yaml",
        lambda c: _yaml(c, extra=f"systems:\n  d: {{type: Docker, hf_token: {HF}}}\n"),
        ("systems.d.hf_token", "not shown"),
    ),
]
HF = "hf_" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0UvWxYz"


def _with_lora(c: Path, **changes: Any) -> dict[str, Any]:
    wf = workflow(c)
    wf["passes"]["lora"].update(changes)
    return wf


@pytest.mark.parametrize(("argv", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_short_line_and_writes_nothing(case: Path, capsys, argv, needles) -> None:
    args = argv(case)
    before = snapshot(case)
    rc, out, err = cli(args, capsys)
    line = assert_one_line(rc, out, err, *needles)
    assert "internal error" not in line and HF not in out + err
    assert len(line) < MAX_LINE, line
    assert snapshot(case) == before, "the case wrote files"


def test_at_least_60_cases() -> None:
    assert len(CASES) >= 60, len(CASES)


# ---- valid neighbours pass (no false alarms) -------------------------------------------------------------------
def test_valid_neighbours_pass_the_checks(case: Path, capsys) -> None:
    """YAML 1.2 numbers (1e-4 is a float), literal braces written twice, a BOM, UTF-16 with its BOM, a template
    field the data holds in every row, a model folder that is a link, an output folder next to the inputs, a Hugging
    Face cache snapshot (file links out of the folder): every one passes (dry run)."""
    from orchestrator.olive import load_workflow

    assert load_workflow(case / _yaml(case)[2].name).passes["lora"].config["training_args"]["learning_rate"] == 1e-4
    snap = case / "hub" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (case / "hub" / "blobs").mkdir()
    for f in (case / "m").iterdir():
        shutil.copy(f, case / "hub" / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    _link(case, "mlink", "m")
    _write(case / "bom.json", b"\xef\xbb\xbf" + _wf_text(case).encode())
    _write(case / "u16.json", _wf_text(case).encode("utf-16"))
    from orchestrator.passes.training.lora.training_args import normalize_training_args

    assert normalize_training_args({"max_steps": 1e3})[0] == {"max_steps": 1000}  # YAML's 1e3, an int
    forms = [
        _yaml(case),
        ft(template="{{literal}} {phrase} -> {tone}"),
        ft(model="mlink"),
        ft(model=str(snap)),
        ft(out="out/deeper"),
        ["run", "--config", case / "bom.json"],
        ["run", "--config", case / "u16.json"],
    ]
    for args in forms:
        rc, out, err = cli([*args, "--dry-run"], capsys)
        assert rc == 0 and "would run" in out, (args, out + err)


def test_columnar_json_trains_on_its_rows(case: Path) -> None:
    """A JSON mapping of columns (the form Olive's users write) is read as rows, not as one row of lists."""
    from orchestrator.passes.common.data import load_splits

    rows = _rows(case)
    _write(case / "cols.json", json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    dc = {
        "name": "d",
        "type": "HuggingfaceContainer",
        "load_dataset_config": {"data_name": "json", "data_files": str(case / "cols.json"), "split": "train"},
        "pre_process_data_config": {"text_template": TEMPLATE},
    }
    train, _ = load_splits(dc, base_dir=case)
    assert len(train) == 40
    assert train[0]["text"] == f"{rows[0]['phrase']} {rows[0]['tone']}"


def test_a_typed_data_reference_is_not_a_split_mapping(tmp_path: Path) -> None:
    """Olive's typed resource as data_files ({type: azureml_datastore, ...}) is read where the job runs: the
    pre-flight neither looks for files named after its keys nor counts its rows as 0 (a split would 'select none')."""
    from orchestrator.engine.data_config_check import check_data_config
    from orchestrator.engine.data_paths import local_data_paths

    ref = {"type": "azureml_datastore", "datastore_name": "workspaceblobstore", "relative_path": "data/tone.jsonl"}
    cfg = {"name": "d", "load_dataset_config": {"data_name": "json", "data_files": ref, "split": "train[:50%]"}}
    assert local_data_paths(cfg, tmp_path) == []
    assert check_data_config(cfg, tmp_path, "data_configs[0]") is None
    _jsonl(tmp_path / "d.jsonl", [{"phrase": "x", "tone": "Joy"}])
    local = {"name": "d", "load_dataset_config": {"data_files": {"type": "file", "config": {"path": "d.jsonl"}}}}
    assert [(f, w) for f, w, _ in local_data_paths(local, tmp_path)] == [("data_files", "d.jsonl")]


# ---- copies never follow a link out of or back into their tree -------------------------------------------------
def test_copies_never_follow_links_out_or_back(tmp_path: Path) -> None:
    from orchestrator.core.errors import UserError
    from orchestrator.core.fs import replace_dir

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "w").write_bytes(b"weights")
    (src / "w.safetensors").symlink_to("../blobs/w")  # a file link out (a Hugging Face cache snapshot)
    (src / "sub" / "x").write_text("x")
    (src / "alias").symlink_to("sub")  # a folder link inside the tree
    replace_dir(src, tmp_path / "dst")
    dst = tmp_path / "dst"
    assert (dst / "w.safetensors").read_bytes() == b"weights" and not (dst / "w.safetensors").is_symlink()
    assert (dst / "alias").is_symlink() and os.readlink(dst / "alias") == "sub"
    for bad in ("..", ".", str(tmp_path / "blobs")):  # back up (loops) and out
        link = src / "sub" / "bad"
        link.symlink_to(bad)
        with pytest.raises(UserError) as err:
            replace_dir(src, tmp_path / "dst2")
        assert "bad" in str(err.value) and len(str(err.value)) < MAX_LINE
        assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs", "dst", "src"]  # nothing half-copied
        link.unlink()


# ---- 3. content, not paths, keys the cache ---------------------------------------------------------------------
def _keys(case: Path, wf: dict[str, Any]) -> list[str]:
    from orchestrator.engine import Engine
    from orchestrator.olive import load_workflow

    return [s.key for s in Engine(load_workflow(wf, base_dir=case), tracking=False).plan()]


def test_copied_model_and_data_keep_their_cache_keys(case: Path) -> None:
    wf = workflow(case)
    first = _keys(case, wf)
    shutil.copytree(case / "m", case / "copies" / "model-copy")
    shutil.copy(case / "d.jsonl", case / "copies" / "data-copy.jsonl")
    wf["input_model"]["model_path"] = "copies/model-copy"
    wf["data_configs"][0]["load_dataset_config"]["data_files"] = str(case / "copies" / "data-copy.jsonl")
    assert _keys(case, wf) == first
    with (case / "copies" / "data-copy.jsonl").open("a") as fh:  # other content: another key
        fh.write(json.dumps({"phrase": "one more", "tone": "Joy"}) + "\n")
    assert _keys(case, wf) != first


def test_split_mapping_of_data_files_is_keyed_by_content(case: Path) -> None:
    wf = workflow(case)
    wf["data_configs"][0]["load_dataset_config"]["data_files"] = {"train": "d.jsonl"}
    first = _keys(case, wf)
    with (case / "d.jsonl").open("a") as fh:
        fh.write(json.dumps({"phrase": "one more", "tone": "Joy"}) + "\n")
    assert _keys(case, wf) != first


def test_a_copied_folder_hits_the_cache_in_a_real_run(case: Path, capsys) -> None:
    rc, out, err = cli(ft("--max_seq_len", "32", "--no-tracking"), capsys)
    assert rc == 0, out + err
    shutil.copytree(case / "m", case / "elsewhere" / "m")
    shutil.copy(case / "d.jsonl", case / "elsewhere" / "data.jsonl")
    args = ft("--max_seq_len", "32", "--no-tracking", model="elsewhere/m", data="elsewhere/data.jsonl", out="out2")
    rc, out, err = cli(args, capsys)
    assert rc == 0, out + err
    assert re.search(r"finetune.*\bhit\b", out + err), out + err
    assert (case / "out2" / "adapter" / "adapter_config.json").is_file()


# ---- 2. the cache heals ----------------------------------------------------------------------------------------
def _entry(case: Path) -> Path:
    (entry,) = (case / ".orch/cache/runs").iterdir()
    return entry


def _notes(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("note: cache entry")]


def test_broken_cache_entries_are_misses_quarantined_once_verified_and_cleaned(case: Path, capsys) -> None:
    args = ft("--max_seq_len", "32", "--no-tracking")
    rc, out, err = cli(args, capsys)
    assert rc == 0, out + err
    entry = _entry(case)
    assert "files" in json.loads((entry / "meta.json").read_text())  # sizes and sha256s recorded at commit
    rc, out, err = cli(["cache", "verify"], capsys)
    assert rc == 0 and "1 sound, 0 damaged" in out, out + err

    # a truncated result.json: a miss, reported once, the pass runs again and the run ends well
    (entry / "result.json").write_text((entry / "result.json").read_text()[:40])
    rc, out, err = cli(args, capsys)
    assert rc == 0, out + err
    (note,) = _notes(out + err)
    assert "result.json" in note and "quarantine" in note
    rc, out, err = cli(args, capsys)
    assert rc == 0 and not _notes(out + err) and re.search(r"finetune.*\bhit\b", out + err), out + err

    # a file of the entry missing: a miss as well
    (_entry(case) / "adapter" / "adapter_model.safetensors").unlink()
    rc, out, err = cli(args, capsys)
    assert rc == 0, out + err
    (note,) = _notes(out + err)
    assert "adapter_model.safetensors is missing" in note

    # a file changed in place (same size): `orch cache verify` finds it, exits 1 and quarantines it
    weights = _entry(case) / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    rc, out, err = cli(["cache", "verify"], capsys)
    assert rc == 1 and "adapter_model.safetensors changed" in out and "0 sound, 1 damaged" in out, out + err
    rc, out, err = cli(["cache", "ls"], capsys)
    assert out.count("damaged") == 3, out  # three quarantined entries, listed as damaged
    rc, out, err = cli(args, capsys)
    assert rc == 0 and re.search(r"finetune.*\brun\b", out + err) and not _notes(out + err), out + err
    rc, out, err = cli(["cache", "clean"], capsys)
    assert rc == 0 and "removed 4 cache entries" in out, out
    assert not any((case / ".orch/cache/quarantine").iterdir()) and not any((case / ".orch/cache/runs").iterdir())


def test_a_model_folder_checked_once_is_remembered_on_the_machine(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config-vs-weights check (torch + transformers imports: seconds) records what matched in ORCH_HOME too, so
    a run with another cache folder skips it; a changed config.json is another digest: checked again, refused."""
    from orchestrator.engine import weights_check as wc

    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    config = json.loads((tiny_model / "config.json").read_text())
    digest = wc.check_weights_match_config(tiny_model, config, "input_model.model_path")
    assert digest == wc.weights_digest(tiny_model)
    wc.remember_matches(tmp_path / "cache-a", {digest})
    assert digest in json.loads((tmp_path / "home" / wc.MEMO_FILE).read_text())
    assert digest in json.loads((tmp_path / "cache-a" / wc.MEMO_FILE).read_text())
    assert digest in wc._recorded(wc.home_memo()) and not (tmp_path / "cache-b").exists()  # another cache: known
    wc.home_memo().unlink()
    assert digest not in wc._recorded(wc.home_memo())
    wc.remember_on_machine({digest})  # a hub snapshot (no workflow cache): the machine's memo alone
    assert digest in wc.machine_matches() and digest in json.loads(wc.home_memo().read_text())

    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    _edit_json(model / "config.json", intermediate_size=config["intermediate_size"] * 2)
    assert wc.weights_digest(model) != digest
    with pytest.raises(wc.WeightsMismatch, match="intermediate_size"):
        wc.check_weights_match_config(model, json.loads((model / "config.json").read_text()), "input_model.model_path",
                                      known=wc.known_matches(tmp_path / "cache-b"))  # fmt: skip


def test_a_damaged_hash_memo_is_only_recomputed(tmp_path: Path) -> None:
    from orchestrator.core.cache import Cache

    cache = Cache(tmp_path / "c")
    (tmp_path / "f").write_text("content")
    first = cache.content_hash(tmp_path / "f")
    (tmp_path / "c" / "hashes.json").write_text('{"truncated": ')
    assert cache.content_hash(tmp_path / "f") == first
    assert json.loads((tmp_path / "c" / "hashes.json").read_text())  # rewritten whole


def test_commit_replaces_a_damaged_entry(tmp_path: Path) -> None:
    from orchestrator.core.cache import Cache
    from orchestrator.core.job import JobResult, JobState

    cache = Cache(tmp_path / "c")
    cache.ensure()
    damaged = cache.entry_dir("k")
    damaged.mkdir(parents=True)
    (damaged / "result.json").write_text('{"job_id": "j", "pass_ty')
    with cache.staging("k") as stage:
        JobResult(job_id="j", pass_type="LoRA", status=JobState.COMPLETED).write(stage)
        entry = cache.commit("k", stage, {"pass": "p"})
    assert entry.result.status == JobState.COMPLETED
    assert [d.reason for d in cache.damaged_entries()] == [d.reason for d in cache.damaged]
    assert len(cache.damaged) == 1 and "not valid JSON" in cache.damaged[0].reason


# ---- 2. the MLflow store heals ---------------------------------------------------------------------------------
MLFLOW_CREATE = "import mlflow, sys; mlflow.MlflowClient(sys.argv[1]).search_experiments()"
TRACKER = """
import sys
from orchestrator.engine.tracking import Tracker
t = Tracker(sys.argv[1], "exp", "run", enabled=True)
print("NOTES", getattr(t, "notes", None), flush=True)
t.end("FINISHED")
"""


def _py(code: str, *args: str, **kw: Any) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **kw)


def _kill_during_creation(code: str, uri: str, folder: Path, delay: float, *watch: str) -> None:
    """Start `code` on a new store, SIGKILL it `delay` seconds after a file matching one of `watch` (globs in
    `folder`: the store, or the temporary store it is built as) appears."""
    proc = _py(code, uri, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120

    def seen() -> bool:
        return any(list(folder.glob(w)) for w in watch)

    while not seen() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_store_half_built_by_a_killed_first_run_is_rebuilt(tmp_path: Path) -> None:
    """MLflow itself killed while it creates mlruns.db leaves a store every later start fails on (reproduced for
    real: the kill lands within the migrations, told by the file's growth); orch's next start rebuilds it aside
    and tracks."""
    import mlflow

    db = tmp_path / "mlruns.db"
    uri = f"sqlite:///{db}"
    broken = ""
    for size in (200_000, 400_000, 100_000, 600_000, 300_000, 800_000):  # bytes written when killed (whole: ~950 k)
        for f in tmp_path.glob("mlruns.db*"):
            f.unlink()
        proc = _py(MLFLOW_CREATE, uri, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not (db.exists() and db.stat().st_size >= size):
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        check = _py(MLFLOW_CREATE, uri, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = check.communicate(timeout=240)
        if check.returncode != 0:
            broken = err.strip().splitlines()[-1]
            break
    assert broken, "could not reproduce a half-built store by killing MLflow during creation"
    proc = _py(TRACKER, uri, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "half-built" in out and "rebuilt" in out, out
    assert list(tmp_path.glob("mlruns.db.broken-*"))  # the broken file is kept beside it
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.status == "FINISHED"


def test_orch_killed_while_creating_the_store_leaves_it_whole(tmp_path: Path) -> None:
    db = tmp_path / "mlruns.db"
    uri = f"sqlite:///{db}"
    for delay in (0.0, 0.3, 0.8):
        for f in tmp_path.glob("*mlruns.db*"):  # a new store each time (the leftovers of the last kill too)
            f.unlink()
        _kill_during_creation(TRACKER, uri, tmp_path, delay, ".mlruns.db.building-*", "mlruns.db")
        assert not db.exists() or db.stat().st_size > 0
        proc = _py(TRACKER, uri, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        assert "half-built" not in out  # built aside: there was nothing to repair
        assert not list(tmp_path.glob(".mlruns.db.building-*"))  # the killed one's leftover removed


def test_a_store_with_runs_from_another_schema_is_one_line(case: Path, capsys) -> None:
    import sqlite3

    from orchestrator.engine.tracking import Tracker

    uri = f"sqlite:///{case / 'old.db'}"
    Tracker(uri, "exp", "run").end("FINISHED")
    with sqlite3.connect(case / "old.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0584bdc529eb'")
    rc, out, err = cli(ft("--tracking-uri", uri), capsys)
    line = assert_one_line(rc, out, err, "old.db", "mlflow db upgrade", "1 run(s)")
    assert "internal error" not in line


# ---- 5. no secret in any file or line a run writes --------------------------------------------------------------
def test_secret_shapes_are_masked_in_every_line() -> None:
    from orchestrator.core.redact import mask, masked_output, redact, redact_obj

    for secret in (
        HF,
        "ghp_" + "a1" * 18,
        "sk-" + "Zz9" * 8,
        "AKIA" + "ABCDEFGHIJKLMNOP",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abcdefghijklmnop",
    ):
        assert secret not in redact(f"token {secret} in a line"), secret
    assert "s3cr3t" not in redact("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=s3cr3t==;EndpointSuffix=x")
    assert "s3cr3t" not in redact("Authorization: Bearer s3cr3ts3cr3ts3cr3t")
    assert redact_obj({"hub_token": "plain-value", "pad_token": "<pad>"}) == {"hub_token": "***", "pad_token": "<pad>"}
    import io
    import logging

    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    logging.getLogger("some.library").addHandler(handler)
    try:
        with masked_output(["exact-known-value"]):
            logging.getLogger("some.library").warning("View run at https://bob:exact-known-value@host/#/runs/1")
            print("the library printed exact-known-value")
            assert mask("x exact-known-value y") == "x *** y"
    finally:
        logging.getLogger("some.library").removeHandler(handler)
    assert "exact-known-value" not in sink.getvalue() and "***" in sink.getvalue()


def test_runner_puts_a_config_secret_back_only_in_its_process(tmp_path: Path) -> None:
    from orchestrator.core.job import Job
    from orchestrator.core.secrets import CONFIG_SECRET, secret_files, split_secrets
    from orchestrator.runner import _with_config_secrets

    config = {"train_data_config": "d", "training_args": {"hub_token": HF, "max_steps": 1}}
    spec, found = split_secrets(config)
    assert found == {"training_args.hub_token": HF} and HF not in json.dumps(spec)
    sources = secret_files({f"{CONFIG_SECRET}pass:{k}": v for k, v in found.items()}, tmp_path / "private")
    job = Job(job_id="j", pass_name="p", pass_type="LoRA", pass_config=spec, output_dir=str(tmp_path), secrets=sources)
    assert HF not in job.model_dump_json()
    assert oct((tmp_path / "private").stat().st_mode & 0o777) == "0o700"
    from orchestrator.runner import resolve_secret

    resolved = _with_config_secrets(job, {n: resolve_secret(s) for n, s in job.secrets.items()})
    assert resolved.pass_config["training_args"]["hub_token"] == HF
    sas = "https://acct.blob.core.windows.net/c/train.jsonl?sv=2024&sig=S1gnature%2Bvalue"
    spec, found = split_secrets({"load_dataset_config": {"data_files": [sas]}})
    assert found == {"load_dataset_config.data_files.0": sas} and "S1gnature" not in json.dumps(spec)
    assert "train.jsonl?sv=2024&sig=***" in json.dumps(spec)  # the rest still tells two files apart


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    folder = tmp_path / "server"
    folder.mkdir()
    port = _free_port()
    cmd = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--default-artifact-root", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = (folder / "server.log").open("wb")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None, (folder / "server.log").read_text()[-2000:]
            time.sleep(0.5)
    yield port, folder
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


def test_a_tracked_run_writes_no_secret_anywhere(case: Path, mlflow_server) -> None:
    """A hub token in training_args, a tracking URI with user:password (MLflow prints "View run ... at <uri>")
    and a token in the environment: the run completes, and no file it writes (cache, output, MLflow's store and
    artifacts, logs) nor any line it prints holds any of them."""
    port, server = mlflow_server
    password = "pw-" + "Q7x" * 6
    env_token = "hf_" + "EnvToken" * 4
    wf = workflow(case)
    wf["passes"]["lora"]["training_args"].update(hub_token=HF)
    wf["engine"]["mlflow"] = {"tracking_uri": f"http://alice:{password}@127.0.0.1:{port}"}
    (case / "wf.json").write_text(json.dumps(wf))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_TOKEN": env_token, "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "--config", "wf.json", "-v"],
        cwd=case, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    shown = [ln for ln in text.splitlines() if "mlflow: run" in ln or "alice" in ln]
    assert "mlflow: run" in text and "alice:***@" in text, shown  # the run's address, masked
    job = json.loads(next((case / "cache" / "runs").glob("*/job.json")).read_text())
    assert "secret passed to the job by reference" in job["pass_config"]["training_args"]["hub_token"]
    assert any(n.startswith("config:pass:") for n in job["secrets"])
    secrets = [HF, password, env_token]
    leaks = [s for s in secrets if s in text]
    for root in (case, server):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path != case / "wf.json":  # wf.json: the user's input
                data = path.read_bytes()
                leaks += [f"{path}: {s[:6]}..." for s in secrets if s.encode() in data]
    assert leaks == [] and not list(Path("/tmp").glob("orch-secrets-*/secret-*")), leaks


# ---- 6. failures a user causes mid-run are one line too ----------------------------------------------------------
def test_a_full_output_disk_is_one_line_with_the_space_needed(case: Path) -> None:
    """output_dir on a 1 MB filesystem (a tmpfs in a private mount namespace): the passes run (their results stay
    in the cache), publishing is refused in one line naming the folder and the sizes, nothing half-written."""
    small = case / "small"
    small.mkdir()
    orch = shlex.join(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            *map(str, ft("--max_seq_len", "32", "--no-tracking", out=str(small / "out"))),
        ]
    )
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {small} && cd {case} && {orch} > {case}/stdout 2> {case}/stderr; rc=$?; "
        f"find {small} > {case}/listing; exit $rc"
    )
    unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--mount", "--map-root-user"]
    proc = subprocess.run(
        [*unshare, "sh", "-c", script], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )  # fmt: skip
    err = (case / "stderr").read_text()
    line = assert_one_line(proc.returncode, (case / "stdout").read_text(), err, "disk is full", alone=False)
    assert str(small / "out") in line and "MB free" in line and "needs" in line
    listing = (case / "listing").read_text().split()
    assert not [p for p in listing if ".orch-versions/" in p and not p.endswith(".orch-versions")], listing
    assert any((case / ".orch/cache/runs").iterdir())  # the pass itself is cached: a rerun only publishes


def test_a_failing_pass_named_with_a_slash_keeps_its_log(case: Path, capsys) -> None:
    wf = workflow(case)
    wf["passes"] = {"team/lora v2": wf["passes"]["lora"]}
    wf["engine"]["log_severity_level"] = 3  # job logs are not streamed: the one line and its log file
    _edit_json(case / "m/config.json", hidden_act="no_such_activation")
    rc, out, err = cli(run_config(case, wf, "wf.json", "--no-tracking"), capsys)
    line = assert_one_line(rc, out, err, "pass 'team/lora v2' (LoRA) failed", "full log: ", code=1, alone=False)
    log = Path(line.split("full log: ", 1)[1].strip())
    assert log.parent == case / "cache" / "logs" and log.name.startswith("team_lora_v2-")
    assert "Traceback" in log.read_text()
