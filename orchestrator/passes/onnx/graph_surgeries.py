"""GraphSurgeries (Olive): named edits of an ONNX graph. orch runs three surgeons. TieWordEmbeddings: the token
embedding Gather is replaced by a GatherBlockQuantized that reads the LM head's MatMulNBits weight, scales and
zero points (through Reshape nodes, no copy), and the embedding table is dropped, so the two share one quantized
initializer (Qwen3-0.6B ties them: the model gets smaller by the float embedding table). In a float build (fp16 /
fp32) the LM head reads the embedding table instead, through a Gemm with transB (Olive's unquantized tie).

It is a real tie only if the two were the same matrix: the embedding is compared with the LM head's dequantized
weight first, and the surgery refuses a model whose embedding differs (tie_word_embeddings false) instead of
silently changing its outputs. Edited with onnx-ir; the model is written to a new folder with the genai files.

QuantizeEmbeddingInt8 (Olive >= 0.12): the float embedding table becomes 8-bit codes in blocks of 32 along the
hidden axis (symmetric: scale = max |w| / 127, codes stored as uint8 with zero point 128) read by a
GatherBlockQuantized; the scales keep the table's float type. ShareEmbeddingLmHead, after it: the LM head's
MatMulNBits is replaced by an 8-bit MatMulNBits reading those same codes, scales and zero points (a Reshape, no
copy), so both share one int8 table; as with TieWordEmbeddings, the LM head's weights are compared with the table
first and an untied model is refused. Where the graph has nothing to edit (no float embedding Gather, no 8-bit
embedding or no quantized LM head) the surgeon changes nothing and says so, as Olive's does.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from orchestrator.core.fs import atomic_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput

SURGEONS = ("TieWordEmbeddings", "QuantizeEmbeddingInt8", "ShareEmbeddingLmHead")
EMBED_BLOCK = 32  # QuantizeEmbeddingInt8's block along the hidden axis
# ShareEmbeddingLmHead: the int4 LM head vs the int8 table, both rounded: ~0.1 when tied, ~1.4 (sqrt 2) when not
SHARE_TOL = 0.3
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
        for surgery in config.surgeries:
            msg = SURGEON_FUNCS[surgery.surgeon](m)
            ctx.info(f"GraphSurgeries {surgery.surgeon}: {msg}")
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


def _reads_head_weight(g: Any, head: Any) -> bool:
    """The builder's own tie (shared embeddings): the embedding lookup (Gather / GatherBlockQuantized) reads the LM
    head's weight, directly or through a Transpose / Reshape."""
    w = head.inputs[1]

    def source(v: Any) -> Any:
        node = v.producer() if v is not None else None
        return node.inputs[0] if node is not None and node.op_type in ("Transpose", "Reshape") else v

    return any(n.op_type in ("Gather", "GatherBlockQuantized") and n.inputs[0] is not None and source(n.inputs[0]) is w
               for n in g)  # fmt: skip


