"""The baseline: plain transformers Trainer + peft LoRA, as a user writes it without orch.

bf16 (model loaded in bf16, Trainer bf16 autocast), sdpa attention, r=64 on every linear layer, each sample
tokenized and truncated to max_len, batches padded to their longest sample by DataCollatorForLanguageModeling.
`--qlora`: the same with the base loaded by bitsandbytes in 4 bits (nf4, double quant, bf16 compute) and peft's
`prepare_model_for_kbit_training` with gradient checkpointing, the QLoRA recipe as peft / bitsandbytes document it.

Also home of what every benchmark runner shares (bench/olive_runner.py and bench/gpu_finetune.py import it):
the LoRA / training settings, and `install_step_timer()`, which adds a callback to every transformers Trainer
created in the process, whoever creates it (this script, Olive, orch's LoRA pass): per-step wall time between
CUDA syncs, real (non-padding) tokens per step, per-step loss, and peak GPU memory.

    python bench/baseline_peft.py --model DIR --data train.jsonl --steps 30 --warmup 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import harness

# The settings every row uses (the issue's: r=64 on all linear layers, bf16, 8 x 1024).
SETTINGS: dict[str, Any] = {
    "lora_r": 64,
    "lora_alpha": 16,  # Olive's default, so `olive finetune` runs with the same value
    "lora_dropout": 0.05,  # Olive's default (its CLI has no flag for it)
    "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # every linear layer but the LM head
    "batch_size": 8,
    "max_len": 1024,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "optim": "adamw_torch",
    "seed": 42,
    # the Trainer's loss / grad-norm logging (a host sync each time): Olive's and orch's default. Per-step losses
    # come from the step timer's loss recorder, read after training, so every row's curve is still per step.
    "logging_steps": 10,
}
# The QLoRA baseline's activation checkpointing (peft's prepare_model_for_kbit_training recipe)
CHECKPOINTING = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
# BENCH_SETTINGS='{"max_len": 128, "batch_size": 2}' shrinks a run (CPU smoke tests); the GPU table uses the above.
SETTINGS.update(json.loads(os.environ.get("BENCH_SETTINGS") or "{}"))


class _Recorder:
    """What the step timer collected, written as JSON by the runner.

    Nothing here reads a GPU value during training: per-step times are CUDA events recorded at each step's end
    (read after the last step), token counts and losses are kept as device tensors and read at the end. The timer
    itself so adds no host sync to any row's step (an earlier version synchronized after every step, which charged
    each row a drained GPU queue per step).
    """

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self.losses: dict[int, float] = {}
        self.pending_tokens: Any = 0  # an int or a device tensor (summed without a sync)
        self.pending_embed_tokens = 0  # fallback count: input rows seen by the embedding layer (padding included)
        self.raw_tokens: list[Any] = []
        self.raw_losses: list[Any] = []  # the loss tensor each training_step returned, in step order
        self.events: list[Any] = []  # CUDA events: train begin, then one per step end
        self.clock: list[float] = []  # host clock at the same points (CPU runs, where there are no events)
        self.train_start: float | None = None
        self.train_end: float | None = None
        self.host_lead_ms: list[float] = []  # per step: how far the host ran ahead of the GPU (host_lead_ms())

    def finish(self) -> None:
        """Turn the recorded events / tensors into numbers (after training: the reads cost nothing then)."""
        if self.raw_tokens:
            self.step_tokens = [int(t) for t in self.raw_tokens]
            self.raw_tokens = []
        if self.events:
            self.step_times = [a.elapsed_time(b) / 1e3 for a, b in zip(self.events[:-1], self.events[1:], strict=True)]
            self.host_lead_ms = host_lead_ms(self.events, self.clock)
            self.events = []
        elif len(self.clock) > 1:
            self.step_times = [b - a for a, b in zip(self.clock[:-1], self.clock[1:], strict=True)]
        if self.raw_losses:
            self.losses = {i + 1: float(v) for i, v in enumerate(self.raw_losses)}
            self.raw_losses = []


RECORDER = _Recorder()


def host_lead_ms(events: list[Any], clock: list[float]) -> list[float]:
    """Per step, how long after the host recorded the step's end event the GPU reached it (ms). The first event is
    recorded on an idle GPU (a sync just before it), so event i ran at clock[0] + elapsed(0, i) on the host's clock.
    Near 0 the GPU waited for the host (the step is host-bound); tens of ms: the host ran ahead and launch cost is
    hidden."""
    if len(events) < 2 or len(clock) != len(events):
        return []
    return [1e3 * (clock[0] + events[0].elapsed_time(e) / 1e3 - c) for e, c in zip(events[1:], clock[1:], strict=True)]


def _count_tokens(kwargs: dict[str, Any]) -> Any:
    """Real tokens in a forward call (an int, or a device tensor read later): the attention mask's ones, or the row
    length for padding-free rows."""
    mask = kwargs.get("attention_mask")
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        return mask.sum()
    ids = kwargs.get("input_ids")
    if ids is None:
        return 0
    pos = kwargs.get("position_ids")
    labels = kwargs.get("labels")
    if pos is not None and labels is not None and ids.shape[0] == 1:
        # padding-free row: trailing pad (pad_to_multiple_of) carries position 0 and label -100 after the last sample
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            return cu[-1]
    return int(ids.numel())


def install_step_timer() -> None:
    """Add the timing callback, a loss recorder and a token-counting forward hook to every Trainer built from now on."""
    import torch
    import transformers
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    def _mark() -> None:
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            RECORDER.events.append(event)
        RECORDER.clock.append(time.perf_counter())

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            RECORDER.train_start = time.perf_counter()
            _mark()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _profiler_step(state.global_step + 1)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _mark()
            _profiler_step_end(state.global_step)
            RECORDER.raw_tokens.append(RECORDER.pending_tokens or RECORDER.pending_embed_tokens)
            RECORDER.pending_tokens = 0
            RECORDER.pending_embed_tokens = 0

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            RECORDER.train_end = time.perf_counter()

    def _hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        if module.training:
            RECORDER.pending_tokens = RECORDER.pending_tokens + _count_tokens(kwargs)

    def _embed_hook(module: Any, args: tuple) -> None:
        if module.training and args:
            RECORDER.pending_embed_tokens += int(args[0].numel())

    original_init = transformers.Trainer.__init__

    def patched_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.add_callback(StepTimer())
        self.model.register_forward_pre_hook(_hook, with_kwargs=True)
        self.model.get_input_embeddings().register_forward_pre_hook(_embed_hook)
        step = self.training_step  # whatever the trainer class (TRL, Unsloth, orch) made of it

        def training_step(*a: Any, **k: Any) -> Any:
            loss = step(*a, **k)
            RECORDER.raw_losses.append(loss.detach().float().clone())  # the step's loss as the Trainer logs it
            return loss

        self.training_step = training_step

    transformers.Trainer.__init__ = patched_init


# BENCH_PROFILE="DIR:FIRST:COUNT" profiles steps FIRST..FIRST+COUNT-1 with torch.profiler and writes
# DIR/profile.txt (kernels by GPU time) and DIR/profile.json (the same, summed into categories). The steps it covers
# are slower (the profiler's own cost): take tokens/s from a run without it.
_PROFILE: dict[str, Any] = {}
# the same steps count, HOST_PROFILE_BEFORE steps earlier, run under cProfile (DIR/host_profile.txt): where the host's
# Python time goes when the GPU waits on it (cProfile slows the host: read the shares, not the times)
_HOST_PROFILE: dict[str, Any] = {}
HOST_PROFILE_BEFORE = 3


def write_host_profile(prof: Any, where: Path, n_steps: int, top: int = 45) -> None:
    """The host's Python functions by own time and by cumulative time, per step, into where/host_profile.txt."""
    import io
    import pstats

    where.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    buf.write(f"host Python time per step under cProfile: {1e3 * total / max(n_steps, 1):.1f} ms ({n_steps} steps)\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    (where / "host_profile.txt").write_text(buf.getvalue(), encoding="utf-8")


def _profile_spec() -> tuple[Path, int, int] | None:
    spec = os.environ.get("BENCH_PROFILE")
    if not spec:
        return None
    where, first, count = spec.rsplit(":", 2)
    return Path(where), int(first), int(count)


def _profiler_step(step: int) -> None:
    spec = _profile_spec()
    if spec is not None and step == spec[1] - HOST_PROFILE_BEFORE and not _HOST_PROFILE:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        _HOST_PROFILE.update(prof=prof, first=step, last=step + spec[2] - 1, where=spec[0])
    if spec is None or step != spec[1] or _PROFILE:
        return
    import torch

    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA], record_shapes=True
    )
    prof.__enter__()
    _PROFILE.update(prof=prof, first=step, last=step + spec[2] - 1, where=spec[0])


