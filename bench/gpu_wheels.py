"""The wheel set bench/gpu_finetune.py's rows need on the lent GPU machine (no network there), downloaded here.

One set for every row, so the baseline, orch and Unsloth run on the same libraries: the GPU image's torch 2.11,
transformers 5.17, peft 0.21 and accelerate, plus the wheels below. Unsloth 2026.10.9 pins transformers <= 5.17,
trl <= 1.15 and datasets < 5, which decides trl 1.15.0 and datasets 4.8.5 for all rows (orch runs on both stacks).
Two wheels are repacked to fit the 64 MiB the device tool carries:
- unsloth without `studio/` (its 82 MB web UI; nothing the trainer imports),
- bitsandbytes with only its CPU and CUDA 13.0 libraries (the image's torch is cu130).

    python bench/gpu_wheels.py --dest .whl          # ~20 MB; then carry .whl (bench/README.md)

`repack(wheel, drop)` is the repacker: it rewrites the wheel without the members `drop` rejects and keeps its
RECORD true (the dropped files' lines removed), so pip installs the result like the original.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

WHEELS = (
    "trl==1.15.0",
    "datasets==4.8.5",
    "multiprocess==0.70.18",
    "dill==0.4.1",
    "liger-kernel==0.8.5",
    "bitsandbytes==0.50.2",
    "unsloth==2026.10.9",
    "unsloth-zoo==2026.10.9",
    "torchao==0.18.0",
    "cut-cross-entropy==25.1.1",
    "tyro==1.0.17",
    "docstring-parser==0.18.0",
    "typeguard==4.6.1",
    "msgspec==0.23.0",
    "json5==0.17.3",
    "nest-asyncio==1.6.0",
    "structlog==26.1.0",
    "pydantic==2.14.3",
    "pydantic-core==2.50.4",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# what each repacked wheel leaves out: a member path -> True to drop it
DROP: dict[str, Callable[[str], bool]] = {
    "unsloth": lambda name: name.startswith("studio/"),
    "bitsandbytes": lambda name: bool(re.search(r"libbitsandbytes_(?!cpu|cuda130)[^/]*\.so$", name)),
}


def repack(wheel: Path, drop: Callable[[str], bool]) -> tuple[int, int]:
    """Rewrite `wheel` in place without the members `drop` selects; returns (members dropped, bytes saved)."""
    tmp = wheel.with_suffix(".tmp")
    dropped = saved = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        gone = {info.filename for info in src.infolist() if drop(info.filename)}
        for info in src.infolist():
            if info.filename in gone:
                dropped += 1
                saved += info.compress_size
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] not in gone).encode()
            dst.writestr(info, data)
    tmp.replace(wheel)
    return dropped, saved


def download(dest: Path, specs: tuple[str, ...] = WHEELS) -> list[Path]:
    """pip download each spec (no dependencies: the set above is complete) for the GPU image's Python 3.12."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    cmd += ["--implementation", "cp", "-d", str(dest), "-q"]
    for platform in (*PLATFORMS, "any"):
        cmd += ["--platform", platform]
    for spec in specs:
        subprocess.run([*cmd, spec], check=True)
    return sorted(dest.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", type=Path, default=Path(".whl"))
    p.add_argument("--no-download", action="store_true", help="repack the wheels already in --dest only")
    a = p.parse_args(argv)
    wheels = sorted(a.dest.glob("*.whl")) if a.no_download else download(a.dest)
    for wheel in wheels:
        name = wheel.name.split("-", 1)[0].lower()
        if name in DROP:
            dropped, saved = repack(wheel, DROP[name])
            print(f"{wheel.name}: {dropped} files left out ({saved / 2**20:.1f} MiB compressed)")
    total = sum(w.stat().st_size for w in a.dest.glob("*.whl"))
    print(f"{len(list(a.dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {a.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
