"""README's bash blocks, run as written in a fresh copy of the repository, so README and behaviour cannot drift.

Every line of every ```bash block is taken in order and run in ONE bash session (so `source .venv/bin/activate`
holds for the lines after it) in a clone-like folder: the checkout's tracked and new files, nothing it ignores
(no outputs, caches, models, mlruns.db). A line runs exactly as written unless DECISIONS below says otherwise,
with the reason; a DECISIONS entry that matches no README line fails the test (no stale excuses), and so does a
README line that fails.

What stands in for `make setup` and for minutes of compute (the test runs in the suite, on 2 CPU cores):
- `.venv` is a small folder whose bin/ links this venv's python and orch, with the stamp setup.sh writes; setup.sh
  therefore finds it up to date (CI's `make test` has installed this very checkout), and PYTHONPATH points at the
  copy, as the editable install of a clone would.
- the converted SmolLM2 folder in the copy's cache (named by the GGUF file's sha256, as orch demo looks it up) holds
  a tiny Llama of SmolLM2's layout (30 layers, the same module names smollm2.json targets, tied embeddings) with
  random weights: `make demo` runs smollm2.json end to end through the same code in seconds instead of minutes.
- `./my-model` and `data/train.jsonl` of the Olive block are the session's tiny model and the tone rows as
  prompt / ground_truth.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERATE_INPUT = "I won the lottery and could not stop smiling!\n"


def _docker_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=5).ping()
        return True
    except Exception:  # noqa: BLE001 - no engine here: the Docker lines say so below
        return False


DOCKER = _docker_reachable()
NO_DOCKER = "" if DOCKER else "no Docker engine is reachable here (make services starts one)"

# README line (its trailing comment stripped) -> ("as", command run instead, why) or ("skip", why). A line not
# listed runs as written.
DECISIONS: dict[str, tuple[str, ...]] = {
    "make test": ("skip", "runs the whole suite, of which this test is a part"),
    "orch run --config jobs/tone-classification/config.json --host docker": (
        ("as", "orch run --config jobs/tone-classification/config.json --host docker --dry-run",
         "the plan only: a full container run builds the cpu-train/cpu-export images (minutes); "
         "tests/test_docker_workflow.py runs this workflow in containers")
        if DOCKER else ("skip", NO_DOCKER)
    ),
    "orch finetune --model_name_or_path ./my-model --data_name json --data_files data/train.jsonl "
    '--train_split "train[:80%]" --eval_split "train[80%:]" '
    '--text_template "<|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n{ground_truth}<|end|>" '
    "--per_device_train_batch_size 16 --max_steps 100 --report_to azure_ml --output_path ./models/ft": (
        "as", "orch finetune --model_name_or_path ./my-model --data_name json --data_files data/train.jsonl "
        '--train_split "train[:80%]" --eval_split "train[80%:]" '
        '--text_template "<|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n{ground_truth}<|end|>" '
        "--per_device_train_batch_size 16 --max_steps 3 --report_to azure_ml --output_path ./models/ft",
        "tiny settings: 100 steps of 16 rows padded to 1024 tokens take minutes on 2 CPU cores (19 min on a "
        "loaded one, 8 steps 67 s); 3 steps take the same path",
    ),
    "orch generate --model jobs/tone-classification/outputs/smollm2/model": (
        "as", f"orch generate --model jobs/tone-classification/outputs/smollm2/model <<< {GENERATE_INPUT.strip()!r}",
        "a chat reads stdin: one message, then the end of input",
    ),
    "orch env base": ("run",) if DOCKER else ("skip", NO_DOCKER),
    "orch run --config jobs/tone-classification/finetune-aml.json --host docker": (
        ("as", "orch run --config jobs/tone-classification/finetune-aml.json --host docker --dry-run",
         "the plan only (the cpu-train image build takes minutes); tests/test_aml_cache.py runs this workflow "
         "on the stand-in, tests/test_docker_workflow.py runs workflows in containers")
        if DOCKER else ("skip", NO_DOCKER)
    ),
    "orch env ls ; orch env build cpu-train ; orch env rm cpu-train": (
        ("as", "orch env ls --json",
         "env build cpu-train builds a 2 GB torch image (tests/test_docker.py builds environments) and env rm would "
         "remove the image the Docker tests reuse; --json: the listing is checked")
        if DOCKER else ("skip", NO_DOCKER)
    ),
    "orch config set subscription_id <sub> ; orch config set resource_group <rg> ; "
    "orch config set workspace_name <ws>": (
        "as", "orch config set subscription_id 00000000-0000-0000-0000-000000000001 ; "
        "orch config set resource_group orch-rg ; orch config set workspace_name orch-ws",
        "<sub> <rg> <ws> are the reader's own values (ORCH_PROFILE is a file of this test)",
    ),
    "orch submit --config jobs/tone-classification/config.json --host aml": (
        "skip", "needs an Azure ML workspace; tests/test_azureml.py submits to the local stand-in"),
    "orch submit --config jobs/tone-classification/config.json --host aml --dry-run": (
        "skip", "plans against an Azure ML workspace's cache; tests/test_aml_cache.py runs submit --dry-run on the "
        "stand-in"),
    "orch cache ls --workspace ; orch cache clean --workspace --key PREFIX": (
        "skip", "needs an Azure ML workspace; tests/test_aml_cache.py lists and cleans the stand-in's workspace cache"),
    "orch status JOB ; orch logs JOB -f ; orch cancel JOB ; orch download JOB -o out/": (
        "skip", "JOB is a submitted job of a workspace; tests/test_azureml.py runs these verbs on the stand-in"),
    "orch run --config jobs/tone-classification/config.json --host aml": (
        "skip", "needs an Azure ML workspace; tests/test_azureml.py runs `orch run --host aml` on the stand-in"),
    ".venv/bin/orch env base": ("run",) if DOCKER else ("skip", NO_DOCKER),
    ".venv/bin/python -m tests.azure_standin --dir /tmp/standin &": (
        "skip", "the stand-in block: its first submit builds the aml-cpu image (minutes); tests/test_azureml.py "
        "starts the same stand-in and submits, follows, downloads"),
    "source /tmp/standin/env.sh && source .venv/bin/activate": ("skip", "the stand-in block (see above)"),
    "orch submit --config jobs/tone-classification/config.json --host aml_cpu --target aml_cpu": (
        "skip", "the stand-in block (see above)"),
    "orch logs <job> -f ; orch status <job> ; orch download <job> -o /tmp/aml-out": (
        "skip", "the stand-in block (see above)"),
    "orch submit --config jobs/tone-classification/finetune-aml.json --host aml": (
        "skip", "the stand-in block (see above); tests/test_aml_cache.py submits finetune-aml.json"),
    "orch submit --config jobs/tone-classification/finetune-aml.json --host aml_lowpri": (
        "skip", "the stand-in block (see above); tests/test_aml_cache.py submits to the low-priority cluster"),
    'curl -sk -X POST "$(jq -r .base_url /tmp/standin/settings.json)/_standin/jobs/<job>/preempt"': (
        "skip", "the stand-in block (see above); tests/test_aml_cache.py preempts a job in the middle of LoRA"),
}


def readme_lines() -> list[str]:
    """The commands of README's bash blocks in order: continuation lines joined, trailing comments stripped."""
    text = (REPO / "README.md").read_text()
    lines: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


