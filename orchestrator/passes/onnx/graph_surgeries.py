"""GraphSurgeries (Olive): named edits of an ONNX graph. orch runs one surgeon, TieWordEmbeddings: the token
embedding Gather is replaced by a GatherBlockQuantized that reads the LM head's MatMulNBits weight, scales and
zero points (through Reshape nodes, no copy), and the embedding table is dropped, so the two share one quantized
initializer (Qwen3-0.6B ties them: the model gets smaller by the float embedding table).

It is a real tie only if the two were the same matrix: the embedding is compared with the LM head's dequantized
weight first, and the surgery refuses a model whose embedding differs (tie_word_embeddings false) instead of
silently changing its outputs. Edited with onnx-ir; the model is written to a new folder with the genai files.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from orchestrator.core.fs import atomic_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput

SURGEONS = ("TieWordEmbeddings",)
TIE_TOL = 0.05  # relative L2 of embedding vs dequantized LM head: ~1e-6 when tied (same grid), O(1) when not


class Surgery(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    surgeon: str


class GraphSurgeriesConfig(PassConfig):
    surgeries: list[Surgery]


class GraphSurgeriesPass(Pass):
    type_name: ClassVar[str] = "GraphSurgeries"
    Config: ClassVar[type[PassConfig]] = GraphSurgeriesConfig
    version: ClassVar[str] = "1"
    libraries: ClassVar[tuple[str, ...]] = ("onnx-ir", "onnx")

    @classmethod
    def config_problems(cls, config: PassConfig) -> list[str]:
        assert isinstance(config, GraphSurgeriesConfig)
        out = []
        for s in config.surgeries:
            if s.surgeon not in SURGEONS:
                out.append(f"GraphSurgeries: surgeon {s.surgeon!r} is not supported (supported: {', '.join(SURGEONS)})")
            elif s.model_extra:
                out.append(f"GraphSurgeries: {s.surgeon} takes no options, got {', '.join(sorted(s.model_extra))}")
        if not config.surgeries:
            out.append("GraphSurgeries: surgeries is empty")
        return out

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, GraphSurgeriesConfig)
        for msg in self.config_problems(config):
            raise PassError(msg)
        if model is None or model.format not in ("onnx_genai", "onnx"):
            raise PassError("GraphSurgeries needs an ONNX model (a ModelBuilder output) as input")
        import onnx_ir as ir

        from orchestrator.passes.common import onnx_tools

        src = Path(model.path)
        onnx_path = onnx_tools.onnx_model_file(src)
        size_before = onnx_tools.model_size_bytes(src)
        m = ir.load(onnx_path)
        for _ in config.surgeries:
            msg = tie_word_embeddings(m)
            ctx.info(f"GraphSurgeries TieWordEmbeddings: {msg}")
        dest = ctx.out_dir / "model"
        with atomic_dir(dest) as tmp:
            data_files = {p.name for p in onnx_tools.external_data_files(onnx_path)}
            for f in src.iterdir():
                if f.is_file() and f.name != onnx_path.name and f.name not in data_files:
                    shutil.copy2(f, tmp / f.name)
            ir.save(m, tmp / onnx_path.name, external_data=f"{onnx_path.name}.data")
        size_after = onnx_tools.model_size_bytes(dest)
        ctx.info(f"GraphSurgeries: model {size_before / 1e6:.2f} MB -> {size_after / 1e6:.2f} MB")
        return PassOutput(
            model=ModelArtifact(format=model.format, path="model", task=model.task, quantized=model.quantized),
            metrics={"size_before_bytes": float(size_before), "model_size_bytes": float(size_after)},
        )


def _unpack(packed: Any, bits: int) -> Any:
    import numpy as np

    if bits == 8:
        return packed.astype(np.float32)
    lo, hi = packed & 0xF, packed >> 4
    return np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.float32)


def tie_word_embeddings(m: Any) -> str:
    """Point the embedding lookup at the LM head's MatMulNBits weight; refuse if they are not the same matrix."""
    import numpy as np
    import onnx_ir as ir

    g = m.graph
    gathers = [n for n in g if n.op_type == "Gather" and n.inputs[0] is not None and n.inputs[0].is_initializer()]
    lm = [n for n in g if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")]
    if len(gathers) != 1 or len(lm) != 1:
        raise PassError(
            f"TieWordEmbeddings: expected one float embedding Gather and one LM-head MatMulNBits, found "
            f"{len(gathers)} and {len(lm)} (build with ModelBuilder int4 and a quantized lm_head)"
        )
    gather, head = gathers[0], lm[0]
    attrs = {a.name: a.value for a in head.attributes.values()}
    k, n, bits, block = (int(attrs[x]) for x in ("K", "N", "bits", "block_size"))
    emb_v = gather.inputs[0]
    emb = emb_v.const_value.numpy().astype(np.float32)
    if emb.shape != (n, k) or k % block:
        raise PassError(f"TieWordEmbeddings: embedding {emb.shape} does not match the LM head ({n}, {k}) / block")
    w_v, s_v = head.inputs[1], head.inputs[2]
    zp_v = head.inputs[3] if len(head.inputs) > 3 else None
    blocks = k // block
    q = _unpack(w_v.const_value.numpy().reshape(n, blocks, -1), bits).reshape(n, blocks, block)
    scales = s_v.const_value.numpy().astype(np.float32).reshape(n, blocks)
    if zp_v is not None and zp_v.const_value is not None:
        z = _unpack(zp_v.const_value.numpy().reshape(n, -1), bits)[:, :blocks]
    else:
        z = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    deq = ((q - z[:, :, None]) * scales[:, :, None]).reshape(n, k)
    rel = float(np.linalg.norm(deq - emb) / max(np.linalg.norm(emb), 1e-12))
    if not rel <= TIE_TOL:
        raise PassError(
            f"TieWordEmbeddings: the embedding differs from the LM head (relative L2 {rel:.2f}): the model's "
            "embeddings are not tied (tie_word_embeddings false), tying them would change its outputs"
        )

    def const(name: str, values: list[int]) -> Any:
        v = ir.Value(name=name, const_value=ir.tensor(np.array(values, dtype=np.int64), name=name))
        g.register_initializer(v)
        return v

    base = "/model/embed_tokens"
    row_bytes = k * bits // 8
    nodes = [
        ir.Node("", "Reshape", [w_v, const(f"{base}/tied_weight_shape", [n, row_bytes])], name=f"{base}/TiedWeight"),
        ir.Node("", "Reshape", [s_v, const(f"{base}/tied_scales_shape", [n, blocks])], name=f"{base}/TiedScales"),
    ]
    inputs = [nodes[0].outputs[0], gather.inputs[1], nodes[1].outputs[0]]
    if zp_v is not None:
        zp_cols = zp_v.const_value.numpy().size // n
        nodes.append(
            ir.Node("", "Reshape", [zp_v, const(f"{base}/tied_zp_shape", [n, zp_cols])], name=f"{base}/TiedZeros")
        )
        inputs.append(nodes[-1].outputs[0])
    gbq = ir.Node(
        "com.microsoft",
        "GatherBlockQuantized",
        inputs,
        attributes=[
            ir.AttrInt64("bits", bits),
            ir.AttrInt64("block_size", block),
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
        ],
        name=f"{base}/GatherBlockQuantized",
    )
    out = gbq.outputs[0]
    out.name = f"{base}/GatherBlockQuantized/output_0"
    out.dtype = gather.outputs[0].dtype
    out.shape = gather.outputs[0].shape
    g.insert_before(gather, [*nodes, gbq])
    ir.convenience.replace_all_uses_with(gather.outputs[0], out)
    if gather.outputs[0].is_graph_output():
        raise PassError("TieWordEmbeddings: the embedding output is a graph output (unexpected graph)")
    g.remove(gather, safe=True)
    del g.initializers[emb_v.name]
    if not any(op.domain == "com.microsoft" for op in [gbq]) or "com.microsoft" not in m.opset_imports:
        m.opset_imports["com.microsoft"] = 1
    return f"embedding ({n}x{k}) now reads the LM head's {bits}-bit weight (rel. diff {rel:.1e}); table dropped"
