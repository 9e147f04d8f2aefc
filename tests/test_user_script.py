"""Olive data-config user_script: the script's registered components load and pre-process the rows (real files,
real `datasets`, no mocks); what orch cannot run is one ConfigError line naming the field."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.olive import load_workflow
from orchestrator.passes.common.data import load_splits
from orchestrator.schema import ConfigError

SCRIPT = """
from datasets import Dataset
from olive.data.registry import Registry


@Registry.register_dataset()
def shouting_rows(data_name, split, keep_lang, suffix="!"):
    import json
    rows = [json.loads(line) for line in open(data_name)]
    return Dataset.from_list([{**r, "prompt": r["prompt"] + suffix} for r in rows if r["lang"] == keep_lang])


@Registry.register_pre_process(name="upper")
def upper_pre(dataset, column="prompt"):
    return dataset.map(lambda r: {column: r[column].upper()})
"""


def _files(tmp_path: Path) -> None:
    rows = [{"lang": "py", "prompt": "add", "response": "a+b"}, {"lang": "js", "prompt": "sub", "response": "a-b"},
            {"lang": "py", "prompt": "mul", "response": "a*b"}]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "script.py").write_text(SCRIPT)


def _wf(dc: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "input_model": {"type": "HfModel", "model_path": "./m"},
        "data_configs": [{"name": "d", "type": "HuggingfaceContainer", "user_script": "script.py", **dc}],
        "passes": {"lora": {"type": "LoRA", "train_data_config": "d"}},
        **extra,
    }


OLIVE_06 = {  # Olive < 0.7: components + params_config / component_kwargs
    "components": {"load_dataset": {"type": "shouting_rows"}, "pre_process_data": {"type": "upper"}},
    "params_config": {
        "data_name": "rows.jsonl",
        "split": "train",
        "component_kwargs": {
            "load_dataset": {"keep_lang": "py", "suffix": "?"},
            "pre_process_data": {"text_template": "Q: {prompt} A: {response}"},
        },
    },
}


def test_user_script_components_make_the_rows(tmp_path: Path) -> None:
    _files(tmp_path)
    olive_had = "olive" in sys.modules
    wf = load_workflow(_wf(OLIVE_06), base_dir=tmp_path)
    assert ("olive" in sys.modules) == olive_had  # the registry stand-in lived only while the script loaded
    dc = wf.data_config("d").model_dump(mode="json")
    assert dc["user_script"] == str(tmp_path / "script.py")  # absolute: the job finds it from any folder
    train, _ = load_splits(dc, base_dir=None)
    # load_dataset filtered to py and appended "?"; the script's pre_process upper-cased; orch templated
    assert train["text"] == ["Q: ADD? A: a+b", "Q: MUL? A: a*b"]

    newer = {  # Olive >= 0.7: the component's type and params in load_dataset_config / pre_process_data_config
        "load_dataset_config": {"type": "shouting_rows", "params": {"data_name": "rows.jsonl", "keep_lang": "js"}},
        "pre_process_data_config": {"type": "upper", "column": "response", "text_cols": ["prompt", "response"]},
    }
    train, _ = load_splits(load_workflow(_wf(newer), base_dir=tmp_path).data_config("d"), base_dir=None)
    assert train["text"] == ["sub!\nA-B"]


def test_user_script_refusals_name_the_field(tmp_path: Path) -> None:
    def error(dc: dict[str, Any], **extra: Any) -> str:
        with pytest.raises(ConfigError) as exc:
            load_workflow(_wf(dc, **extra), base_dir=tmp_path)
        text = str(exc.value)
        assert len(text.splitlines()) == 1, text
        return text

    missing = error({"load_dataset_config": {"type": "shouting_rows", "data_name": "rows.jsonl"}})
    assert missing.startswith("data_configs[0].user_script: ") and "script.py" in missing and "not found" in missing
    _files(tmp_path)
    unknown = error({**OLIVE_06, "components": {"load_dataset": {"type": "nope"}}})
    assert unknown.startswith("data_configs[0]: load_dataset_config.type: 'nope' is not a load_dataset component")
    assert "of script.py (it registers: shouting_rows)" in unknown
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    broken = error({**OLIVE_06, "user_script": "broken.py"})
    assert broken.startswith("data_configs[0]: user_script: broken.py failed to load: ModuleNotFoundError")
    post = error({**OLIVE_06, "components": {**OLIVE_06["components"], "post_process_data": {"type": "x"}}})
    assert post.startswith("data_configs[0].components.post_process_data: post_process_data components are not")
    bad_arg = error({"load_dataset_config": {"type": "shouting_rows", "data_name": "rows.jsonl", "colour": 1}})
    assert "load_dataset_config.colour" in bad_arg and "takes no argument 'colour'" in bad_arg
    docker = {"d": {"type": "DockerSystem"}}
    remote = error(OLIVE_06, systems=docker, engine={"target": "d"})
    assert remote.startswith("data_configs[0].user_script: runs only on LocalSystem for now")


@pytest.mark.skipif(importlib.util.find_spec("olive") is not None, reason="the stand-in is used only without Olive")
def test_registry_stand_in_matches_olive_names(tmp_path: Path) -> None:
    from orchestrator.schema import user_script

    (tmp_path / "s.py").write_text(
        "from olive.data.registry import Registry\n"
        "@Registry.register_post_process()\ndef post(x): return x\n"
        "@Registry.register_dataloader('dl')\ndef loader(ds, batch_size=1): return ds\n"
        "@Registry.register_default_pre_process()\ndef pre(ds): return ds\n"
    )
    found = user_script.load(tmp_path / "s.py")
    assert set(found["post_process_data"]) == {"post"} and set(found["dataloader"]) == {"dl"}
    assert set(found["pre_process_data"]) == {"default_pre_process_data"}
    assert "olive" not in sys.modules


def test_engine_refuses_a_remote_host_and_keys_the_cache_on_the_script(tmp_path: Path, tiny_model: Path) -> None:
    from orchestrator.engine import Engine
    from orchestrator.engine.preflight_error import PreflightError

    _files(tmp_path)
    raw = _wf(OLIVE_06)
    raw["input_model"]["model_path"] = str(tiny_model)
    wf = load_workflow(raw, base_dir=tmp_path)
    Engine(wf, tracking=False).preflight(tracking=False)  # local: fine
    with pytest.raises(PreflightError, match=r"^data_configs\[0\]\.user_script: runs only on LocalSystem"):
        Engine(wf, host="docker", tracking=False).preflight(tracking=False)  # --host docker on the command line
    before = Engine(wf, tracking=False)._data_files(["d"])[2]
    (tmp_path / "script.py").write_text(SCRIPT + "\n# changed\n")
    assert Engine(wf, tracking=False)._data_files(["d"])[2] != before  # new script code, new cache key
