"""What the stand-in serves under real hub names: tiny models built locally, small datasets laid out as the real
repos are (file names, configs in the README, splits), with rows made from the tone phrases.

Models: every id the corpus and the tests name serves the tiny Phi-3 (random weights), or the variant that carries
the one property of the real model a config relies on (Qwen3 ties its LM head to the embedding; Phi-3.5's widths
divide by AWQ/GPTQ's groups of 128, as OPT-125m's do); microsoft/Phi-4-mini-instruct serves a tiny
Phi-4-mini-like model (GQA, partial_rotary_factor 0.75, LongRoPE, tied embeddings).
Datasets: Salesforce/wikitext (wikitext-2-raw-v1 parquet splits, README configs), mit-han-lab/pile-val-backup
(val.jsonl.zst, split "validation" from the file name), nampdn-ai/tiny-codes, xxyyzzz/phrase_classification
(Olive's docs), timdettmers/openassistant-guanaco, tatsu-lab/alpaca (instruction rows for --use_chat_template).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

from .repos import folder_files

REPO = Path(__file__).resolve().parents[2]
PHI3_IDS = (
    "microsoft/Phi-3-mini-4k-instruct",
    "microsoft/Phi-3.5-mini-instruct",  # group128: AWQ/GPTQ's groups of 128 divide its widths
    "microsoft/phi-2",
    "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-3.2-1B-Instruct",
    "openlm-research/open_llama_3b",
    "tiiuae/falcon-7b",
    "mistralai/Mistral-7B-v0.1",
    "openlm-research/open_llama_7b_v2",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen3-0.6B",  # tied
    "facebook/opt-125m",  # group128: its widths (768, 3072) divide by AWQ's groups of 128
    # olive-recipes entries of the corpus (c21-c28): text decoders the tiny model stands in for
    "tencent/HY-MT1.5-1.8B",  # tied (its recipes run TieWordEmbeddings)
    "Qwen/Qwen3-VL-2B-Instruct",
    "Qwen/Qwen3.5-0.8B",  # tied
    "allenai/Olmo-3-7B-Instruct",
)
MODEL_VARIANTS: dict[str, dict[str, Any]] = {
    "tied": {"tie_word_embeddings": True},
    "group128": {"intermediate_size": 384},
}
VARIANT_OF = {"Qwen/Qwen3-0.6B": "tied", "microsoft/Phi-3.5-mini-instruct": "group128", "facebook/opt-125m": "group128",
              "tencent/HY-MT1.5-1.8B": "tied", "Qwen/Qwen3.5-0.8B": "tied"}  # fmt: skip


def tone_rows(n: int = 240, seed: int = 7) -> list[dict[str, str]]:
    sys.path.insert(0, str(REPO / "jobs" / "tone-classification"))
    from make_dataset import make_rows

    return make_rows(n, seed=seed)


def model_variant(tiny_model: Path, kind: str) -> Path:
    """The tiny model with config changes (MODEL_VARIANTS), saved beside it once, same tokenizer; a tied
    variant keeps the weights with lm_head = embedding, others are re-initialized (seed 0)."""
    dest = tiny_model.parent / f"{tiny_model.name}-{kind}"
    if not dest.exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if kind == "tied":
            model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
            model.config.tie_word_embeddings = True
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            config = AutoConfig.from_pretrained(tiny_model)
            for key, value in MODEL_VARIANTS[kind].items():
                setattr(config, key, value)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        model.save_pretrained(dest)
        AutoTokenizer.from_pretrained(tiny_model).save_pretrained(dest)
    return dest


def model_card(repo_id: str) -> bytes:
    return f"---\nlicense: mit\n---\n# {repo_id}\n\nA tiny random-weight stand-in (tests/hub_standin).\n".encode()


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def wikitext_files(rows: list[dict[str, str]]) -> dict[str, bytes]:
    """Salesforce/wikitext as on the hub: README configs, <config>/<split>-00000-of-00001.parquet, a "text" column
    of article lines (headings, blank lines, paragraphs)."""
    lines: list[dict[str, str]] = []
    for i, r in enumerate(rows):
        if i % 12 == 0:
            lines += [{"text": ""}, {"text": f" = {r['tone']} stories {i // 12} = \n"}, {"text": ""}]
        lines.append({"text": f" {r['phrase']} The tone is {r['tone']} . \n"})
    n = len(lines)
    a, b = n * 8 // 10, n * 9 // 10
    splits = {"train": lines[:a], "validation": lines[a:b], "test": lines[b:]}
    config = "wikitext-2-raw-v1"
    readme = ["---", "language:", "- en", "configs:", f"- config_name: {config}", "  data_files:"]
    files: dict[str, bytes] = {}
    for split, part in splits.items():
        path = f"{config}/{split}-00000-of-00001.parquet"
        readme += [f"  - split: {split}", f"    path: {config}/{split}-*"]
        files[path] = _parquet(part)
    files["README.md"] = ("\n".join([*readme, "---", "", "# WikiText (stand-in rows)", ""])).encode()
    return files


def pile_val_files(rows: list[dict[str, str]]) -> dict[str, bytes]:
    """mit-han-lab/pile-val-backup as on the hub: one val.jsonl.zst (datasets names the split "validation" from
    the file name; reading it needs `zstandard`), rows {"text", "meta": {"pile_set_name"}}."""
    import zstandard

    data = [{"text": f"{r['phrase']} It felt like {r['tone'].lower()} all day long.",
             "meta": {"pile_set_name": "Pile-CC"}} for r in rows]  # fmt: skip
    readme = b"---\nlicense: mit\n---\n# pile-val-backup (stand-in rows)\n"
    return {"README.md": readme, "val.jsonl.zst": zstandard.ZstdCompressor().compress(_jsonl(data))}


def tiny_codes_files() -> dict[str, bytes]:
    """nampdn-ai/tiny-codes: one parquet of {prompt, response, programming_language, ...} (the corpus's stand-in
    rows, 1400 of them, 1225 Python)."""
    import gzip

    raw = gzip.decompress((REPO / "tests" / "olive_corpus" / "c05_tiny_codes_train.jsonl.gz").read_bytes())
    rows = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    return {"README.md": b"---\nlicense: mit\n---\n", "data/train-00000-of-00001.parquet": _parquet(rows)}


def phrase_classification_files(rows: list[dict[str, str]]) -> dict[str, bytes]:
    """xxyyzzz/phrase_classification (Olive's finetune docs): {phrase, tone}, one train split."""
    return {"README.md": b"---\nlicense: mit\n---\n", "train.jsonl": _jsonl([{"phrase": r["phrase"],
            "tone": r["tone"]} for r in rows])}  # fmt: skip


def guanaco_files(rows: list[dict[str, str]]) -> dict[str, bytes]:
    """timdettmers/openassistant-guanaco: a "text" column, openassistant_best_replies_{train,eval}.jsonl; as many
    train rows as the real one's 9,846 reach (the recipes slice "train[:4096]" / "train[4096:4224]"): the tone rows
    repeated, numbered."""
    text = [{"text": f"### Human: {r['phrase']} ### Assistant: {r['tone']}"} for r in rows]
    train = [{"text": f"{t['text']} ({i})"} for i, t in enumerate(text * (4400 // len(text) + 1))][:4400]
    return {"README.md": b"---\nlicense: apache-2.0\n---\n",
            "openassistant_best_replies_train.jsonl": _jsonl(train),
            "openassistant_best_replies_eval.jsonl": _jsonl(text[len(text) * 9 // 10 :])}  # fmt: skip


def alpaca_files(rows: list[dict[str, str]]) -> dict[str, bytes]:
    """tatsu-lab/alpaca (Olive 0.13's `finetune --use_chat_template` example): {instruction, input, output, text}
    in data/train-00000-of-00001-*.parquet."""
    data = [{"instruction": f"Name the tone of: {r['phrase']}", "input": "", "output": r["tone"],
             "text": f"### Instruction:\nName the tone of: {r['phrase']}\n\n### Response:\n{r['tone']}"}
            for r in rows]  # fmt: skip
    return {"README.md": b"---\nlicense: cc-by-nc-4.0\n---\n",
            "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet": _parquet(data)}  # fmt: skip


def build_phi4_mini(out_dir: Path, tiny_model: Path) -> Path:
    """A tiny Phi-4-mini-like model (GQA 4/2 heads of 64, partial_rotary_factor 0.75, LongRoPE, tied embeddings),
    with the tiny Phi-3's tokenizer. Widths keep clear of the vocab (onnxruntime-genai's LM-head detection)."""
    if out_dir.exists():
        return out_dir
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rotary_half = int(64 * 0.75) // 2
    cfg = Phi3Config(
        vocab_size=len(tok), hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, partial_rotary_factor=0.75, max_position_embeddings=2048,
        original_max_position_embeddings=512, tie_word_embeddings=True,
        rope_scaling={"type": "longrope", "rope_type": "longrope", "short_factor": [1.0] * rotary_half,
                      "long_factor": [1.5] * rotary_half},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(1)
    model = Phi3ForCausalLM(cfg).eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def serve_defaults(hub: Any, tiny_model: Path) -> dict[str, str]:
    """Every model and dataset above pushed to `hub`; returns {repo id: sha of main}."""
    shas: dict[str, str] = {}
    for repo_id in PHI3_IDS:
        folder = model_variant(tiny_model, VARIANT_OF[repo_id]) if repo_id in VARIANT_OF else tiny_model
        files = {**folder_files(folder), "README.md": model_card(repo_id)}
        shas[repo_id] = hub.add_repo(repo_id, files).sha
    phi4 = build_phi4_mini(tiny_model.parent / f"{tiny_model.name}-phi4-mini", tiny_model)
    phi4_id = "microsoft/Phi-4-mini-instruct"
    shas[phi4_id] = hub.add_repo(phi4_id, {**folder_files(phi4), "README.md": model_card(phi4_id)}).sha
    rows = tone_rows()
    for repo_id, files in {
        "Salesforce/wikitext": wikitext_files(rows),
        "mit-han-lab/pile-val-backup": pile_val_files(rows),
        "nampdn-ai/tiny-codes": tiny_codes_files(),
        "xxyyzzz/phrase_classification": phrase_classification_files(rows),
        "timdettmers/openassistant-guanaco": guanaco_files(rows),
        "tatsu-lab/alpaca": alpaca_files(rows),
    }.items():
        shas[repo_id] = hub.add_repo(repo_id, files, repo_type="dataset").sha
    return shas