def _profiler_step_end(step: int) -> None:
    if _HOST_PROFILE and "done" not in _HOST_PROFILE and step == _HOST_PROFILE["last"]:
        _HOST_PROFILE["prof"].disable()
        _HOST_PROFILE["done"] = True
        write_host_profile(_HOST_PROFILE["prof"], _HOST_PROFILE["where"], step - _HOST_PROFILE["first"] + 1)
    if not _PROFILE or "done" in _PROFILE or step != _PROFILE["last"]:
        return
    prof = _PROFILE["prof"]
    prof.__exit__(None, None, None)
    _PROFILE["done"] = True
    n_steps = _PROFILE["last"] - _PROFILE["first"] + 1
    write_profile(prof, _PROFILE["where"], n_steps)


KERNEL_CATEGORIES = (
    # (category, substrings of the kernel name, lower case); first match wins. PyTorch's own kernels (at::native)
    # are sorted before the Triton ones: their names end in "_kernel" too ("reduce_kernel", "elementwise_kernel"),
    # and the Triton catch-all would take them. Liger's add + RMSNorm kernels are named "..._forward_kernel": they
    # stay with the norms, not with the LM head's loss.
    ("attention (flash / cudnn)", ("flash", "fmha", "cudnn", "attn")),
    ("GEMM (cuBLAS / CUTLASS)", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "sm80", "cublas", "wgmma")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("LM head loss (Triton)", ("cross_entropy", "element_mul")),
    ("dropout (PyTorch)", ("fused_dropout", "bernoulli")),
    ("copies / casts", ("copy", "catarray", "to_copy", "memcpy")),
    ("reductions", ("reduce_kernel", "lpnorm", "norm_kernel")),
    ("elementwise", ("elementwise", "vectorized", "fill", "memset", "index", "gather", "scatter")),
    ("Liger / orch Triton", ("rms_norm", "swiglu", "rope", "dropout", "philox", "lora", "_kernel")),
)


