"""Bad and edge inputs, tried as a new user would: each stops before any compute with exit != 0, ONE line
`orch: error: ...` naming the field and the fix, no traceback, and nothing written (the case folder, the shared
tiny model and the working directory are byte-for-byte as before).

The CLI runs in-process (orchestrator.cli.run_cli, the same function `orch` calls), so the ~80 validation cases
take seconds. The few cases that need real work (a pass that fails inside, publish, MLflow concurrency, a run
killed with -9) come after them and share the session's tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "{phrase} {tone}"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with (size, mtime_ns): 'nothing written' means this does not change."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns if p.is_file() else 0)
    return out


@pytest.fixture(scope="module")
def model_snapshot(tiny_model: Path):
    before = snapshot(tiny_model)
    yield
    assert snapshot(tiny_model) == before, "a case modified the shared tiny model"


@pytest.fixture
def case(tmp_path: Path, tone_rows: list[dict[str, str]], tiny_model: Path, monkeypatch, model_snapshot) -> Path:
    """A working directory with d.jsonl (the tone rows) and a copy of the tiny model at m/ (cases may break it)."""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tone_rows[:40]))
    shutil.copytree(tiny_model, tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run_cli([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line(rc: int, out: str, err: str, *needles: str, code: int = 2, alone: bool = True) -> str:
    """Exit code, no traceback, exactly one `orch: error:` line holding the needles (and, before any compute,
    nothing else on stderr: `alone`)."""
    text = out + err
    assert "Traceback" not in text, text
    assert rc == code, text
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("orch: error: ")]
    assert len(errors) == 1 and (len(lines) == 1 or not alone), text
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def ft(
    *extra: Any, model: str = "m", data: str | None = "d.jsonl", template: str | None = TEMPLATE, out: str = "out"
) -> list[Any]:
    args: list[Any] = ["finetune", "-m", model, "-d", "json", "-o", out, "--max_steps", "1"]
    if data is not None:
        args += ["--data_files", data]
    if template is not None:
        args += ["--text_template", template]
    return args + list(extra)


# ---- case table: (id, setup(case dir) -> argv, expected exit, substrings of the one line) ------------------
def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def workflow(case: Path, **top: Any) -> dict[str, Any]:
    """A small valid workflow (LoRA on the case's model and data) to break one field at a time."""
    wf: dict[str, Any] = {
        "workflow_id": "bad-inputs",
        "input_model": {"type": "HfModel", "model_path": "m"},
        "data_configs": [
            {
                "name": "d",
                "type": "HuggingfaceContainer",
                "load_dataset_config": {"data_name": "json", "data_files": "d.jsonl", "split": "train"},
                "pre_process_data_config": {"text_template": TEMPLATE, "source_max_len": 32},
            }
        ],
        "passes": {"lora": {"type": "LoRA", "train_data_config": "d", "lora_r": 4, "training_args": {"max_steps": 1}}},
        "engine": {"output_dir": "out", "cache_dir": "cache"},
    }
    wf.update(top)
    return wf


def run_config(case: Path, wf: Any, name: str = "wf.json", *extra: str) -> list[Any]:
    path = case / name
    if isinstance(wf, (bytes, str)):
        _write(path, wf)
    elif name.endswith((".yaml", ".yml")):
        path.write_text(yaml.safe_dump(wf))
    else:
        path.write_text(json.dumps(wf))
    return ["run", "--config", path, *extra]


def _wf_with(case: Path, path: str, value: Any) -> dict[str, Any]:
    """workflow(case) with one dotted path set (ints index lists)."""
    wf = workflow(case)
    node: Any = wf
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return wf


CASES: list[tuple[str, Any, int, tuple[str, ...]]] = [
    # training arguments: types and ranges (Olive forwards unknown flags into TrainingArguments)
    ("max_steps_word", lambda c: ft("--max_steps", "ten"), 2, ("training_args.max_steps", "whole number", "'ten'")),
    ("max_steps_zero", lambda c: ft("--max_steps", "0"), 2, ("training_args.max_steps", ">= 1")),
    ("lr_negative", lambda c: ft("--learning_rate", "-1e-4"), 2, ("training_args.learning_rate", "> 0")),
    ("lr_word", lambda c: ft("--learning_rate", "fast"), 2, ("learning_rate", "expected a number")),
    ("batch_zero", lambda c: ft("--per_device_train_batch_size", "0"), 2, ("per_device_train_batch_size", ">= 1")),
    ("batch_fraction", lambda c: ft("--per_device_train_batch_size", "1.5"), 2, ("whole number", "1.5")),
    ("eval_batch_zero", lambda c: ft("--per_device_eval_batch_size", "0"), 2, ("per_device_eval_batch_size",)),
    ("grad_accum_zero", lambda c: ft("--gradient_accumulation_steps", "0"), 2, ("gradient_accumulation_steps",)),
    ("epochs_negative", lambda c: ft("--num_train_epochs", "-1"), 2, ("num_train_epochs", "> 0")),
    ("warmup_negative", lambda c: ft("--warmup_steps", "-5"), 2, ("warmup_steps", ">= 0")),
    ("weight_decay_negative", lambda c: ft("--weight_decay", "-0.1"), 2, ("weight_decay",)),
    ("bf16_word", lambda c: ft("--bf16", "maybe"), 2, ("training_args.bf16", "true or false")),
    ("seed_negative", lambda c: ft("--seed", "-1"), 2, ("training_args.seed",)),
    ("logging_steps_zero", lambda c: ft("--logging_steps", "0"), 2, ("logging_steps", "> 0")),
    ("unknown_training_arg", lambda c: ft("--learning_rat", "1e-4"), 2, ("learning_rat", "did you mean")),
    # orch's own flags
    ("lora_r_word", lambda c: ft("--lora_r", "x"), 2, ("--lora_r", "integer")),
    ("lora_r_zero", lambda c: ft("--lora_r", "0"), 2, ("lora_r", "greater than 0")),
    ("lora_dropout_one", lambda c: ft("--lora_dropout", "1.5"), 2, ("lora_dropout", "less than 1")),
    ("lora_alpha_negative", lambda c: ft("--lora_alpha", "-1"), 2, ("lora_alpha",)),
    ("max_seq_len_zero", lambda c: ft("--max_seq_len", "0"), 2, ("max_seq_len", "greater than 0")),
    ("max_seq_len_word", lambda c: ft("--max_seq_len", "long"), 2, ("--max_seq_len",)),
    ("missing_output", lambda c: ["finetune", "-m", "m", "-d", "json"], 2, ("Missing option", "--output_path")),
    ("method_unknown", lambda c: ft("--method", "lorax"), 2, ("--method 'lorax'", "lora, qlora, dora, loha, lokr")),
    ("no_text_source", lambda c: ft(template=None), 2, ("no column 'text'",)),  # Olive's default text column
    ("unknown_command", lambda c: ["finetun"], 2, ("No such command", "finetune")),
    ("unexpected_argument", lambda c: ft("stray"), 2, ("unexpected argument 'stray'",)),
    # the input model
    ("model_missing", lambda c: ft(model="./nope"), 2, ("input_model.model_path", "not found")),
    # a hub id that the (offline, by the suite's default) hub cache lacks: the id and how to get a local copy
    ("model_hub_name", lambda c: ft(model="someone/some-model"), 2,
     ("input_model.model_path: model someone/some-model", "hf download someone/some-model")),
    ("model_is_file", lambda c: ft(model="m/config.json"), 2, ("input_model.model_path", "is a file")),
    (
        "model_empty_folder",
        lambda c: (c / "empty").mkdir() or ft(model="empty"),
        2,
        ("has no config.json",),
    ),
    (
        "config_json_corrupt",
        lambda c: _write(c / "m/config.json", "{not json") and ft(),
        2,
        ("config.json is not valid JSON",),
    ),
    (
        "config_json_no_model_type",
        lambda c: _edit_json(c / "m/config.json", model_type=None) or ft(),
        2,
        ("has no model_type",),
    ),
    ("no_weights", lambda c: (c / "m/model.safetensors").unlink() or ft(), 2, ("has no weights",)),
    (
        "safetensors_garbage",
        lambda c: _write(c / "m/model.safetensors", b"\x00garbage" * 10) and ft(),
        2,
        ("model.safetensors is not a valid safetensors file",),
    ),
    (
        "safetensors_truncated",
        lambda c: _truncate(c / "m/model.safetensors", 100_000) or ft(),
        2,
        ("model.safetensors is truncated",),
    ),
    ("no_tokenizer", lambda c: (c / "m/tokenizer.json").unlink() or ft(), 2, ("has no tokenizer",)),
    (
        "tokenizer_corrupt",
        lambda c: _write(c / "m/tokenizer.json", "{") and ft(),
        2,
        ("tokenizer.json is not valid JSON",),
    ),
    (
        "adapter_missing",
        lambda c: ["auto-opt", "-m", "m", "--adapter_path", "nope", "-o", "out"],
        2,
        ("input_model.adapter_path", "not found"),
    ),
    (
        "adapter_is_file",
        lambda c: ["auto-opt", "-m", "m", "--adapter_path", "d.jsonl", "-o", "out"],
        2,
        ("input_model.adapter_path", "is a file"),
    ),
    (
        "adapter_no_config",
        lambda c: (c / "ad").mkdir() or ["auto-opt", "-m", "m", "--adapter_path", "ad", "-o", "out"],
        2,
        ("no adapter_config.json",),
    ),
    (
        "output_replaces_input",
        lambda c: shutil.copytree(c / "m", c / "o/model") and ft(model="o/model", out="o"),
        2,
        ("is inside the output folder", "o/model"),
    ),
    # data
    ("data_missing", lambda c: ft(data="nope.jsonl"), 2, ("data_files", "nope.jsonl'", "not found")),
    ("data_empty", lambda c: _write(c / "e.jsonl", "") and ft(data="e.jsonl"), 2, ("e.jsonl is empty",)),
    (
        "data_blank_lines",
        lambda c: _write(c / "b.jsonl", "\n\n  \n") and ft(data="b.jsonl"),
        2,
        ("b.jsonl has no rows",),
    ),
    (
        "data_bad_json_line",
        lambda c: _write(c / "b.jsonl", '{"phrase": "a", "tone": "Joy"}\n{oops\n') and ft(data="b.jsonl"),
        2,
        ("b.jsonl line 2 is not valid JSON",),
    ),
    (
        "data_rows_not_objects",
        lambda c: _write(c / "b.jsonl", "1\n2\n") and ft(data="b.jsonl"),
        2,
        ("rows must be JSON objects",),
    ),
    ("data_not_utf8", lambda c: _write(c / "b.jsonl", b"\xff\xfe\x00bad") and ft(data="b.jsonl"), 2, ("UTF-8",)),
    ("template_column_missing", lambda c: ft(template="{phrase} {mood}"), 2, ("no column 'mood'", "phrase, tone")),
    ("template_empty_field", lambda c: ft(template="{phrase} {}"), 2, ("text_template", "empty {} field")),
    (
        "text_field_missing",
        lambda c: ft("--text_field", "body", template=None),
        2,
        ("no column 'body'",),
    ),
    ("glob_no_match", lambda c: ft(data="shards/*.jsonl"), 2, ("shards/*.jsonl'", "matches no file")),
    ("json_without_files", lambda c: ft(data=None), 2, ("data_name 'json' needs data_files",)),
    (
        "data_folder_empty",
        lambda c: (c / "dd").mkdir() or ["finetune", "-m", "m", "-d", "./dd", "--text_template", TEMPLATE, "-o", "o"],
        2,
        ("holds no data file",),
    ),
    (
        "data_name_path_missing",
        lambda c: ["finetune", "-m", "m", "-d", "./gone", "--text_template", TEMPLATE, "-o", "o"],
        2,
        ("data_name", "gone'", "not found"),
    ),
    (
        "csv_column_missing",
        lambda c: _write(c / "t.csv", "text,label\nhello,1\n") and ft(data="t.csv"),
        2,
        ("t.csv has no column 'phrase'",),
    ),
    (
        "brackets_survive",
        lambda c: ft(data="data[train].jsonl"),
        2,
        ("data[train].jsonl'", "matches no file"),
    ),
    (
        "split_syntax",
        lambda c: ft("--train_split", "train[:80%", "--eval_split", "train[80%:]"),
        2,
        ("split 'train[:80%'", "not a split expression"),
    ),
    (
        "split_name_not_in_files",
        lambda c: ft("--train_split", "train", "--eval_split", "validation"),
        2,
        ("passes.finetune.eval_split 'validation'", "one split, 'train'"),
    ),
    # outputs, cache, names
    ("output_is_file", lambda c: ft(out="d.jsonl"), 2, ("engine.output_dir", "d.jsonl is a file")),
    ("output_under_file", lambda c: ft(out="d.jsonl/sub"), 2, ("so the folder cannot be created",)),
    (
        "workflow_id_slash",
        lambda c: run_config(c, workflow(c, workflow_id="team/model")),
        2,
        ("workflow_id 'team/model'", "letters, digits"),
    ),
    (
        "workflow_id_colon",
        lambda c: run_config(c, workflow(c, workflow_id="model:v1")),
        2,
        ("workflow_id 'model:v1'",),
    ),
    (
        "register_name_space",
        lambda c: run_config(c, _wf_with(c, "engine.mlflow", {"register_model_name": "my model"})),
        2,
        ("engine.mlflow.register_model_name",),
    ),
    (
        "cache_dir_is_file",
        lambda c: run_config(c, _wf_with(c, "engine.cache_dir", "d.jsonl")),
        2,
        ("engine.cache_dir", "is a file"),
    ),
    # workflow files
    ("config_missing", lambda c: ["run", "--config", "nope.json"], 2, ("nope.json not found",)),
    ("config_bad_json", lambda c: run_config(c, '{"input_model": }'), 2, ("invalid JSON at line 1",)),
    ("config_bad_yaml", lambda c: run_config(c, "a: [1,\n", "wf.yaml"), 2, ("invalid YAML",)),
    ("config_not_mapping", lambda c: run_config(c, "[1, 2]"), 2, ("must be a mapping",)),
    (
        "config_unknown_pass",
        lambda c: run_config(c, _wf_with(c, "passes.lora.type", "LoRa2")),
        2,
        ("passes.lora.type", "unknown pass type"),
    ),
    ("config_unknown_key", lambda c: run_config(c, workflow(c, pases={})), 2, ("pases", "unknown key")),
    (
        "config_bad_host",
        lambda c: run_config(c, _wf_with(c, "engine.host", "lokal")),
        2,
        ("engine.host", "'lokal'", "did you mean 'local'"),
    ),
    (
        "config_log_level",
        lambda c: run_config(c, _wf_with(c, "engine.log_severity_level", 9)),
        2,
        ("engine.log_severity_level",),
    ),
    (
        "config_max_steps_word_yaml",
        lambda c: run_config(c, _wf_with(c, "passes.lora.training_args", {"max_steps": "ten"}), "wf.yaml"),
        2,
        ("passes.lora.training_args.max_steps", "'ten'"),
    ),
    (
        "config_data_list_missing_entry",
        lambda c: run_config(c, _wf_with(c, "data_configs.0.load_dataset_config.data_files", ["d.jsonl", "x.jsonl"])),
        2,
        ("data_files[1]", "x.jsonl'", "not found"),
    ),
    (
        "config_data_ref_unknown",
        lambda c: run_config(c, _wf_with(c, "passes.lora.train_data_config", "dd")),
        2,
        ("passes.lora.train_data_config", "'dd' is not a data config"),
    ),
    # tracking
    (
        "tracking_db_under_file",
        lambda c: ft("--tracking-uri", f"sqlite:///{c}/d.jsonl/mlruns.db"),
        2,
        ("tracking URI", "is a file"),
    ),
    (
        "tracking_db_is_folder",
        lambda c: (c / "db").mkdir() or ft("--tracking-uri", f"sqlite:///{c}/db"),
        2,
        ("tracking URI", "is a folder"),
    ),
    # Olive's other commands
    ("quantize_precision", lambda c: ["quantize", "-m", "m", "--precision", "fp8", "-o", "q"], 2, ("'fp8'",)),
    ("quantize_algorithm", lambda c: ["quantize", "-m", "m", "--algorithm", "hqq", "-o", "q"], 2, ("HQQ quantizes",)),
    ("auto_opt_device", lambda c: ["auto-opt", "-m", "m", "--device", "npu", "-o", "o"], 2, ("--device 'npu'", "QNN")),
    (
        "auto_opt_cost_model",
        lambda c: ["auto-opt", "-m", "m", "--cost-model", "cost.csv", "--memory", "16", "-o", "o"],
        2,
        ("--cost-model", "--num-splits N"),
    ),
    ("auto_opt_precision", lambda c: ["auto-opt", "-m", "m", "--precision", "int2", "-o", "o"], 2, ("'int2'",)),
    ("auto_opt_provider", lambda c: ["auto-opt", "-m", "m", "--provider", "Foo", "-o", "o"], 2, ("'Foo'",)),
    (
        "generate_not_onnx",
        lambda c: ["generate", "-m", "m", "-p", "hi"],
        2,
        ("no genai_config.json",),
    ),
]


@pytest.mark.parametrize(("argv", "code", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_compute(case: Path, capsys, argv, code, needles) -> None:
    args = argv(case)
    before = snapshot(case)
    started = time.monotonic()
    rc, out, err = cli(args, capsys)
    assert_one_line(rc, out, err, *needles, code=code)
    assert snapshot(case) == before, "the case wrote files"
    assert time.monotonic() - started < 20


def test_there_are_at_least_60_cases() -> None:
    assert len(CASES) + 3 >= 60  # + the dead-server, secret and concurrency cases below


def test_dead_tracking_server_fails_in_seconds_with_secrets_masked(case: Path, capsys) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = snapshot(case)
    started = time.monotonic()
    rc, out, err = cli(ft("--tracking-uri", f"http://alice:s3cret@127.0.0.1:{port}"), capsys)
    line = assert_one_line(rc, out, err, "does not answer", "alice:***@", "--no-tracking")
    assert "s3cret" not in out + err and "s3cret" not in line
    assert time.monotonic() - started < 10
    assert snapshot(case) == before


def test_secret_forms_are_redacted() -> None:
    from orchestrator.engine.tracking import flatten_params, redact, redact_obj

    assert redact("https://u:pw@host:5000/x") == "https://u:***@host:5000/x"
    assert redact("https://ghp_tok@host") == "https://***@host"
    assert redact("https://acct.blob.core.windows.net/c?sv=1&sig=abc%2F&se=2") == (
        "https://acct.blob.core.windows.net/c?sv=1&sig=***&se=2"
    )
    assert redact("sqlite:////tmp/mlruns.db") == "sqlite:////tmp/mlruns.db"
    assert redact_obj({"a": ["http://x:y@h"]}) == {"a": ["http://x:***@h"]}
    params = flatten_params({"engine": {"mlflow": {"tracking_uri": "https://bob:hunter2@mlflow.example"}}})
    assert "hunter2" not in json.dumps(params)


def test_text_template_keeps_non_ascii() -> None:
    from orchestrator.olive.finetune import finetune_workflow

    wf = finetune_workflow(
        model_name_or_path="m",
        output_path="o",
        data_name="json",
        data_files="d.jsonl",
        text_template="<|user|>\\n{prompt} — café 日本語\\t{x}",
    )
    assert wf["data_configs"][0]["pre_process_data_config"]["text_template"] == "<|user|>\n{prompt} — café 日本語\t{x}"


def test_awq_on_cpu_goes_through_the_cli(case: Path, capsys) -> None:
    """`quantize --algorithm awq` plans on a machine without CUDA (the pass decides by the model's size)."""
    args = ["quantize", "-m", "m", "--algorithm", "awq", "-o", "q", "-d", "json", "--data_files", "d.jsonl"]
    rc, out, err = cli([*args, "--text_field", "phrase", "--dry-run"], capsys)
    assert rc == 0, out + err
    assert "1 pass(es) would run" in out


# ---- cache keys -----------------------------------------------------------------------------------------------
def _keys(case: Path, data_files: Any) -> list[str]:
    from orchestrator.engine import Engine
    from orchestrator.olive import load_workflow

    wf = load_workflow(_wf_with(case, "data_configs.0.load_dataset_config.data_files", data_files), base_dir=case)
    return [s.key for s in Engine(wf, tracking=False).plan()]


def test_cache_keys_cover_lists_globs_and_folders_by_content(case: Path) -> None:
    shards = case / "shards"
    shards.mkdir()
    lines = (case / "d.jsonl").read_text().splitlines(keepends=True)
    (shards / "a.jsonl").write_text("".join(lines[:20]))
    (shards / "b.jsonl").write_text("".join(lines[20:]))
    forms = {
        "list": ["shards/a.jsonl", "shards/b.jsonl"],
        "glob": "shards/*.jsonl",
        "list_of_globs": ["shards/a*.jsonl", "shards/b*.jsonl"],
    }
    before = {name: _keys(case, files) for name, files in forms.items()}
    (shards / "b.jsonl").write_text("".join(lines[20:39]))  # the second file changes: every form's key changes
    after = {name: _keys(case, files) for name, files in forms.items()}
    for name in forms:
        assert before[name] != after[name], name
    (shards / "b.jsonl").write_text("".join(lines[20:]))  # back to the old content: the old keys again
    assert {name: _keys(case, files) for name, files in forms.items()} == before
    (shards / "c.jsonl").write_text(lines[0])  # a new file the glob matches
    assert _keys(case, "shards/*.jsonl") != before["glob"]


def test_cache_key_covers_a_data_folder(case: Path) -> None:
    from orchestrator.engine import Engine
    from orchestrator.olive import load_workflow

    (case / "dd").mkdir()
    shutil.copy(case / "d.jsonl", case / "dd" / "train.jsonl")
    wf = workflow(case)
    wf["data_configs"][0]["load_dataset_config"] = {"data_name": "./dd", "split": "train"}

    def key() -> str:
        return Engine(load_workflow(wf, base_dir=case), tracking=False).plan()[0].key

    first = key()
    with (case / "dd" / "train.jsonl").open("a") as fh:
        fh.write(json.dumps({"phrase": "new row", "tone": "Joy"}) + "\n")
    assert key() != first


# ---- MLflow tracking -------------------------------------------------------------------------------------------
TRACKER = """
import sys, time
from orchestrator.engine.tracking import Tracker
t = Tracker(sys.argv[1], "exp", "run", enabled=True)
print(t.run_id, flush=True)
if len(sys.argv) > 2:
    time.sleep(600)
t.end("FINISHED")
"""


def _py(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", TRACKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_concurrent_first_runs_share_a_new_sqlite_db(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    procs = [_py(uri) for _ in range(4)]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
    run_ids = {out.strip() for out, _ in results}
    assert len(run_ids) == 4
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.run_id for r in runs} == run_ids
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_run_killed_with_9_is_closed_as_killed_by_the_next(tmp_path: Path) -> None:
    import mlflow

    from orchestrator.engine.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    victim = _py(uri, "hang")
    run_id = victim.stdout.readline().strip()
    assert run_id, victim.stderr.read()
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    nxt = Tracker(uri, "exp", "run")
    assert run_id in nxt.closed_stale
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(nxt.run_id).info.status == "RUNNING"  # a live run is never closed
    again = Tracker(uri, "exp", "run")
    assert nxt.run_id not in again.closed_stale
    nxt.end("FINISHED")
    again.end("FINISHED")


# ---- a failure inside a pass, and publishing -------------------------------------------------------------------
def test_failure_inside_a_pass_is_one_line_with_the_log_path(case: Path, capsys) -> None:
    """An activation transformers does not have passes every pre-flight check (the weights fit the config) but
    fails when the LoRA pass builds the model: one line naming the pass, the input and the cause; the traceback
    is in the log file it names; no output folder, no cache entry. (Weights that do not fit config.json are a
    pre-flight error now: tests/test_reliability.py.)"""
    _edit_json(case / "m/config.json", hidden_act="no_such_activation")
    rc, out, err = cli(ft("--max_seq_len", "32", "--no-tracking"), capsys)
    line = assert_one_line(
        rc, out, err, "pass 'finetune' (LoRA) failed", str(case / "m"), "full log: ", code=1, alone=False
    )
    log = Path(line.split("full log: ", 1)[1].strip())
    assert log.is_file() and "Traceback" in log.read_text()
    assert not (case / "out").exists()
    assert not any((case / ".orch/cache/runs").iterdir())


def _nlinks(folder: Path) -> set[int]:
    return {p.stat().st_nlink for p in folder.rglob("*") if p.is_file()}


def test_outputs_are_copies_and_publish_is_atomic(case: Path, capsys, monkeypatch) -> None:
    """auto-opt --precision fp32 then quantize --algorithm rtn on its output (onnx refused hard-linked external
    data); editing an output in place leaves the cache alone; model + manifest switch together."""
    rc, out, err = cli(["auto-opt", "-m", "m", "--precision", "fp32", "-o", "fp32", "--no-tracking"], capsys)
    assert rc == 0, out + err
    model = case / "fp32" / "model"
    assert _nlinks(model) == {1}
    assert _nlinks(case / ".orch/cache/runs") == {1}
    rc, out, err = cli(["quantize", "-m", "fp32/model", "--algorithm", "rtn", "-o", "q", "--no-tracking"], capsys)
    assert rc == 0, out + err
    assert (case / "q/model").is_dir() and _nlinks(case / "q/model") == {1}

    # an in-place edit of an output does not reach the cache: the next run republishes the cached original
    target = next(model.glob("*.onnx"))
    original = target.read_bytes()
    with target.open("r+b") as fh:
        fh.write(b"\0" * 16)
    manifest = json.loads((case / "fp32/manifest.json").read_text())
    rc, out, err = cli(["auto-opt", "-m", "m", "--precision", "fp32", "-o", "fp32", "--no-tracking"], capsys)
    assert rc == 0, out + err
    assert target.read_bytes() == original
    again = json.loads((case / "fp32/manifest.json").read_text())
    assert again["final_model"]["sha256"] == manifest["final_model"]["sha256"]
    assert again["created_at"] >= manifest["created_at"]

    # a publish killed midway (a version folder without its manifest, never switched to) changes nothing the
    # user sees, and the next publish removes it
    versions = case / "fp32/.orch-versions"
    current = os.readlink(case / "fp32/.orch-current")
    half = versions / "19700101T000000-dead"
    shutil.copytree(model, half / "model")
    assert os.readlink(case / "fp32/.orch-current") == current
    assert (
        json.loads((case / "fp32/manifest.json").read_text())["final_model"]["sha256"] == again["final_model"]["sha256"]
    )
    rc, out, err = cli(["auto-opt", "-m", "m", "--precision", "fp32", "-o", "fp32", "--no-tracking"], capsys)
    assert rc == 0, out + err
    assert not half.exists() and len(list(versions.iterdir())) == 1
    assert (case / "fp32/model").resolve().parent == (case / "fp32/manifest.json").resolve().parent

    # an Azure ML job output (the service commits it whole and uploads files, not links) is written flat
    flat = case / "flat"
    monkeypatch.setenv("AZURE_ML_OUTPUT_MODEL", str(flat))
    rc, out, err = cli(["auto-opt", "-m", "m", "--precision", "fp32", "-o", "flat", "--no-tracking"], capsys)
    assert rc == 0, out + err
    assert not (flat / "model").is_symlink() and (flat / "model").is_dir() and _nlinks(flat / "model") == {1}
    assert json.loads((flat / "manifest.json").read_text())["final_model"]["sha256"] == again["final_model"]["sha256"]


def test_valid_inputs_in_every_form_pass_the_checks(case: Path, capsys) -> None:
    """No false alarms: JSON lines, a JSON array, a JSON mapping of columns, CSV, a glob, a folder, a
    non-ASCII template, a model given through a symlink all pass the checks (dry run: nothing is computed)."""
    rows = [json.loads(line) for line in (case / "d.jsonl").read_text().splitlines()]
    _write(case / "arr.json", json.dumps(rows, indent=2))
    _write(case / "cols.json", json.dumps({k: [r[k] for r in rows] for k in rows[0]}, indent=2))
    _write(case / "t.csv", "phrase,tone\n" + "".join(f'"{r["phrase"]}",{r["tone"]}\n' for r in rows))
    (case / "shards").mkdir()
    shutil.copy(case / "d.jsonl", case / "shards" / "a.jsonl")
    (case / "link").symlink_to(case / "m")
    forms = [
        ft(),
        ft(data="arr.json"),
        ft(data="cols.json"),
        ft(data="t.csv"),
        ft(data="shards/*.jsonl"),
        ft("--train_split", "train[:80%]", "--eval_split", "train[80%:]"),
        ft(template="<|user|>\\n{phrase} — «café»\\n<|assistant|>\\n{tone}"),
        ft(model="link"),
        ["finetune", "-m", "m", "-d", "./shards", "--text_template", TEMPLATE, "-o", "o"],
    ]
    for args in forms:
        rc, out, err = cli([*args, "--dry-run"], capsys)
        assert rc == 0 and "would run" in out, (args, out + err)


def test_the_orch_command_itself_prints_one_line(case: Path) -> None:
    """The installed entry point (main -> run_cli) in its own process: a flag of the wrong type is one line."""
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *map(str, ft("--lora_r", "many"))],
        cwd=case,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"},
    )
    assert_one_line(proc.returncode, proc.stdout, proc.stderr, "--lora_r", "integer")
