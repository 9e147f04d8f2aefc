"""The GPU checks, in one place: does a system ask for a GPU, how many this host shows, and whether this
process can use CUDA. None imports torch unless a GPU device file exists (`orch --help` and config checks stay
light; a CPU machine answers at once)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def wants_gpu(accelerators: Iterable[Any] | None) -> bool:
    """True when a system's accelerators (["gpu"] or [{"device": "gpu", ...}]) ask for a GPU."""
    for acc in accelerators or ():
        device = acc.get("device") if isinstance(acc, Mapping) else acc
        if str(device).lower() in ("gpu", "cuda"):
            return True
    return False


def visible_cuda_gpus() -> int:
    """GPUs a job on this host may use, without importing torch: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in (s.strip() for s in visible.split(",")) if v]
        return 0 if not ids or ids[0].startswith("-") else len(ids)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def cuda_available() -> bool:
    """A usable CUDA device in this process: no /dev/nvidia* means none, without importing torch."""
    if not any(Path("/dev").glob("nvidia*")):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