def _tie_float(m: Any, gather: Any, head: Any) -> str:
    """A float model (fp16/fp32 build): the LM head MatMul(x, W[H, V]) becomes Gemm(x as 2-D, E[V, H], transB=1)
    reading the embedding table itself, reshaped back to x's leading dims; W is dropped (Olive's unquantized tie)."""
    import numpy as np
    import onnx_ir as ir

    g = m.graph
    emb_v, w_v = gather.inputs[0], head.inputs[1]
    emb = emb_v.const_value.numpy().astype(np.float32)
    w = w_v.const_value.numpy().astype(np.float32)
    if emb.shape != w.T.shape:
        raise PassError(f"TieWordEmbeddings: embedding {emb.shape} does not match the LM head {w.shape} transposed")
    rel = float(np.linalg.norm(w.T - emb) / max(np.linalg.norm(emb), 1e-12))
    if not rel <= 1e-3:
        raise PassError(
            f"TieWordEmbeddings: the embedding differs from the LM head (relative L2 {rel:.2f}): the model's "
            "embeddings are not tied (tie_word_embeddings false), tying them would change its outputs"
        )
    vocab, hidden = emb.shape
    base = "/lm_head"

    def const(name: str, values: list[int]) -> Any:
        v = ir.Value(name=name, const_value=ir.tensor(np.array(values, dtype=np.int64), name=name))
        g.register_initializer(v)
        return v

    x = head.inputs[0]
    flat = ir.Node("", "Reshape", [x, const(f"{base}/tied_2d_shape", [-1, hidden])], name=f"{base}/TiedFlatten")
    gemm = ir.Node("", "Gemm", [flat.outputs[0], emb_v], attributes=[ir.AttrInt64("transB", 1)], name=f"{base}/Gemm")
    shape = ir.Node("", "Shape", [x], attributes=[ir.AttrInt64("end", -1)], name=f"{base}/TiedLeadingDims")
    dims = ir.Node("", "Concat", [shape.outputs[0], const(f"{base}/tied_vocab", [vocab])],
                   attributes=[ir.AttrInt64("axis", 0)], name=f"{base}/TiedOutShape")  # fmt: skip
    back = ir.Node("", "Reshape", [gemm.outputs[0], dims.outputs[0]], name=f"{base}/TiedReshape")
    out = back.outputs[0]
    out.dtype, out.shape = head.outputs[0].dtype, head.outputs[0].shape
    g.insert_before(head, [flat, gemm, shape, dims, back])
    was_output = head.outputs[0].is_graph_output()
    name = head.outputs[0].name
    ir.convenience.replace_all_uses_with(head.outputs[0], out, replace_graph_outputs=True)
    g.remove(head, safe=True)
    if was_output:
        out.name = name
    del g.initializers[w_v.name]
    return f"LM head ({hidden}x{vocab}) reads the embedding table through a Gemm (rel. diff {rel:.1e}); copy dropped"


