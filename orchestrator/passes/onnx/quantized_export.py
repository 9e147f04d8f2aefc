"""OnnxConversion of an int4/int8 Hugging Face checkpoint (AutoAWQQuantizer / GptqQuantizer's GPTQ layout, or
Olive's own layout from Gptq / Rtn / SelectiveMixedPrecision): each quantized Linear becomes a MatMulNBits node
that holds the checkpoint's own codes, scales and zero points, as Olive's exporter does with its QuantLinear
modules. Nothing is re-quantized.

How: the model is loaded with its dequantized weights (the parity reference the quantizer passes already use) and
exported as usual; every MatMul whose weight is one of those dequantized weights (a constant [in, out], or a
Transpose of [out, in]) is then found by value and replaced. The MatMulNBits of a module computes exactly the
float graph's product, so the export's parity check against the dequantized model still holds. A module the
graph does not show as a MatMul (a quantized embedding: a Gather) stays float, said in the log.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.passes.base import PassError

LAYOUTS = ("gptq", "olive")


@dataclass
class QuantLinear:
    """One quantized Linear in MatMulNBits terms: codes packed [N, k_blocks, blob], scales [N, k_blocks],
    zero points packed [N, ceil(k_blocks * bits / 8)]."""

    name: str
    bits: int
    block: int
    in_features: int
    out_features: int
    packed: Any
    scales: Any
    zeros: Any


def quant_method(hf_dir: Path | str) -> str | None:
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    q = cfg.get("quantization_config")
    return str(q.get("quant_method")) if isinstance(q, dict) else None


def load_dequantized(hf_dir: Path | str) -> Any:
    """The checkpoint as a plain float transformers model holding its dequantized weights."""
    method = quant_method(hf_dir)
    if method == "gptq":
        from orchestrator.passes.common.gptq_layout import load_dequantized as load

        return load(hf_dir)
    if method == "olive":
        from orchestrator.passes.common.olive_quant import load_dequantized as load

        return load(Path(hf_dir))
    raise PassError(
        f"OnnxConversion: a {method!r} quantized checkpoint is not exported by orch (it reads the GPTQ layout of "
        "AutoAWQQuantizer/GptqQuantizer and Olive's own); give the unquantized model, or use ModelBuilder"
    )


def quant_linears(hf_dir: Path | str) -> dict[str, QuantLinear]:
    """Every quantized module of the checkpoint, by module name."""
    import torch

    from orchestrator.passes.common import olive_quant as oq

    hf_dir = Path(hf_dir)
    state = oq.load_state(hf_dir)
    method = quant_method(hf_dir)
    cfg = oq.read_config(hf_dir)["quantization_config"]
    out: dict[str, QuantLinear] = {}
    for name in sorted(k.removesuffix(".qweight") for k in state if k.endswith(".qweight")):
        if method == "olive":
            bits, gs = oq.module_bits(cfg, name)
            scales = state[f"{name}.scales"].float()
            n, groups = scales.shape
            packed = state[f"{name}.qweight"].reshape(n, groups, gs * bits // 8)
            zeros = state[f"{name}.qzeros"]
        else:  # GPTQ layout, 4-bit: qweight int32 [in/8, out], qzeros int32 [groups, out/8] (zero - 1), g_idx [in]
            bits, gs = 4, int(cfg.get("group_size", 128))
            qweight, qzeros = state[f"{name}.qweight"], state[f"{name}.qzeros"]
            scales = state[f"{name}.scales"].float().t().contiguous()  # [out, groups]
            shifts = [4 * k for k in range(8)]
            codes = torch.stack([(qweight >> s) & 0xF for s in shifts], dim=1).reshape(-1, qweight.shape[1]).t()
            z = (torch.stack([(qzeros >> s) & 0xF for s in shifts], dim=2).reshape(qzeros.shape[0], -1) + 1) & 0xF
            n, k = codes.shape
            gs = k if gs == -1 else gs
            g_idx = state.get(f"{name}.g_idx")
            if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // gs):
                raise PassError(
                    f"OnnxConversion: {name} was quantized with act-order (desc_act): MatMulNBits needs groups in "
                    "column order; quantize with desc_act false, or use ModelBuilder"
                )
            groups = k // gs
            packed = oq._pack(codes.contiguous(), bits).reshape(n, groups, gs * bits // 8)
            zeros = oq._pack(z.t().contiguous(), bits)
        out[name] = QuantLinear(name, bits, gs, groups * gs, n, packed.contiguous(), scales, zeros.contiguous())
    return out


def _digest(array: Any) -> str:
    return hashlib.sha1(array.tobytes()).hexdigest()


def to_matmulnbits(onnx_path: Path, hf: Any, linears: dict[str, QuantLinear]) -> tuple[int, list[str]]:
    """Replace the MatMuls of the quantized modules in the exported graph (in place, one data file); returns how
    many were replaced and the modules left float."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from orchestrator.passes.common.onnx_common import save_one_data_file

    params = dict(hf.named_parameters())
    by_t: dict[tuple[tuple[int, ...], str], str] = {}  # W^T [in, out] (a folded transpose) -> module
    by_w: dict[tuple[tuple[int, ...], str], str] = {}  # W [out, in] (a Transpose node in the graph) -> module
    dtype = None
    for name in linears:
        w = params.get(f"{name}.weight")
        if w is None:
            continue
        arr = w.detach().cpu().numpy()
        dtype = arr.dtype
        by_w[(arr.shape, _digest(np.ascontiguousarray(arr)))] = name
        by_t[(arr.T.shape, _digest(np.ascontiguousarray(arr.T)))] = name
    proto = onnx.load(str(onnx_path), load_external_data=True)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    done: dict[str, str] = {}
    new_nodes = []
    drop_inits: set[str] = set()
    for node in graph.node:
        module = None
        if node.op_type == "MatMul" and len(node.input) == 2:
            b = node.input[1]
            if b in inits:
                arr = numpy_helper.to_array(inits[b])
                module = by_t.get((arr.shape, _digest(np.ascontiguousarray(arr))))
                if module:
                    drop_inits.add(b)
            elif b in producers and producers[b].op_type == "Transpose" and producers[b].input[0] in inits:
                arr = numpy_helper.to_array(inits[producers[b].input[0]])
                module = by_w.get((arr.shape, _digest(np.ascontiguousarray(arr))))
        if module is None or module in done:
            new_nodes.append(node)
            continue
        q = linears[module]
        stem = f"{module}.matmulnbits"
        scale_dtype = np.float16 if dtype == np.float16 else np.float32
        for suffix, value in (("qweight", q.packed.numpy()), ("scales", q.scales.numpy().astype(scale_dtype).ravel()),
                              ("qzeros", q.zeros.numpy().ravel())):  # fmt: skip
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), f"{stem}.{suffix}"))
        new_nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{stem}.qweight", f"{stem}.scales", f"{stem}.qzeros"],
                list(node.output),
                name=f"/{module.replace('.', '/')}/MatMulNBits",
                domain="com.microsoft",
                K=q.in_features,
                N=q.out_features,
                bits=q.bits,
                block_size=q.block,
            )
        )
        done[module] = node.name
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name not in drop_inits or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _prune_dead_transposes(graph)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for extra in onnx_path.parent.iterdir():
        if extra != onnx_path and extra.suffix != ".json" and extra.is_file():
            extra.unlink()
    save_one_data_file(proto, onnx_path, external=True)
    return len(done), sorted(set(linears) - set(done))


def _prune_dead_transposes(graph: Any) -> None:
    """Transposes of a replaced weight (and their now unused initializers) leave the graph."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Transpose" and all(o not in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
