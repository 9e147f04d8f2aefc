"""Build a tiny Phi-3-architecture model + tokenizer on disk, from nothing (no hub is reachable).

Random weights, a BPE tokenizer trained on the given text, a Phi-3 chat template. Sizes are chosen so that no
nn.Linear other than lm_head has out_features == vocab_size: onnxruntime-genai's builder takes ANY such layer for
the LM head and silently builds a wrong graph (../shared/FACTS.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orchestrator.core.fs import atomic_dir

PHI3_SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<unk>", "<pad>"]

PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_FALLBACK_TEXT = (
    "the quick brown fox jumps over the lazy dog. I feel happy, sad, afraid and surprised today. "
    "### Text: ### The tone is: Sad Joy Fear Surprise. What a wonderful morning! I am so scared of the dark. "
)


def _unsafe_widths(hidden: int, intermediate: int, heads: int, kv_heads: int) -> set[int]:
    head_dim = hidden // heads
    return {hidden, intermediate, 2 * intermediate, (heads + 2 * kv_heads) * head_dim, heads * head_dim}


def train_phi3_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> Any:
    """A byte-level BPE trained on `texts`, with Phi-3's special tokens and chat template (no hub download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=PHI3_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        model_max_length=max_length,
    )
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    return tokenizer


def build_tiny_phi3(
    out_dir: Path | str,
    *,
    texts: Iterable[str] = (),
    vocab_size: int = 1000,
    hidden_size: int = 128,
    intermediate_size: int = 352,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json to `out_dir`.

    Written to a temp folder first and renamed into place, so a killed build never leaves half a model.
    """
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    out_dir = Path(out_dir)
    corpus = [t for t in texts if t] or [_FALLBACK_TEXT]
    # pad the model's vocab up to `vocab_size` rows if the trainer found fewer merges
    tokenizer = train_phi3_tokenizer(corpus * 4, vocab_size, max_position_embeddings)
    model_vocab = max(vocab_size, len(tokenizer))
    if model_vocab in _unsafe_widths(hidden_size, intermediate_size, num_heads, num_kv_heads):
        raise ValueError(
            f"vocab_size {model_vocab} equals another linear layer's width: onnxruntime-genai would mistake that "
            "layer for the LM head. Pick a different vocab_size."
        )

    config = Phi3Config(
        vocab_size=model_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        original_max_position_embeddings=max_position_embeddings,
        rope_scaling=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).eval()

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir
