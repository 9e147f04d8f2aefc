"""CPU inference on 2 cores: onnxruntime-genai int4 (and fp32) decode vs transformers fp32, on the same model.

    python bench/cpu_inference.py [--work /tmp/orch_cpu_infer] [--new-tokens 128] [--write-results]

Model: a Phi-3-architecture model of ~270 M parameters (hidden 1024, 16 layers, 16 heads, intermediate 2816,
vocab 32000) with random weights, built by orchestrator.passes.models.tiny_model.build_tiny_phi3 (sizes chosen
so that no linear layer but the LM head has vocab_size outputs: onnxruntime-genai's builder would take it for the
LM head).
Exports: `python -m onnxruntime_genai.models.builder -i HF -o OUT -p fp32|int4 -e cpu` (int4 = MatMulNBits, RTN,
block 32). Parity: logits against transformers on the same ids (orchestrator.passes.common.onnx_tools.logits_parity).
Timing: greedy decoding of --new-tokens tokens after a --prompt-tokens prompt, EOS ignored, 2 threads
(torch.set_num_threads / the genai session's intra_op_num_threads), median of --repeats runs; decode tokens/s
counts the tokens after the first (the prefill is reported apart).
--write-results rewrites the cpu-infer section of bench/RESULTS.md (--render WORK/results.json: from a past run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

SECTION = "cpu-infer"  # its markers in bench/RESULTS.md
SIZES = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_layers": 16,
    "num_heads": 16,
    "num_kv_heads": 16,
    "max_position_embeddings": 2048,
}
# --tiny (the CPU test's run of the whole script): every size small, the code paths the same
TINY_SIZES = {
    "vocab_size": 1000,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 4,
    "max_position_embeddings": 512,
}
THREADS = 2


def corpus() -> list[str]:
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) for _ in range(2000)]


def build(work: Path) -> Path:
    from orchestrator.passes.models.tiny_model import build_tiny_phi3

    hf = work / "hf"
    if not (hf / "config.json").exists():
        build_tiny_phi3(hf, texts=corpus(), seed=0, **SIZES)
    return hf


def export(hf: Path, work: Path, precision: str) -> tuple[Path, float]:
    out = work / f"onnx_{precision}"
    if (out / "genai_config.json").exists():
        return out, float(json.loads((work / f"export_{precision}.json").read_text())["seconds"])
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
    cmd += ["-p", precision, "-e", "cpu", "-c", str(work / "cache")]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    harness.write_json(work / f"export_{precision}.json", {"seconds": seconds}, indent=None)
    # 2 threads for the benchmark, like torch below
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = THREADS
    opts["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=4))
    return out, seconds


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def prompt_ids(hf: Path, n: int) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok(" ".join(corpus()[:3]))["input_ids"]
    return ids[:n]


class HFRunner:
    """transformers fp32 greedy decoding, timed per generated token (a logits processor stamps each step)."""

    def __init__(self, hf: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()

    def timed_generation(self, ids: list[int], new_tokens: int) -> tuple[float, list[float]]:
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids: Any, scores: Any) -> Any:
                stamps.append(time.perf_counter())
                return scores

        t0 = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(
                self.torch.tensor([ids]),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=self.model.config.pad_token_id,
                logits_processor=LogitsProcessorList([Stamp()]),
            )
        assert out.shape[1] == len(ids) + new_tokens
        steps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        return stamps[0] - t0, steps


def time_interleaved(runners: dict[str, Any], ids: list[int], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Runs of each runtime in turn, `repeats` rounds: load from other processes hits every runtime alike.

    Per run: prefill (prompt forward + first token) and decode tokens/s over the tokens after the first. Reported:
    the median and the best run (the best is the least disturbed by other processes on a shared machine).
    """
    for runner in runners.values():
        runner.timed_generation(ids, 4)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            prefill, steps = runner.timed_generation(ids, new_tokens)
            runs[name].append((prefill, len(steps) / sum(steps)))
    return {
        name: {
            "prefill_s": statistics.median(p for p, _ in r),
            "decode_tokens_per_s": statistics.median(t for _, t in r),
            "decode_tokens_per_s_best": max(t for _, t in r),
            "runs": r,
        }
        for name, r in runs.items()
    }