def kernel_category(name: str) -> str:
    """The KERNEL_CATEGORIES entry a kernel's GPU time is summed into ("other" when none matches)."""
    low = name.lower()
    return next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def write_profile(prof: Any, where: Path, n_steps: int) -> None:
    """Kernels by GPU time (per step) into where/profile.txt and the categories into where/profile.json."""
    where.mkdir(parents=True, exist_ok=True)
    rows = []
    for evt in prof.key_averages():
        dev = getattr(evt, "self_device_time_total", None)
        if dev is None:
            dev = getattr(evt, "self_cuda_time_total", 0)
        if dev and getattr(evt, "device_type", None) is not None and "CUDA" in str(evt.device_type):
            rows.append((evt.key, dev / 1e3 / n_steps, evt.count // max(n_steps, 1)))
    if not rows:  # older profilers mark no device_type on kernels: take every event with device time
        for evt in prof.key_averages():
            dev = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
            if dev:
                rows.append((evt.key, dev / 1e3 / n_steps, evt.count // max(n_steps, 1)))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    cats: dict[str, float] = {}
    for name, ms, _ in rows:
        cat = kernel_category(name)
        cats[cat] = cats.get(cat, 0.0) + ms
    lines = [f"GPU kernel time per step: {total:.1f} ms over {n_steps} profiled steps", ""]
    for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        lines.append(f"{ms:9.2f} ms {100 * ms / max(total, 1e-9):5.1f}%  {cat}")
    lines += ["", "   ms/step   calls/step  kernel"]
    for name, ms, calls in rows[:80]:
        lines.append(f"{ms:10.3f} {calls:10d}  {name[:160]}")
    # which tensors the memory-bound ops move: the CPU-side op with its input shapes and the GPU time it caused
    ops = ("aten::copy_", "aten::cat", "aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::fill_", "aten::sum")
    shaped = []
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.key in ops:
            dev = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            if dev:
                shaped.append((evt.key, str(evt.input_shapes)[:110], dev / 1e3 / n_steps, evt.count // max(n_steps, 1)))
    shaped.sort(key=lambda r: -r[2])
    lines += ["", "   ms/step   calls/step  op [input shapes]"]
    lines += [f"{ms:10.3f} {calls:10d}  {key} {shapes}" for key, shapes, ms, calls in shaped[:30]]
    lines += ["", *gemm_lines(prof, n_steps)]
    lines += ["", *host_side_lines(prof, n_steps)]
    (where / "profile.txt").write_text("\n".join(lines) + "\n")
    (where / "profile.json").write_text(
        json.dumps({"total_ms_per_step": total, "categories": cats, "top": rows[:80]}, indent=1)
    )


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def gemm_flops(key: str, shapes: list) -> float:
    """2 M K N of one GEMM call from the profiler's input shapes (the last two are the matrix operands: addmm's
    first input is the added tensor), 0 where the shapes do not say."""
    mats = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) in (2, 3)][-2:]
    if len(mats) < 2 or len(mats[0]) != len(mats[1]) or mats[0][-1] != mats[1][-2]:
        return 0.0
    a, b = mats[0], mats[1]
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def gemm_lines(prof: Any, n_steps: int) -> list[str]:
    """The step's GEMMs by shape: GPU ms per step, calls, and the TFLOP/s each reached: which matmuls sit under
    the card's roofline (the MFU is mostly theirs)."""
    rows = []
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.key in GEMM_OPS:
            dev = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            if dev:
                flops = gemm_flops(evt.key, list(evt.input_shapes)) * evt.count
                rows.append(
                    (
                        evt.key,
                        str(evt.input_shapes)[:90],
                        dev / 1e3 / n_steps,
                        evt.count // max(n_steps, 1),
                        flops / (dev / 1e6) / 1e12 if flops else 0.0,
                    )
                )
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    lines = [f"GEMMs by shape: {total:.1f} ms/step", "   ms/step   calls/step  TFLOP/s  op [input shapes]"]
    lines += [f"{ms:10.3f} {calls:10d} {tf:8.0f}  {key} {shapes}" for key, shapes, ms, calls, tf in rows[:40]]
    return lines


def gpu_gaps(intervals: list[tuple[int, int, str]], top: int = 12) -> tuple[float, float, list[tuple]]:
    """(busy ms, span ms, the largest gaps) of kernel intervals (start ns, end ns, name) on one GPU timeline:
    the time between kernels is what the step loses to the host (syncs, launch overhead)."""
    if not intervals:
        return 0.0, 0.0, []
    intervals = sorted(intervals)
    busy, gaps = 0, []
    cur_start, cur_end, cur_name = intervals[0]
    for start, end, name in intervals[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, cur_name, name))
            cur_start, cur_end, cur_name = start, end, name
        elif end > cur_end:
            cur_end, cur_name = end, name
    busy += cur_end - cur_start
    gaps.sort(key=lambda g: -g[0])
    return busy / 1e6, (cur_end - intervals[0][0]) / 1e6, gaps[:top]


def host_side_lines(prof: Any, n_steps: int) -> list[str]:
    """Where the GPU waits: the profiled steps' GPU timeline (busy vs span, the largest gaps between kernels) and
    the host's CUDA runtime calls (syncs, copies, launches) per step."""
    lines: list[str] = []
    try:
        intervals = []
        for e in prof.profiler.kineto_results.events():
            if "CUDA" in str(e.device_type()) and e.duration_ns() > 0:
                intervals.append((e.start_ns(), e.start_ns() + e.duration_ns(), e.name()))
        busy, span, gaps = gpu_gaps(intervals)
        idle = span - busy
        lines.append(
            f"GPU timeline of the profiled steps: {span / n_steps:.1f} ms/step span, {busy / n_steps:.1f} busy, "
            f"{idle / n_steps:.1f} idle ({100 * idle / max(span, 1e-9):.1f}%, gaps between kernels)"
        )
        lines += ["   gap ms  kernel before -> kernel after (largest gaps)"]
        lines += [f"{g / 1e6:9.3f}  {a[:70]} -> {b[:70]}" for g, a, b in gaps]
    except Exception as exc:  # an older / newer profiler without these accessors: the kernel tables stand alone
        lines.append(f"GPU timeline: not read ({type(exc).__name__}: {exc})")
    calls = []
    for evt in prof.key_averages():
        if evt.key.startswith("cu") and not evt.key.startswith("cudnn"):  # cudaX (runtime) and cuX (driver)
            calls.append((evt.key, evt.self_cpu_time_total / 1e3 / n_steps, evt.count // max(n_steps, 1)))
    calls.sort(key=lambda c: -c[1])
    lines += ["", "  host ms/step   calls/step  CUDA runtime call"]
    lines += [f"{ms:12.3f} {n:12d}  {key}" for key, ms, n in calls[:15]]
    return lines


def profiled_window(windows: list[dict[str, Any]], n_steps: int) -> set[int]:
    """The 1-based steps a profiled row leaves out of its median: every step from the first profiled one to the one
    after the last. The steps between the cProfile and torch.profiler windows and the step after them start on a GPU
    whose queue drained while the profiled host fell behind (H100 run 12: 310 ms against a median of 268)."""
    if not windows:
        return set()
    first = min(w["first"] for w in windows)
    last = max(w["last"] for w in windows)
    return set(range(first, min(last + 1, n_steps) + 1))


def summarize(system: str, warmup: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Steady-state numbers: median over the steps after `warmup` (compile / autotune / allocator warm-up excluded)."""
    import torch

    cuda = torch.cuda.is_available()
    # steps under the profiler (BENCH_PROFILE) are slower: they stay out of the median
    RECORDER.finish()
    skip = profiled_window([w for w in (_PROFILE, _HOST_PROFILE) if w], len(RECORDER.step_times))
    keep = [i for i in range(warmup, len(RECORDER.step_times)) if i + 1 not in skip]
    times = [RECORDER.step_times[i] for i in keep]
    tokens = [RECORDER.step_tokens[i] for i in keep]
    per_step_tps = [n / t for n, t in zip(tokens, times, strict=True) if t > 0]
    out: dict[str, Any] = {
        "system": system,
        "steps": len(RECORDER.step_times),
        "warmup_steps": warmup,
        "tokens_per_s_median": statistics.median(per_step_tps) if per_step_tps else 0.0,
        "tokens_per_s_total": (sum(tokens) / sum(times)) if times and sum(times) > 0 else 0.0,
        "step_time_median_s": statistics.median(times) if times else 0.0,
        "tokens_per_step_mean": statistics.mean(tokens) if tokens else 0.0,
        "peak_mem_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "peak_mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
        "losses": {str(k): v for k, v in sorted(RECORDER.losses.items())},
        "step_times": RECORDER.step_times,
        "step_tokens": RECORDER.step_tokens,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "profiled_steps": sorted(skip),
    }
    leads = [RECORDER.host_lead_ms[i] for i in keep if i < len(RECORDER.host_lead_ms)]
    if leads:  # the GPU's lag behind the host at each step end (host_lead_ms)
        out["host_lead_ms_median"] = statistics.median(leads)
        out["host_lead_ms"] = RECORDER.host_lead_ms
    if extra:
        out.update(extra)
    return out


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def run(model_dir: Path, data: Path, steps: int, warmup: int, out_json: Path, qlora: bool = False) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    install_step_timer()
    cuda = torch.cuda.is_available()
    s = SETTINGS
    set_seed(s["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = read_texts(data)
    # the same token sequences as orch's LoRA pass: special tokens + text + EOS, cut at max_len
    enc = tokenizer(texts, add_special_tokens=True)["input_ids"]
    ids = [[*x, tokenizer.eos_token_id][: s["max_len"]] for x in enc]
    ds = Dataset.from_dict({"input_ids": ids})

    load: dict[str, Any] = {}
    if qlora:
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.bfloat16 if cuda else torch.float32,
        attn_implementation="sdpa",
        device_map={"": 0} if cuda else None,
        **load,
    )
    if qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    set_seed(s["seed"])
    model = get_peft_model(
        model,
        LoraConfig(
            r=s["lora_r"],
            lora_alpha=s["lora_alpha"],
            lora_dropout=s["lora_dropout"],
            target_modules=s["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    args = TrainingArguments(
        output_dir=str(out_json.parent / "baseline_ckpt"),
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=s["learning_rate"],
        lr_scheduler_type=s["lr_scheduler_type"],
        warmup_steps=s["warmup_steps"],
        weight_decay=s["weight_decay"],
        optim=s["optim"],
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=s["logging_steps"],
        save_strategy="no",
        report_to="none",
        seed=s["seed"],
        data_seed=s["seed"],
        disable_tqdm=True,
        **(CHECKPOINTING if qlora else {}),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    name = "transformers+peft+bitsandbytes QLoRA (baseline)" if qlora else "transformers+peft (baseline)"
    result = summarize(name, warmup, {"attn": "sdpa", "batches": "padded to longest", "qlora": qlora})
    harness.write_json(out_json, result)
    return result


def runner_main(run_row: Any, description: str | None, argv: list[str] | None = None) -> int:
    """The command line every row runner shares: --model --data --steps --warmup --json, one summary line out."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="jsonl with a 'text' field")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    r = run_row(a.model, a.data, a.steps, a.warmup, a.json)
    print(json.dumps({k: v for k, v in r.items() if k not in ("step_times", "step_tokens")}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return runner_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
