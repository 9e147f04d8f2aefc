"""Phi-3-family attention and MLP forwards rewritten for training, installed on each module instance.

Phi3Attention slices q, k, v out of one fused qkv_proj and Phi3MLP cuts one fused gate_up_proj in two: in the
backward, each slice writes a zero-filled qkv-size gradient and the halves need copies and a cat.
`split_qkv_attention` gives every attention a forward that takes q, k, v by split (or through the qkv_rope Triton
kernel), `orch_swiglu_mlp` every MLP orch's SwiGLU kernel reading gate and up in place (and, with recompute, the
SwiGLU rebuilt in down_proj's backward). The plan (cuda.py) decides which of them run; this module installs them.
"""

from __future__ import annotations

from typing import Any

from orchestrator.passes.training.lora.unwrap import base_model

PATCHED_ATTR = "_orch_patched_forward"


def _phi3_attention_forward(
    self: Any,
    hidden_states: Any,
    position_embeddings: tuple[Any, Any],
    attention_mask: Any,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """transformers' Phi3Attention.forward with q, k, v taken by `split` instead of three slices.

    The same values (split returns the slices' views); the difference is the backward: a slice's backward writes a
    zero tensor of the whole qkv size and copies its part in, and autograd then adds the three (six full-size passes
    over the qkv gradient per layer); split's backward is one cat.
    """
    from transformers.models.phi3 import modeling_phi3

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    qkv = self.qkv_proj(hidden_states)
    n_heads, n_kv = self.config.num_attention_heads, self.num_key_value_heads
    cos, sin = position_embeddings
    if getattr(self, QKV_ROPE_ATTR, False) and past_key_values is None and cos.shape[-1] <= self.head_dim:
        # q, k (RoPE applied) and v written once, each contiguous (tokens, heads, head_dim): no copies around the
        # RoPE and the attention, and one pass back into the qkv gradient
        from orchestrator.passes.training.lora.kernels import qkv_rope

        n = qkv.shape[:-1].numel()
        rows = (*input_shape, cos.shape[-1])
        q, k, v = qkv_rope(
            qkv.reshape(n, -1),
            cos.expand(rows).reshape(n, -1),
            sin.expand(rows).reshape(n, -1),
            n_heads,
            n_kv,
            self.head_dim,
        )
        query_states = q.view(*input_shape, n_heads, self.head_dim).transpose(1, 2)
        key_states = k.view(*input_shape, n_kv, self.head_dim).transpose(1, 2)
        value_states = v.view(*input_shape, n_kv, self.head_dim).transpose(1, 2)
    else:
        q_size = n_heads * self.head_dim
        kv_size = n_kv * self.head_dim
        query_states, key_states, value_states = qkv.split([q_size, kv_size, kv_size], dim=-1)
        query_states = query_states.view(hidden_shape).transpose(1, 2)
        key_states = key_states.view(hidden_shape).transpose(1, 2)
        value_states = value_states.view(hidden_shape).transpose(1, 2)
        # looked up at call time: Liger's RoPE patch replaces the module's function
        query_states, key_states = modeling_phi3.apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
    attention_interface = modeling_phi3.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling_phi3.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=getattr(self.config, "sliding_window", None),
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


QKV_ROPE_ATTR = "_orch_qkv_rope"


def split_qkv_attention(model: Any, rope: bool = False) -> int:
    """Give every Phi3Attention of the model the split-qkv forward; returns how many modules got it.

    rope: q, k, v and RoPE through lora_kernels.qkv_rope (one pass each way) instead of slices + apply_rotary_pos_emb.
    """
    import types

    try:
        from transformers.models.phi3 import modeling_phi3
    except ImportError:
        return 0
    needed = ("ALL_ATTENTION_FUNCTIONS", "eager_attention_forward", "apply_rotary_pos_emb")
    if not all(hasattr(modeling_phi3, name) for name in needed):
        return 0  # another transformers layout: keep its own forward
    count = 0
    for module in base_model(model).modules():
        if type(module).__name__ == "Phi3Attention" and hasattr(module, "qkv_proj"):
            module.forward = types.MethodType(_phi3_attention_forward, module)
            setattr(module, PATCHED_ATTR, True)
            setattr(module, QKV_ROPE_ATTR, rope)
            count += 1
    return count


MLP_RECOMPUTE_ATTR = "_orch_mlp_recompute"


def _fused_gate_up_mlp_forward(self: Any, hidden_states: Any) -> Any:
    """Phi3MLP.forward: down_proj(silu(gate) * up) with gate, up read in place from gate_up_proj's output; with
    recompute on, the SwiGLU and a fused LoRA down_proj run as one function that keeps only gate_up's output."""
    from orchestrator.passes.training.lora.kernels import swiglu

    u = self.gate_up_proj(hidden_states)
    if getattr(self, MLP_RECOMPUTE_ATTR, False):
        from orchestrator.passes.training.lora.fused import swiglu_down

        out = swiglu_down(self.down_proj, u, overwrite_u=True)  # u: this MLP's own, its gradient written over it
        if out is not None:
            return out
    return self.down_proj(swiglu(u))


def orch_swiglu_mlp(model: Any, recompute: bool = False) -> int:
    """Give every fused gate_up MLP (Phi3MLP, or Liger's replacement of it) orch's SwiGLU; returns the count.

    recompute: down_proj's backward recomputes the SwiGLU output (fused.swiglu_down) where down_proj is a fused
    LoRA layer at call time; elsewhere the MLP runs as without it."""
    import types

    count = 0
    for module in base_model(model).modules():
        cfg = getattr(module, "config", None)
        act = str(getattr(cfg, "hidden_act", ""))
        if (
            type(module).__name__ in ("Phi3MLP", "LigerPhi3SwiGLUMLP")
            and hasattr(module, "gate_up_proj")
            and hasattr(module, "down_proj")
            and act in ("silu", "swish")
        ):
            module.forward = types.MethodType(_fused_gate_up_mlp_forward, module)
            setattr(module, PATCHED_ATTR, True)
            setattr(module, MLP_RECOMPUTE_ATTR, recompute)
            count += 1
    return count