def render(r: dict[str, Any]) -> str:
    hf_row = r["rows"]["transformers fp32"]
    hf_tps, hf_best = hf_row["decode_tokens_per_s"], hf_row["decode_tokens_per_s_best"]
    lines = [
        f"Measured {r['date']} on {r['cpu']} ({r['cores']} cores, {THREADS} threads); {r['versions']}.",
        f"Model: Phi-3 architecture, {r['n_params'] / 1e6:.0f} M parameters (hidden {SIZES['hidden_size']}, "
        f"{SIZES['num_layers']} layers, intermediate {SIZES['intermediate_size']}, vocab {SIZES['vocab_size']}), "
        f"random weights. Greedy decoding, {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, EOS "
        f"ignored, {r['repeats']} rounds with the three runtimes in turn (median and best run). Decode tokens/s "
        "excludes the prefill. This machine is shared (other jobs ran meanwhile: 1-minute load average "
        f"{r['load_avg_1min'][0]:.1f} before, {r['load_avg_1min'][1]:.1f} after, on {r['cores']} cores), so take "
        "the ratios, measured in the same rounds, over the absolute numbers.",
        "",
        *harness.table(
            ["runtime", "weights", "size MB", "prefill s", "decode tokens/s (median / best)",
             "vs transformers fp32 (median / best)", "logits vs transformers (max abs diff / greedy agree)"],
            "llrrrrl",
        ),  # fmt: skip
    ]
    for name, row in r["rows"].items():
        parity = row.get("parity")
        par = f"{parity['max_abs_diff']:.2g} / {parity['greedy_agree']:.0%}" if parity else "(reference)"
        lines.append(harness.row(
            name, row["weights"], f"{row['size_mb']:.0f}", f"{row['prefill_s']:.3f}",
            f"{row['decode_tokens_per_s']:.1f} / {row['decode_tokens_per_s_best']:.1f}",
            f"{row['decode_tokens_per_s'] / hf_tps:.2f}x / {row['decode_tokens_per_s_best'] / hf_best:.2f}x", par,
        ))  # fmt: skip
    lines.append("")
    int4 = r["rows"]["onnxruntime-genai int4"]["parity"]
    lines.append(
        f"int4 vs fp32 logits: max abs diff {int4['max_abs_diff']:.2g}, same greedy token at "
        f"{int4['greedy_agree']:.0%} of {int4['n_tokens']:.0f} positions. The model has random weights: its "
        "next-token distributions are nearly flat, so int4 rounding (the builder's RTN, block 32) flips the argmax "
        "easily; the fp32 export matches transformers to ~1e-5."
    )
    lines.append(
        f"Export times (onnxruntime-genai model builder, this machine): fp32 {r['export_s']['fp32']:.0f} s, "
        f"int4 {r['export_s']['int4']:.0f} s."
    )
    return "\n".join(lines)


def write_section(md: str, path: Path) -> None:
    harness.write_section(path, SECTION, f"## CPU inference (bench/cpu_inference.py)\n\n{md}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> str:
    import importlib.metadata as md

    return ", ".join(f"{n} {md.version(n)}" for n in ("torch", "transformers", "onnxruntime", "onnxruntime-genai"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/orch_cpu_infer"))
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--render", type=Path, help="a results.json of an earlier run: rewrite the section from it")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (a check of the script, not a benchmark)")
    a = p.parse_args(argv)
    if a.tiny:
        SIZES.update(TINY_SIZES)
    if a.render:
        write_section(render(json.loads(a.render.read_text())), BENCH / "RESULTS.md")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from orchestrator.passes.common.onnx_tools import logits_parity

    a.work.mkdir(parents=True, exist_ok=True)
    hf = build(a.work)
    exports = {prec: export(hf, a.work, prec) for prec in ("fp32", "int4")}
    ids = prompt_ids(hf, a.prompt_tokens)
    cfg = json.loads((hf / "config.json").read_text())
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf)).parameters())
    from orchestrator.passes.common.onnx_tools import GenaiModel

    load0 = os.getloadavg()[0]
    runners: dict[str, Any] = {"transformers fp32": HFRunner(hf)}
    for prec in ("fp32", "int4"):
        runners[f"onnxruntime-genai {prec}"] = GenaiModel(exports[prec][0])
    print("timing (interleaved) ...", flush=True)
    timings = time_interleaved(runners, ids, a.new_tokens, a.repeats)
    load1 = os.getloadavg()[0]
    rows: dict[str, Any] = {
        "transformers fp32": {
            "weights": "fp32",
            "size_mb": sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 1e6,
            **timings["transformers fp32"],
        }
    }
    for prec in ("fp32", "int4"):
        onnx_dir, _ = exports[prec]
        rows[f"onnxruntime-genai {prec}"] = {
            "weights": "fp32" if prec == "fp32" else "int4 MatMulNBits (block 32, RTN), fp32 embeddings",
            "size_mb": folder_mb(onnx_dir) - sum(f.stat().st_size for f in onnx_dir.glob("tokenizer*")) / 1e6,
            "parity": logits_parity(hf, onnx_dir, ids),
            **timings[f"onnxruntime-genai {prec}"],
        }
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "versions": versions(),
        "n_params": n_params,
        "config": {k: cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")},
        "prompt_tokens": len(ids),
        "new_tokens": a.new_tokens,
        "repeats": a.repeats,
        "export_s": {prec: exports[prec][1] for prec in exports},
        "load_avg_1min": [load0, load1],
        "rows": rows,
    }
    harness.write_json(a.work / "results.json", result)
    md = render(result)
    print(md)
    if a.write_results:
        write_section(md, BENCH / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