def tie_word_embeddings(m: Any) -> str:
    """Point the embedding lookup at the LM head's MatMulNBits weight; refuse if they are not the same matrix."""
    import numpy as np
    import onnx_ir as ir

    g = m.graph
    gathers = [n for n in g if n.op_type == "Gather" and n.inputs[0] is not None and n.inputs[0].is_initializer()]
    lm = [n for n in g if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")]
    float_heads = [n for n in g if n.op_type == "MatMul" and n.name.startswith("/lm_head/")
                   and n.inputs[1] is not None and n.inputs[1].is_initializer()]  # fmt: skip
    if len(gathers) == 1 and not lm and len(float_heads) == 1:
        return _tie_float(m, gathers[0], float_heads[0])
    heads = lm or float_heads
    if len(heads) == 1 and _reads_head_weight(g, heads[0]):
        return "already tied: the builder's embedding lookup reads the LM head's weight; nothing to do"
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


def _embedding_gather(g: Any, op: str) -> Any:
    """The token embedding lookup: the one `op` node reading an initializer table (named embed_tokens if several)."""
    found = [n for n in g if n.op_type == op and n.inputs[0] is not None and n.inputs[0].is_initializer()]
    named = [n for n in found if "embed_tokens" in (n.name or "")]
    return (named or found)[0] if len(named or found) == 1 else None


def quantize_embedding_int8(m: Any) -> str:
    """The float embedding table -> int8 codes (blocks of EMBED_BLOCK along the hidden axis) + GatherBlockQuantized."""
    import numpy as np
    import onnx_ir as ir

    g = m.graph
    gather = _embedding_gather(g, "Gather")
    if gather is None:
        if any(n.op_type == "GatherBlockQuantized" for n in g):
            return "the embedding lookup is already quantized (GatherBlockQuantized); nothing to do"
        return "no float embedding Gather in the graph; nothing to do"
    emb_v = gather.inputs[0]
    table = emb_v.const_value.numpy()
    if table.dtype not in (np.float16, np.float32) or table.ndim != 2:
        return f"the embedding table is {table.dtype} {table.shape}, not a float matrix; nothing to do"
    vocab, hidden = table.shape
    if hidden % EMBED_BLOCK:
        return f"hidden size {hidden} is not a multiple of {EMBED_BLOCK}; nothing to do"
    blocks = hidden // EMBED_BLOCK
    w = table.astype(np.float32).reshape(vocab, blocks, EMBED_BLOCK)
    scales = (np.abs(w).max(axis=2) / 127.0).astype(table.dtype)
    safe = np.where(scales.astype(np.float32) == 0, 1.0, scales.astype(np.float32))
    codes = (np.clip(np.round(w / safe[:, :, None]), -127, 127) + 128).astype(np.uint8).reshape(vocab, hidden)
    deq = ((codes.astype(np.float32).reshape(vocab, blocks, EMBED_BLOCK) - 128) * safe[:, :, None]).reshape(vocab, -1)
    rel = float(np.linalg.norm(deq - table.astype(np.float32)) / max(np.linalg.norm(table.astype(np.float32)), 1e-12))
    base = "/model/embed_tokens"

    def init(name: str, array: Any) -> Any:
        v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        g.register_initializer(v)
        return v

    inputs = [init(f"{emb_v.name}_int8", codes), gather.inputs[1], init(f"{emb_v.name}_int8_scales", scales),
              init(f"{emb_v.name}_int8_zp", np.full((vocab, blocks), 128, np.uint8))]  # fmt: skip
    gbq = ir.Node("com.microsoft", "GatherBlockQuantized", inputs, name=f"{base}/GatherBlockQuantized",
                  attributes=[ir.AttrInt64("bits", 8), ir.AttrInt64("block_size", EMBED_BLOCK),
                              ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1)])  # fmt: skip
    out = gbq.outputs[0]
    out.name = f"{base}/GatherBlockQuantized/output_0"
    out.dtype, out.shape = gather.outputs[0].dtype, gather.outputs[0].shape
    if gather.outputs[0].is_graph_output():
        raise PassError("QuantizeEmbeddingInt8: the embedding output is a graph output (unexpected graph)")
    g.insert_before(gather, [gbq])
    ir.convenience.replace_all_uses_with(gather.outputs[0], out)
    g.remove(gather, safe=True)
    if not list(emb_v.uses()):
        del g.initializers[emb_v.name]
    m.opset_imports["com.microsoft"] = max(m.opset_imports.get("com.microsoft", 0), 1)
    size = (table.nbytes, codes.nbytes + scales.nbytes + vocab * blocks)
    return (f"embedding ({vocab}x{hidden}) -> int8 blocks of {EMBED_BLOCK}, GatherBlockQuantized "
            f"({size[0] / 1e6:.2f} -> {size[1] / 1e6:.2f} MB, rel. L2 error {rel:.1e})")  # fmt: skip


