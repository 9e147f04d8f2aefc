"""Checkpointed decoder-layer inputs kept in pinned host memory between the forward and the backward.

Why: with gradient checkpointing the only activations a layer keeps are its input hidden states, and those stay on
the GPU from the layer's forward until its backward: 32 x 8192 x 3072 bf16 = 1.6 GB on Phi-3-mini at 8 x 1024
tokens, about a third of a QLoRA step's peak. Unsloth's "unsloth" checkpointing moves them to the host; this does
the same without slowing the step: every copy runs on a side CUDA stream, overlapped with the layers' compute.

How: `CheckpointOffloader.checkpoint` is the function a transformers GradientCheckpointingLayer calls in place of
torch.utils.checkpoint (`install` puts it on the model's layers after the Trainer enabled checkpointing). It runs
torch's reentrant checkpoint, which saves the layer's tensor inputs through `ctx.save_for_backward` (the
non-reentrant one keeps them in a closure, out of reach), inside a `saved_tensors_hooks` pair:
- pack (forward): a CUDA tensor of at least `min_bytes` is kept, and the one packed before it (the previous
  layer's input) is copied into a pinned host buffer on the copy stream, after the compute stream's work so far;
  `record_stream` keeps the allocator from reusing its GPU memory before the copy has read it. The newest one stays
  on the GPU: the backward needs it first, and nothing would hide its copy back. Smaller tensors stay where they are.
- unpack (backward): the layers come back in reverse order, so unpacking layer i waits (on the GPU, not the host)
  for its copy back, and starts the copy back of the layer saved before it (i - 1), which then runs during
  layer i's recompute and backward. One layer input at a time is in flight each way.
The recompute draws the forward's random numbers (reentrant checkpoint restores the CPU and CUDA RNG states), so
LoRA dropout masks are the same as without offloading.

`include_cpu=True` treats CPU tensors the same way (copied to a separate CPU buffer and back), so that the
bookkeeping runs where there is no GPU (the tests).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

MIN_OFFLOAD_BYTES = 1 << 20  # smaller saved tensors (position ids, masks) are not worth a copy each way


class _Offloaded:
    """One saved tensor while it lives on the host: the host copy, and its way back to the device."""

    __slots__ = ("__weakref__", "device", "device_copy", "done", "host", "ready", "stored")

    def __init__(self, t: Any) -> None:
        self.device = t.device
        self.device_copy: Any = t  # on the device: the saved tensor until offloaded, then its copy back once fetched
        self.host: Any = None  # the host copy, once offloaded
        self.stored: Any = None  # CUDA event: the host copy is complete (None on CPU)
        self.ready: Any = None  # CUDA event: device_copy (fetched back) is complete (None on CPU)
        self.done = False  # unpacked


class CheckpointOffloader:
    """A checkpoint function for transformers' layers that keeps their saved inputs in pinned host memory.

    Counters (for the tests and the benchmark): `packed` tensors the hooks took, `offloaded` of them moved to the
    host (`offloaded_bytes`), `unpacked` handed back to the backward, `prefetched` brought back ahead of their unpack.
    """

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES, *, include_cpu: bool = False) -> None:
        self.min_bytes = int(min_bytes)
        self.include_cpu = include_cpu
        self.packed = self.offloaded = self.unpacked = self.prefetched = self.offloaded_bytes = 0
        self._order: list[weakref.ref[_Offloaded]] = []  # packed tensors in pack order, not yet unpacked
        self._newest: weakref.ref[_Offloaded] | None = None  # the last packed one: still on the device
        self._streams: dict[Any, Any] = {}

    # -- the checkpoint function ------------------------------------------------------------------------------

    def checkpoint(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """torch.utils.checkpoint(function, *args) with the saved tensor inputs offloaded (see the module doc).

        Keyword arguments other than preserve_rng_state / use_reentrant are bound to `function` (the reentrant
        checkpoint takes positional tensors only). Where no tensor input requires grad the reentrant checkpoint
        would give its parameters no gradient, so that call runs through the non-reentrant one, not offloaded.
        """
        import torch
        from torch.utils.checkpoint import checkpoint

        preserve = kwargs.pop("preserve_rng_state", True)
        kwargs.pop("use_reentrant", None)
        for key in ("context_fn", "determinism_check", "debug"):  # non-reentrant options: not applicable here
            kwargs.pop(key, None)
        if kwargs:
            function = functools.partial(function, **kwargs)
        if not torch.is_grad_enabled():
            return function(*args)
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=preserve)
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, use_reentrant=True, preserve_rng_state=preserve)

    def install(self, model: Any) -> int:
        """Make every checkpointing module of `model` (those with gradient checkpointing on) use this offloader's
        checkpoint function; returns how many. Call it after the model's gradient checkpointing was enabled (the
        Trainer enables it at the start of train(), before the callbacks' on_train_begin)."""
        count = 0
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = self.checkpoint
                count += 1
        return count

    def pending(self) -> int:
        """Packed tensors not unpacked yet (0 after every backward: nothing carries over between steps)."""
        self._order = [ref for ref in self._order if ref() is not None]
        return len(self._order)

    # -- the hooks ----------------------------------------------------------------------------------------------

    def _wanted(self, t: Any) -> bool:
        if not (t.is_cuda or (self.include_cpu and t.device.type == "cpu")):
            return False
        return t.numel() * t.element_size() >= self.min_bytes and not t.is_sparse

    def _copy_stream(self, device: Any) -> Any:
        import torch

        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _pack(self, t: Any) -> Any:
        if not self._wanted(t):
            return t
        previous = self._newest() if self._newest is not None else None
        if previous is not None and not previous.done and previous.host is None:
            self._offload(previous)
        saved = _Offloaded(t)
        self._newest = weakref.ref(saved)
        self._order.append(self._newest)
        self.packed += 1
        return saved

    def _offload(self, saved: _Offloaded) -> None:
        import torch

        t = saved.device_copy
        if t.is_cuda:
            stream = self._copy_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete once the work so far is
            with torch.cuda.stream(stream):
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                saved.stored = torch.cuda.Event()
                saved.stored.record(stream)
            t.record_stream(stream)  # its memory is not reused before the copy has read it
        else:
            host = t.detach().clone()  # the CPU stand-in of a host copy
        saved.host, saved.device_copy = host, None
        self.offloaded += 1
        self.offloaded_bytes += t.numel() * t.element_size()

    def _unpack(self, saved: Any) -> Any:
        import torch

        if not isinstance(saved, _Offloaded):
            return saved
        if saved.device_copy is None:
            self._fetch(saved)
        index = self._position(saved)
        if index is not None:
            del self._order[index]
            self._prefetch_before(index)
        out = saved.device_copy
        if saved.ready is not None:
            torch.cuda.current_stream(saved.device).wait_event(saved.ready)
        if saved.host is not None:  # the caller owns the copy back now; a second unpack (retain_graph) fetches again
            saved.device_copy = saved.ready = None
        saved.done = True
        self.unpacked += 1
        return out

    def _position(self, saved: _Offloaded) -> int | None:
        for i in range(len(self._order) - 1, -1, -1):  # the unpacked one is nearly always the newest
            if self._order[i]() is saved:
                return i
        return None

    def _prefetch_before(self, index: int) -> None:
        """Start bringing back the newest tensor saved before position `index` that is not on its way yet."""
        for i in range(index - 1, -1, -1):
            earlier = self._order[i]()
            if earlier is None:
                continue
            if earlier.device_copy is None and earlier.host is not None:
                self._fetch(earlier)
                self.prefetched += 1
            return

    def _fetch(self, saved: _Offloaded) -> None:
        import torch

        if saved.device.type != "cuda":
            saved.device_copy = saved.host.clone()  # the CPU stand-in of a copy back
            return
        current = torch.cuda.current_stream(saved.device)
        stream = self._copy_stream(saved.device)
        # allocated on the compute stream (its memory pool), so the copy must wait for the work queued there so
        # far: the block may still be in use by those kernels
        out = torch.empty(saved.host.shape, dtype=saved.host.dtype, device=saved.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            stream.wait_event(saved.stored)
            out.copy_(saved.host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        out.record_stream(stream)  # freed unused (the graph dropped before the backward): not before the copy
        saved.device_copy, saved.ready = out, ready


def offload_callback(offloader: CheckpointOffloader, info: Any = None) -> Any:
    """A TrainerCallback that installs `offloader` on the model's checkpointed layers when training begins (after
    the Trainer enabled gradient checkpointing, which sets torch's checkpoint function on each layer)."""
    from transformers import TrainerCallback

    class CheckpointOffloadCallback(TrainerCallback):
        installed = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if model is None:
                return
            self.installed = offloader.install(model)
            if info is not None and self.installed:
                info(f"checkpointed layer inputs offloaded to pinned host memory ({self.installed} modules)")

    return CheckpointOffloadCallback()
