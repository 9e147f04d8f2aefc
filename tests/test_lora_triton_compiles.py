"""Every orch Triton kernel compiles with Triton's real compiler for sm_90 and sm_80, in each mode the wrappers
launch (tests/lora_triton_compiled.py, in a subprocess with the pinned Triton): the interpreter tests run the
kernels' Python, which accepts code the compiler refuses, and that must fail here rather than on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_kernel_mode_compiles_for_hopper_and_ampere(tmp_path: Path) -> None:
    site = REPO / ".cache" / "triton-interpret"
    if not (site / ".orch-version").is_file():
        pytest.fail(f"{site} is missing: run `make setup` (scripts/setup-triton-interpret.sh installs it)")
    out = tmp_path / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(site)]), TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "lora_triton_compiled.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["triton"] == (site / ".orch-version").read_text().strip()
    results = res["results"]
    # 4 Philox modes x 2 precisions x (forward, A's gradient, input gradient written / added) + the others, per arch
    assert len(results) == 2 * (4 * 2 * 4 + 2 + 2 + 3 + 4)
    failed = {k: v for k, v in results.items() if v != "ok"}
    assert not failed, "\n".join(f"{k}: {v[:400]}" for k, v in failed.items())