def share_embedding_lm_head(m: Any) -> str:
    """The LM head's MatMulNBits -> an 8-bit MatMulNBits reading the int8 embedding's codes, scales and zero points;
    refused when the head's weights are not the embedding's (an untied model)."""
    import numpy as np
    import onnx_ir as ir

    g = m.graph
    gbq = _embedding_gather(g, "GatherBlockQuantized")
    heads = [n for n in g if n.op_type == "MatMulNBits" and "lm_head" in (n.name or "")]
    if gbq is None and len(heads) == 1 and _reads_head_weight(g, heads[0]):
        return "the builder already shares the LM head's weight with the embedding lookup; nothing to do"
    if gbq is None:
        return "no int8 embedding lookup (run QuantizeEmbeddingInt8 first); nothing to do"
    gattrs = {a.name: a.value for a in gbq.attributes.values()}
    if int(gattrs.get("bits", 4)) != 8:
        return f"the embedding lookup is {int(gattrs.get('bits', 4))}-bit, not 8-bit; nothing to do"
    if len(heads) != 1:
        return "no quantized LM head (MatMulNBits) in the graph; nothing to do"
    head = heads[0]
    codes_v, scales_v = gbq.inputs[0], gbq.inputs[2]
    zp_v = gbq.inputs[3] if len(gbq.inputs) > 3 else None
    if head.inputs[1] is not None and head.inputs[1].producer() is not None:
        src = head.inputs[1].producer().inputs[0]
        if src is codes_v:
            return "the LM head already reads the embedding's int8 table; nothing to do"
    codes = codes_v.const_value.numpy()
    vocab, hidden = codes.shape
    block = int(gattrs.get("block_size", EMBED_BLOCK))
    blocks = hidden // block
    hattrs = {a.name: a.value for a in head.attributes.values()}
    k, n, bits, hblock = (int(hattrs[x]) for x in ("K", "N", "bits", "block_size"))
    if (n, k) != (vocab, hidden):
        raise PassError(f"ShareEmbeddingLmHead: the LM head ({n}x{k}) does not match the embedding ({vocab}x{hidden})")
    scales = scales_v.const_value.numpy().astype(np.float32).reshape(vocab, blocks)
    zp = zp_v.const_value.numpy().astype(np.float32).reshape(vocab, blocks) if zp_v is not None else 128.0
    emb = ((codes.astype(np.float32).reshape(vocab, blocks, block) - np.asarray(zp)[..., None])
           * scales[:, :, None]).reshape(vocab, hidden)  # fmt: skip
    hb = k // hblock
    q = _unpack(head.inputs[1].const_value.numpy().reshape(n, hb, -1), bits).reshape(n, hb, hblock)
    hs = head.inputs[2].const_value.numpy().astype(np.float32).reshape(n, hb)
    hz_v = head.inputs[3] if len(head.inputs) > 3 else None
    hz = (_unpack(hz_v.const_value.numpy().reshape(n, -1), bits)[:, :hb] if hz_v is not None
          else np.full((n, hb), 2 ** (bits - 1), np.float32))  # fmt: skip
    deq = ((q - hz[:, :, None]) * hs[:, :, None]).reshape(n, k)
    rel = float(np.linalg.norm(deq - emb) / max(np.linalg.norm(emb), 1e-12))
    if not rel <= SHARE_TOL:
        raise PassError(
            f"ShareEmbeddingLmHead: the LM head differs from the embedding (relative L2 {rel:.2f}): the model's "
            "embeddings are not tied (tie_word_embeddings false), sharing them would change its outputs"
        )

    def const(name: str, values: list[int]) -> Any:
        v = ir.Value(name=name, const_value=ir.tensor(np.array(values, dtype=np.int64), name=name))
        g.register_initializer(v)
        return v

    base = "/lm_head"
    reshape = ir.Node("", "Reshape", [codes_v, const(f"{base}/shared_weight_shape", [vocab, blocks, block])],
                      name=f"{base}/SharedWeight")  # fmt: skip
    inputs = [head.inputs[0], reshape.outputs[0], scales_v] + ([zp_v] if zp_v is not None else [])
    attrs = [ir.AttrInt64("K", hidden), ir.AttrInt64("N", vocab), ir.AttrInt64("bits", 8),
             ir.AttrInt64("block_size", block)]  # fmt: skip
    if "accuracy_level" in hattrs:
        attrs.append(ir.AttrInt64("accuracy_level", int(hattrs["accuracy_level"])))
    new = ir.Node("com.microsoft", "MatMulNBits", inputs, attributes=attrs, name=f"{base}/MatMulNBits")
    old_out, out = head.outputs[0], new.outputs[0]
    out.dtype, out.shape = old_out.dtype, old_out.shape
    old_inputs = [v for v in head.inputs[1:] if v is not None]
    g.insert_before(head, [reshape, new])
    was_output, name = old_out.is_graph_output(), old_out.name
    ir.convenience.replace_all_uses_with(old_out, out, replace_graph_outputs=True)
    g.remove(head, safe=True)
    if was_output:
        out.name = name
    for v in old_inputs:
        if v.name in g.initializers and not list(v.uses()):
            del g.initializers[v.name]
    return (f"LM head ({hidden}x{vocab}, {bits}-bit) now an 8-bit MatMulNBits on the embedding's int8 table "
            f"(rel. diff {rel:.1e}); its own weights dropped")  # fmt: skip


SURGEON_FUNCS = {
    "TieWordEmbeddings": tie_word_embeddings,
    "QuantizeEmbeddingInt8": quantize_embedding_int8,
    "ShareEmbeddingLmHead": share_embedding_lm_head,
}
