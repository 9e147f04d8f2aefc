"""The LoRA matrices in the compute dtype, cast once per optimizer step for all layers together.

peft keeps A and B in fp32 and the fused functions (fused.py) run their GEMMs in bf16, so every layer cast both
matrices in its forward and made B^T contiguous again in its backward: on Phi-3-mini about 400 small copy kernels
and their launches per step (run 10's profile: 1.9 ms of GPU time and, on a host-bound step, the host time of every
launch). Here the copies persist and are refreshed only when the fp32 values changed, every stale one in a single
`torch._foreach_copy_`. B's copy is stored transposed (B^T contiguous, read through a (out, r) view), the layout the
backward's gradient GEMM `g @ B` takes without a copy.

When is a copy stale? Fused AdamW updates the parameters without bumping their version counters, so the version
alone cannot tell: every optimizer step (a global post-step hook, any torch optimizer) starts a new generation, and
a copy is current only for the generation, version and storage it was made from. A parameter rewritten through
`.data` outside an optimizer step (neither seen) needs `invalidate()`; the fused layers call it when (un)fused.
Under inference mode or a CUDA-graph capture the casts are plain `.to()` copies, cached nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class _Copy:
    copy: Any  # the compute-dtype tensor handed out (for B a view of a transposed buffer)
    generation: int
    version: int
    data_ptr: int


_STATE: dict[str, Any] = {"generation": 0, "hook": None, "copies": None}


def _copies() -> Any:
    """fp32 parameter -> _Copy, weakly keyed by identity (tensors compare elementwise)."""
    if _STATE["copies"] is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _STATE["copies"] = WeakIdKeyDictionary()
    return _STATE["copies"]


def invalidate() -> None:
    """Every cached copy stale: the next lookup refreshes them (a new generation)."""
    _STATE["generation"] += 1


def _install_hook() -> None:
    if _STATE["hook"] is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STATE["hook"] = register_optimizer_step_post_hook(lambda *_: invalidate())


def may_keep_tensors(t: Any) -> bool:
    """Whether a tensor made now may outlive this call: not under inference mode (an inference tensor could not be
    saved for a later training backward) nor during a CUDA-graph capture (its memory belongs to the graph)."""
    import torch

    return not (torch.is_inference_mode_enabled() or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def _current(entry: _Copy | None, param: Any) -> bool:
    return (
        entry is not None
        and entry.generation == _STATE["generation"]
        and entry.version == param._version
        and entry.data_ptr == param.data_ptr()
    )


def _new_copy(param: Any, dtype: Any, transposed: bool) -> Any:
    import torch

    if transposed:  # (out, r) read from a contiguous (r, out) buffer: B^T without a copy in the backward
        return torch.empty(param.shape[::-1], dtype=dtype, device=param.device).t()
    return torch.empty(param.shape, dtype=dtype, device=param.device)


def _refresh(dtype: Any) -> None:
    """Re-copy every stale cached parameter of this dtype's copies in one foreach call per device."""
    import torch

    groups: dict[Any, tuple[list, list]] = {}
    for param, entry in list(_copies().items()):
        if entry.copy.dtype != dtype or _current(entry, param):
            continue
        if entry.data_ptr != param.data_ptr() or entry.copy.device != param.device:  # new storage: new buffer
            entry.copy = _new_copy(param, dtype, transposed=not entry.copy.is_contiguous())
        dst, src = groups.setdefault(param.device, ([], []))
        dst.append(entry.copy)
        src.append(param.detach())
        entry.generation, entry.version, entry.data_ptr = _STATE["generation"], param._version, param.data_ptr()
    with torch.no_grad():
        for dst, src in groups.values():
            torch._foreach_copy_(dst, src)


def compute_copies(a: Any, b: Any, dtype: Any) -> tuple[Any, Any]:
    """(A, B) in `dtype` for a fused LoRA layer's GEMMs: cached copies kept current with the parameters (the
    parameters themselves when already in dtype)."""
    if a.dtype == dtype and b.dtype == dtype:
        return a, b
    if not may_keep_tensors(a):
        return a.to(dtype), b.to(dtype)
    _install_hook()
    copies = _copies()
    ea, eb = copies.get(a), copies.get(b)
    if _current(ea, a) and _current(eb, b) and ea.copy.dtype == dtype and eb.copy.dtype == dtype:
        return ea.copy, eb.copy
    for param, transposed in ((a, False), (b, True)):
        entry = copies.get(param)
        if entry is None or entry.copy.dtype != dtype:
            copies[param] = _Copy(_new_copy(param, dtype, transposed), -1, -1, param.data_ptr())  # stale: filled now
    _refresh(dtype)
    return copies[a].copy, copies[b].copy


def release(params: Any) -> None:
    """Drop the cached copies of these parameters (a model unfused: its copies' memory back)."""
    copies = _copies()
    for param in params:
        copies.pop(param, None)


def has_copy(param: Any) -> bool:
    """Whether this parameter has a cached copy."""
    return param in _copies()
