"""What a user sees of a run, on the real CLI chain `orch finetune` -> `orch auto-opt` over the tiny model:

- progress through a pipe (no terminal): lines arrive while the LoRA pass runs, not when it ends;
- `orch generate` as a chat in a pseudo-terminal: the template the model was fine-tuned with, history kept,
  /help and /reset handled by orch, /exit, tokens streamed;
- `orch ui --plot`: the loss curves from MLflow's metric history, whatever the pass is called; an empty picture is
  an error.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.core.cache import Cache

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "### Text: {phrase}\n### The tone is:\n{tone}"
PROGRESS = re.compile(r"^finetune \(LoRA\) step (\d+)/(\d+) \(\d+%\)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")


def env() -> dict[str, str]:
    # the chain's store is the default one beside it: no MLflow URI an earlier test left in this process
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    return {**base, "PYTHONPATH": str(REPO), "COLUMNS": "200", "ORCH_PROGRESS_INTERVAL": "0"}


def orch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestrator.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=env())


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tone_rows: list[dict[str, str]]) -> dict:
    """`orch finetune` read through a pipe line by line as it runs (each line stamped with whether the LoRA pass
    had finished by then), then `orch auto-opt` on its output."""
    work = tmp_path_factory.mktemp("chain")
    (work / "data").mkdir()
    (work / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tone_rows))
    cmd = [
        sys.executable, "-m", "orchestrator.cli", "finetune",
        "-m", str(tiny_model), "-d", "json", "--data_files", "data/train.jsonl",
        "--train_split", "train[:80%]", "--eval_split", "train[80%:]",
        "--text_template", TEMPLATE.replace("\n", "\\n"),
        "--max_steps", "12", "--logging_steps", "3", "--eval_strategy", "steps", "--eval_steps", "6",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--lora_r", "8", "--target_modules", "qkv_proj,o_proj", "-o", "models/ft",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=work, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )  # `2>&1 | tee`: one pipe, no terminal
    lines: list[tuple[str, bool]] = []
    cache = Cache(work / ".orch" / "cache")
    assert proc.stdout is not None
    for line in proc.stdout:
        lora_done = any(e.result.pass_type == "LoRA" for e in cache.entries())
        lines.append((line.rstrip("\n"), lora_done))
    assert proc.wait(timeout=900) == 0, "\n".join(text for text, _ in lines[-60:])
    opt = orch(
        "auto-opt", "-m", "models/ft/model", "--adapter_path", "models/ft/adapter", "--device", "cpu",
        "--provider", "CPUExecutionProvider", "--use_model_builder", "--precision", "int4", "--use_ort_genai",
        "-o", "models/onnx", cwd=work,
    )  # fmt: skip
    assert opt.returncode == 0, opt.stderr[-3000:]
    return {"work": work, "lines": lines, "cache": cache}


def test_progress_lines_arrive_while_the_pass_runs(chain: dict) -> None:
    lines: list[tuple[str, bool]] = chain["lines"]
    end = next(i for i, (text, _) in enumerate(lines) if text.startswith("finetune (LoRA): done in"))
    progress = [(int(m.group(1)), int(m.group(2)), done) for text, done in lines[:end] if (m := PROGRESS.match(text))]
    assert len(progress) >= 2, [t for t, _ in lines]
    steps = [step for step, _, _ in progress]
    assert steps == sorted(steps) and steps[0] < steps[-1] and progress[0][1] == 12
    assert not progress[0][2], "the first progress line came after the LoRA pass had finished"
    shown = [text for text, _ in lines[:end] if PROGRESS.match(text)]
    assert any("loss " in t and "tokens/s" in t for t in shown), shown  # the loss and the rate, once known
    assert any("ETA " in t for t in shown), shown
    # the job's own log (what `orch logs -f` and Azure ML's std_log show) carries progress lines too
    (entry,) = [e for e in chain["cache"].entries() if e.result.pass_type == "LoRA"]
    log = (entry.path / "job.log").read_text()
    assert re.search(r"^progress: step \d+/12", log, re.M), log[-2000:]


def test_plot_draws_the_finetune_curves_and_refuses_an_empty_picture(chain: dict, tmp_path: Path) -> None:
    import mlflow
    from matplotlib import image

    work = chain["work"]
    png = tmp_path / "loss.png"
    proc = orch("ui", "--manifest", "models/ft/manifest.json", "--plot", str(png), cwd=work)
    assert proc.returncode == 0, proc.stderr
    # the pass is called "finetune" here (no name is assumed): its train and eval curves are both drawn
    drawn = re.search(r"finetune: eval_loss \((\d+) points\), train_loss \((\d+) points\)", proc.stderr)
    assert drawn and int(drawn.group(1)) >= 2 and int(drawn.group(2)) >= 4, proc.stderr
    pixels = image.imread(png)[..., :3]

    def count(rgb: tuple[int, int, int]) -> int:
        return int((abs(pixels - [c / 255 for c in rgb]).sum(axis=-1) < 0.1).sum())

    assert count((31, 119, 180)) > 150 and count((255, 127, 14)) > 150  # matplotlib's C0 and C1 lines

    # the CLI chain registered under its own name, not one shared by every chain, in the registry of ITS store
    # (named: MlflowClient(uri) alone reads the process's global registry URI), each version by the run that
    # logged it, as the manifest says
    uri = f"sqlite:///{work / 'mlruns.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    names = {m.name for m in client.search_registered_models()}
    assert names == {"finetune-ft", "auto-opt-onnx"}, names
    for out, name in (("models/ft", "finetune-ft"), ("models/onnx", "auto-opt-onnx")):
        recorded = json.loads((work / out / "manifest.json").read_text())["mlflow"]
        assert recorded["tracking_uri"] == recorded["registry_uri"] == uri
        assert recorded["registered_model"] == {"name": name, "version": "1"}
        (version,) = client.search_model_versions(f"name='{name}'")
        assert (str(version.version), version.run_id) == ("1", recorded["run_id"])
        assert client.get_run(recorded["run_id"]).data.tags["orch.registered_version"] == "1"

    # auto-opt logged no loss and ran no evaluation: no picture, one line, exit 2
    empty = tmp_path / "empty.png"
    refused = orch("ui", "--manifest", "models/onnx/manifest.json", "--plot", str(empty), cwd=work)
    assert refused.returncode == 2 and "no loss-like metric" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not empty.exists()


class Pty:
    """A child process on a pseudo-terminal (as a user's shell runs it): read up to a marker, send lines."""

    def __init__(self, cmd: list[str], cwd: Path) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        self.fd, self.buf = master, b""

    def read_until(self, marker: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        want = marker.encode()
        while want not in self.buf:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {marker!r} within {timeout}s; got {self.buf[-2000:]!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"the process ended before {marker!r}; got {self.buf[-2000:]!r}")
            self.buf += chunk
        cut = self.buf.index(want) + len(want)
        text, self.buf = self.buf[:cut], self.buf[cut:]
        return ANSI.sub("", text.decode(errors="replace"))

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")


def turn(chat: Pty, message: str) -> tuple[str, int]:
    """Send a message; (the streamed answer, the context size in tokens the answer was generated from)."""
    chat.send(message)
    text = chat.read_until("you> ")
    answer = re.search(r"model> (.*?)\n", text, re.S)
    context = re.search(r"context (\d+) tokens", text)
    assert answer and context, text
    return answer.group(1), int(context.group(1))


def test_generate_chats_with_the_fine_tuned_template(chain: dict) -> None:
    from orchestrator.cli.chat import ChatSession, choose_mode, recorded_format
    from orchestrator.core.prompt import PromptFormat
    from orchestrator.passes.common.onnx_tools import GenaiModel

    work = chain["work"]
    model_dir = work / "models" / "onnx" / "model"
    # the template came with the model: finetune recorded it, auto-opt carried it into the ONNX folder
    fmt = recorded_format(model_dir)
    assert fmt == PromptFormat.model_validate(json.loads((work / "models/ft/adapter/orch_prompt.json").read_text()))
    assert fmt.kind == "text_template" and fmt.template == TEMPLATE

    # in-process: the conversation each turn is the trained form, past turns each closed by EOS as in training
    model = GenaiModel(model_dir)
    session = ChatSession(model, choose_mode(None, fmt, model.has_chat_template()), fmt, max_new_tokens=6)
    assert session.mode == "trained"
    pieces: list[str] = []
    first = session.reply("I won the lottery", pieces.append)
    assert len(pieces) == first.n_tokens and "".join(pieces) == first.text  # streamed token by token
    second = session.reply("my dog ran away", lambda _: None)
    expected = (
        model.encode(f"### Text: I won the lottery\n### The tone is:\n{first.text}")
        + model.eos_token_ids[:1]
        + model.encode("### Text: my dog ran away\n### The tone is:\n")
    )
    assert session.conversation_ids("my dog ran away", session.history[:1]) == expected
    assert second.context_tokens == len(expected)

    # the CLI in a pseudo-terminal, greedy: the same answers and context sizes as the session above
    chat = Pty([sys.executable, "-m", "orchestrator.cli", "generate", "-m", "models/onnx", "--max-new-tokens", "6"],
               work)  # fmt: skip
    banner = chat.read_until("you> ")
    assert "template: the one the model was fine-tuned with" in banner and "### Text: <your message>" in banner
    answer1, context1 = turn(chat, "I won the lottery")
    assert (answer1, context1) == (first.text, first.context_tokens)
    answer2, context2 = turn(chat, "my dog ran away")
    assert (answer2, context2) == (second.text, second.context_tokens) and context2 > context1  # history kept
    chat.send("/help")
    helped = chat.read_until("you> ")
    assert "/reset" in helped and "/exit" in helped and "model>" not in helped  # orch's, not the model's
    chat.send("/nosuch")
    assert "unknown command /nosuch" in chat.read_until("you> ")
    chat.send("/reset")
    assert "conversation cleared" in chat.read_until("you> ")
    assert turn(chat, "I won the lottery") == (answer1, context1)  # a fresh conversation again
    chat.send("/exit")
    assert chat.proc.wait(timeout=60) == 0
    os.close(chat.fd)

    # --prompt for scripts: the answer alone on stdout, the same text
    one = orch("generate", "-m", "models/onnx", "--prompt", "I won the lottery", "--max-new-tokens", "6", cwd=work)
    assert one.returncode == 0, one.stderr
    assert one.stdout == first.text + "\n" and "fine-tuned with" in one.stderr
    # sampling flags without --do-sample would silently change nothing: refused in one line
    bad = orch("generate", "-m", "models/onnx", "-p", "x", "--temperature", "0.7", cwd=work)
    assert bad.returncode == 2 and "--do-sample" in bad.stderr and "Traceback" not in bad.stderr
    sampled = orch("generate", "-m", "models/onnx", "-p", "x", "--do-sample", "--top-k", "5", "--seed", "1", cwd=work)
    assert sampled.returncode == 0, sampled.stderr