# ---- the clone-like folder ------------------------------------------------------------------------------------
def checkout_copy(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def venv_stand_in(clone: Path) -> None:
    """.venv as `make setup` leaves it, for what README's commands use: bin/{python,orch,activate} + the stamp."""
    bin_dir = clone / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    real = Path(sys.executable).parent
    for name in ("python", "python3", "orch"):
        (bin_dir / name).symlink_to(real / name)
    (bin_dir / "activate").write_text(
        f'VIRTUAL_ENV="{clone / ".venv"}"\nexport VIRTUAL_ENV\nPATH="$VIRTUAL_ENV/bin:$PATH"\nexport PATH\nhash -r\n'
    )
    stamp = subprocess.run("cat pyproject.toml constraints.txt | sha256sum | cut -c1-16", shell=True, cwd=clone,
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (clone / ".venv" / ".orch-stamp").write_text(stamp + "\n")


def tiny_smollm2(clone: Path, texts: list[str]) -> Path:
    """A tiny Llama where `orch demo` finds its converted SmolLM2 (see the module docstring)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.passes.models.pretrained import SOURCE_FILE, converted_dir
    from orchestrator.passes.models.tiny_model import _unsafe_widths, train_phi3_tokenizer

    cache = clone / "jobs" / "tone-classification" / ".orch" / "cache"
    folder = converted_dir(cache)
    tokenizer = train_phi3_tokenizer(texts * 4, 600, 256)
    vocab = max(600, len(tokenizer))
    assert vocab not in _unsafe_widths(64, 96, 4, 2)  # onnxruntime-genai's LM-head trap (FACTS.md)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=30, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / SOURCE_FILE).write_text(json.dumps({"stand_in": "tiny Llama for tests/test_readme.py"}))
    return folder


@pytest.fixture
def clone(tmp_path: Path, tiny_model: Path, tone_rows: list[dict[str, str]]) -> Path:
    root = checkout_copy(tmp_path / "orch")
    venv_stand_in(root)
    tiny_smollm2(root, [f"{r['phrase']} {r['tone']}" for r in tone_rows])
    shutil.copytree(tiny_model, root / "jobs" / "tone-classification" / "models" / "tiny-phi3")  # demo --tiny's
    shutil.copytree(tiny_model, root / "my-model")
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": r["phrase"], "ground_truth": r["tone"]}) + "\n" for r in tone_rows)
    )
    return root


# ---- what each line must have done, beyond exit 0 -----------------------------------------------------------
JOB = Path("jobs/tone-classification")
EXPECT: dict[str, Callable[[Path, str], None]] = {
    "make demo": lambda c, out: (
        _has(c / JOB / "outputs/smollm2/model/genai_config.json"), _in("sample generation:", out)),
    "orch demo --tiny": lambda c, out: (_has(c / JOB / "outputs/model/genai_config.json"), _in("before", out)),
    "orch run --config jobs/tone-classification/config.json": lambda c, out: _in("output: ", out),
    "orch run --config jobs/tone-classification/config.json --dry-run": lambda c, out: _in(
        "0 pass(es) would run", out),
    "orch run --config jobs/tone-classification/config.json --host docker": lambda c, out: _in(
        "docker (target)", out),  # --host alone takes the evaluation with it
    "orch run --config jobs/tone-classification/finetune-aml.json --host docker": lambda c, out: _in(
        "2 pass(es) would run", out),
    "orch env ls ; orch env build cpu-train ; orch env rm cpu-train": lambda c, out: _in("[", out[:5]),
    "orch generate --model jobs/tone-classification/outputs/smollm2/model": lambda c, out: _in("tokens", out),
    "orch cache ls ; orch cache verify ; orch cache clean": lambda c, out: (
        _in(str((c / JOB / ".orch/cache").resolve()), out), _in(" sound, 0 damaged", out), _in("removed", out)),
    "orch finetune": lambda c, out: _has(c / "models/ft/adapter/adapter_model.safetensors"),
    "orch auto-opt --model_name_or_path ./models/ft/model --adapter_path": lambda c, out: _has(
        c / "models/onnx/model/adapter_weights.onnx_adapter"),
    "orch auto-opt --model_name_or_path ./models/ft/model --precision fp32": lambda c, out: _has(
        c / "models/onnx-fp32/model/model.onnx"),
    "orch quantize": lambda c, out: _has(c / "models/q/model/model.onnx"),
    "orch convert-adapters": lambda c, out: _has(c / "models/ft.onnx_adapter"),
    "orch config set": lambda c, out: _in("workspace_name saved in", out),
}


def _has(path: Path) -> None:
    assert path.exists(), f"{path} was not written"


def _in(needle: str, out: str) -> None:
    assert needle in out, f"{needle!r} not in the output"


PREFIXED = ("orch finetune", "orch auto-opt", "orch quantize", "orch convert-adapters", "orch config set")


def _expectation(line: str) -> Callable[[Path, str], None] | None:
    """EXPECT's entry for a README line: its exact line, or (for the long Olive lines) the entry it starts with."""
    if line in EXPECT:
        return EXPECT[line]
    matches = [k for k in EXPECT if k.startswith(PREFIXED) and line.startswith(k + " ")]
    return EXPECT[max(matches, key=len)] if matches else None


# ---- the test -----------------------------------------------------------------------------------------------
@pytest.mark.timeout(1800)
def test_every_readme_command_runs_as_written(clone: Path) -> None:
    lines = readme_lines()
    stale = sorted(set(DECISIONS) - set(lines))
    assert stale == [], f"DECISIONS names lines README no longer has: {stale}"
    assert "make demo" in lines and any(ln.startswith("orch finetune") for ln in lines)  # the parse saw README

    plan: list[tuple[int, str, str]] = []  # (index, README line, command run)
    report = []
    for i, line in enumerate(lines):
        decision = DECISIONS.get(line, ("run",))
        if decision[0] == "skip":
            report.append(f"SKIPPED  {line}\n         why: {decision[1]}")
            continue
        command = decision[1] if decision[0] == "as" else line
        if decision[0] == "as":
            report.append(f"RUN AS   {line}\n      -> {command}\n         why: {decision[2]}")
        plan.append((i, line, command))
    print("\n".join(report))  # the listed exceptions, in the test's output

    work = clone.parent / "lines"
    work.mkdir()
    script = ["cd " + json.dumps(str(clone))]
    for i, _, command in plan:
        (work / f"{i}.sh").write_text(command + "\n")
        script.append(f"{{ source {work / f'{i}.sh'}; }} > {work / f'{i}.out'} 2>&1 < /dev/null; "
                      f"echo $? > {work / f'{i}.rc'}; [ \"$(cat {work / f'{i}.rc'})\" = 0 ] || exit 0")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AZURE", "ORCH_", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(clone), COLUMNS="200", ORCH_PROFILE=str(clone.parent / "profile.json"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")  # fmt: skip
    proc = subprocess.Popen(["bash", "-c", "\n".join(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=1700)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the line being run and everything it started
        proc.communicate()
        running = next((line for i, line, _ in plan if not (work / f"{i}.rc").exists()), "?")
        pytest.fail(f"README's commands took over 1700 s; still running: {running!r}")
    assert proc.returncode == 0, err[-3000:]

    for i, line, command in plan:
        rc_file = work / f"{i}.rc"
        assert rc_file.exists(), f"not reached: {line!r} (an earlier line failed)"
        out = (work / f"{i}.out").read_text()
        assert rc_file.read_text().strip() == "0", f"README line failed: {command!r}\n{out[-4000:]}"
        assert "Traceback" not in out, f"{command!r} printed a traceback:\n{out[-4000:]}"
        check = _expectation(line)
        if check is not None:
            check(clone, out)
    profile = json.loads((clone.parent / "profile.json").read_text())
    assert profile["workspace_name"] == "orch-ws"
