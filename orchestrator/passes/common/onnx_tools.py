"""Shared ONNX helpers: full-sequence logits, parity against transformers, generation, graph/size facts.

No pass logic here. torch / onnxruntime / onnxruntime-genai are imported inside functions so that importing this
module (from a pass module, the registry, `orch --help`) stays cheap.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

GENAI_CONFIG = "genai_config.json"
# a LoRA weight ExtractAdapters made a graph input: model.layers.0.self_attn.qkv_proj.lora_A.weight
LORA_INPUT = re.compile(r"\.lora_[AB]\.weight$")

# onnxruntime-genai names for an ONNX Runtime execution provider (og.Config.append_provider).
_OG_PROVIDERS = {
    "CPUExecutionProvider": "cpu",
    "CUDAExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
    "WebGpuExecutionProvider": "webgpu",
}


class GenerationResult(NamedTuple):
    """What `generate` returns; a tuple so `text, n_tokens, seconds = generate(...)` works."""

    text: str
    n_tokens: int
    seconds: float


# ---------------------------------------------------------------------------------------------- graph facts


def onnx_model_file(model_dir: Path | str) -> Path:
    """The decoder .onnx of a folder: genai_config's decoder filename when there is one, else the only .onnx."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        return model_dir
    cfg = model_dir / GENAI_CONFIG
    if cfg.exists():
        name = json.loads(cfg.read_text())["model"]["decoder"].get("filename", "model.onnx")
        return model_dir / name
    found = sorted(model_dir.glob("*.onnx"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected exactly one .onnx file in {model_dir}, found {[p.name for p in found]}")
    return found[0]


def external_data_files(onnx_path: Path | str) -> list[Path]:
    """The external-data files a model references (read from the graph, not guessed from names)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    names: set[str] = set()
    for init in proto.graph.initializer:
        if uses_external_data(init):
            for entry in init.external_data:
                if entry.key == "location":
                    names.add(entry.value)
    return [onnx_path.parent / n for n in sorted(names)]


def model_size_bytes(path: Path | str) -> int:
    """Bytes of an ONNX model: the .onnx file plus its external data (a folder: its decoder model)."""
    onnx_path = onnx_model_file(path)
    return onnx_path.stat().st_size + sum(p.stat().st_size for p in external_data_files(onnx_path) if p.exists())


def folder_size_bytes(path: Path | str) -> int:
    """Bytes of every file under a folder (what a user downloads)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def op_counts(onnx_path: Path | str) -> dict[str, int]:
    """Count of nodes per op type in the main graph (external data is not loaded)."""
    import onnx

    proto = onnx.load(str(onnx_model_file(onnx_path)), load_external_data=False)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def matmulnbits_nodes(onnx_path: Path | str) -> list[dict[str, Any]]:
    """Name and integer attributes (bits, block_size, accuracy_level, K, N) of every MatMulNBits node."""
    import onnx

    proto = onnx.load(str(onnx_model_file(onnx_path)), load_external_data=False)
    out = []
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            out.append({"name": node.name, **{k: v for k, v in attrs.items() if isinstance(v, int)}})
    return out


def matmulnbits_count(onnx_path: Path | str) -> int:
    """How many MatMuls were weight-only quantized (0 means the model is not int4/int8)."""
    return len(matmulnbits_nodes(onnx_path))


# ---------------------------------------------------------------------------------------------- onnxruntime-genai


def og_provider(execution_provider: str) -> str:
    """'CUDAExecutionProvider' -> 'cuda'; short names pass through."""
    return _OG_PROVIDERS.get(execution_provider, execution_provider.lower().removesuffix("executionprovider"))


class GenaiModel:
    """An onnxruntime-genai model + tokenizer loaded once, for many logits/generate calls (loading is the slow part)."""

    def __init__(self, model_dir: Path | str, execution_provider: str = "cpu", *, use_adapter: bool = True) -> None:
        """A folder holding adapter_weights.onnx_adapter (ExtractAdapters) runs with that adapter active, as the
        fine-tuned model; use_adapter=False runs the base model."""
        import onnxruntime_genai as og

        self.og = og
        self.model_dir = Path(model_dir)
        self.provider = og_provider(execution_provider)
        config = og.Config(str(self.model_dir))
        if self.provider != "cpu":
            config.clear_providers()
            config.append_provider(self.provider)
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = None
        adapter_file = self.model_dir / "adapter_weights.onnx_adapter"
        if use_adapter and adapter_file.is_file():
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter_file), "adapter")
        genai = json.loads((self.model_dir / GENAI_CONFIG).read_text())
        self.context_length = int(genai["model"].get("context_length", 2048))
        self.vocab_size = int(genai["model"]["vocab_size"])

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        import numpy as np

        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32))

    def chat_prompt(self, text: str) -> str:
        """The tokenizer's chat template around one user message, ready for the assistant's answer."""
        messages = json.dumps([{"role": "user", "content": text}])
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def _generator(self, max_length: int, **search: Any) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, **search)
        gen = self.og.Generator(self.model, params)
        if self.adapters is not None:
            gen.set_active_adapter(self.adapters, "adapter")
        return gen

    def logits(self, ids: Sequence[int]) -> Any:
        """Logits of every position, shape (len(ids), vocab), float32: one prefill over the whole sequence."""
        import numpy as np

        if not ids:
            raise ValueError("logits of an empty sequence")
        gen = self._generator(min(len(ids) + 1, self.context_length), do_sample=False)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        out = np.asarray(gen.get_output("logits"), dtype=np.float32)
        return out.reshape(-1, out.shape[-1])[-len(ids) :]

    def generate_ids(self, ids: Sequence[int], max_new_tokens: int, **search: Any) -> list[int]:
        """Greedy (unless search says otherwise) continuation of `ids`; stops at EOS or max_new_tokens."""
        import numpy as np

        search.setdefault("do_sample", False)
        gen = self._generator(min(len(ids) + max_new_tokens, self.context_length), **search)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        new: list[int] = []
        while not gen.is_done() and len(new) < max_new_tokens:
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
        return new

    @property
    def eos_token_ids(self) -> list[int]:
        return [int(i) for i in self.tokenizer.eos_token_ids]

    def stream(self, ids: Sequence[int], max_new_tokens: int, **search: Any) -> Iterator[tuple[int, str]]:
        """(token, its text) as each token is generated: onnxruntime-genai's generator loop, decoded token by token
        with its tokenizer stream (the pieces join to the decoded text). Stops at EOS (not yielded) or
        max_new_tokens; `search` takes og's search options (do_sample, temperature, top_p, top_k, random_seed)."""
        import numpy as np

        search.setdefault("do_sample", False)
        gen = self._generator(min(len(ids) + max_new_tokens, self.context_length), **search)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        pieces = self.tokenizer.create_stream()
        eos = set(self.eos_token_ids)
        for _ in range(max_new_tokens):
            if gen.is_done():
                return
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if token in eos:
                return
            yield token, pieces.decode(token)

    def has_chat_template(self) -> bool:
        """Whether the tokenizer files carry a chat template (tokenizer_config.json or chat_template.jinja)."""
        if (self.model_dir / "chat_template.jinja").is_file():
            return True
        config = self.model_dir / "tokenizer_config.json"
        try:
            return bool(json.loads(config.read_text()).get("chat_template")) if config.is_file() else False
        except ValueError:
            return False

    def timed_generation(self, ids: Sequence[int], max_new_tokens: int) -> tuple[float, list[float]]:
        """(time to first token, per-token decode seconds) of one greedy generation.

        EOS is ignored (min_length) so every run decodes the same number of tokens. Each generate_next_token
        after the first runs the forward pass of the previous token and samples the next one.
        """
        import numpy as np

        total = min(len(ids) + max_new_tokens, self.context_length)
        gen = self._generator(total, do_sample=False, min_length=total)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32))  # the prompt's forward pass
        gen.generate_next_token()  # samples the first token from the prefill logits (no forward pass)
        gen.get_next_tokens()
        prefill = time.perf_counter() - t0
        steps: list[float] = []
        while not gen.is_done() and len(steps) < max_new_tokens - 1:
            t = time.perf_counter()
            gen.generate_next_token()
            gen.get_next_tokens()
            steps.append(time.perf_counter() - t)
        return prefill, steps


def generate(
    onnx_dir: Path | str | GenaiModel,
    prompt: str,
    max_new_tokens: int = 32,
    *,
    chat: bool = False,
    execution_provider: str = "cpu",
    **search: Any,
) -> GenerationResult:
    """Generate with onnxruntime-genai (greedy by default); `chat` wraps the prompt in the chat template."""
    model = onnx_dir if isinstance(onnx_dir, GenaiModel) else GenaiModel(onnx_dir, execution_provider)
    text = model.chat_prompt(prompt) if chat else prompt
    ids = model.encode(text)
    t0 = time.perf_counter()
    new = model.generate_ids(ids, max_new_tokens, **search)
    seconds = time.perf_counter() - t0
    return GenerationResult(model.decode(new), len(new), seconds)


# ---------------------------------------------------------------------------------------------- plain onnxruntime


def ort_logits(
    onnx_path: Path | str,
    ids: Sequence[int],
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    extra: dict[str, Any] | None = None,
    run_options: Any = None,
):
    """Full-sequence logits from a decoder graph with plain onnxruntime: empty past KV, all-ones mask.
    `run_options` (an onnxruntime RunOptions) may carry an active LoraAdapter that binds optional LoRA inputs by
    name; LoRA inputs without a default that `extra` does not feed are fed empty (the base model).

    For ONNX folders without genai_config.json (format "onnx"). The KV head size comes from the graph when it
    is static, else from genai_config.json / config.json next to the model.
    """
    import numpy as np
    import onnxruntime as ort

    onnx_path = onnx_model_file(onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=list(providers))
    seq = np.asarray([list(ids)], dtype=np.int64)
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    feeds: dict[str, Any] = {}
    feeds.update(extra or {})  # e.g. the LoRA weights ExtractAdapters made inputs
    for inp in sess.get_inputs():
        dtype = dtypes.get(inp.type, np.int64)
        if inp.name in feeds:
            continue
        if inp.name == "input_ids":
            feeds[inp.name] = seq.astype(dtype)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(seq, dtype=dtype)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(seq.shape[1], dtype=dtype)[None, :]
        elif inp.name.startswith("past_key_values"):
            heads, head_dim = inp.shape[1], inp.shape[3]
            if not isinstance(heads, int) or not isinstance(head_dim, int):
                cfg_heads, cfg_dim = _kv_shape_from_configs(onnx_path.parent)
                heads = heads if isinstance(heads, int) else cfg_heads
                head_dim = head_dim if isinstance(head_dim, int) else cfg_dim
            feeds[inp.name] = np.zeros((1, heads, 0, head_dim), dtype=dtype)
        elif LORA_INPUT.search(inp.name):  # a required LoRA input (ExtractAdapters optional_inputs false), unfed:
            # empty along lora_r, what the optional default holds (the base model)
            feeds[inp.name] = np.zeros([d if isinstance(d, int) else 0 for d in inp.shape], dtype=dtype)
        else:
            raise ValueError(f"ort_logits does not know how to feed input {inp.name!r} of {onnx_path.name}")
    out = sess.run(["logits"], feeds, run_options)[0]
    return np.asarray(out, dtype=np.float32)[0]


def _kv_shape_from_configs(folder: Path) -> tuple[int, int]:
    genai = folder / GENAI_CONFIG
    if genai.exists():
        dec = json.loads(genai.read_text())["model"]["decoder"]
        return int(dec["num_key_value_heads"]), int(dec["head_size"])
    hf = json.loads((folder / "config.json").read_text())
    heads = hf.get("num_key_value_heads", hf["num_attention_heads"])
    return int(heads), int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


# ---------------------------------------------------------------------------------------------- transformers


def hf_logits(hf_dir: Path | str | Any, ids: Sequence[int]) -> Any:
    """Full-sequence fp32 logits from transformers (eval, no grad); `hf_dir` may be a loaded model."""
    import numpy as np
    import torch

    model = load_hf_model(hf_dir) if isinstance(hf_dir, (str, Path)) else hf_dir
    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long)).logits[0]
    return np.asarray(out.float().numpy(), dtype=np.float32)


def load_hf_model(hf_dir: Path | str, trust_remote_code: bool = False) -> Any:
    """fp32 eval-mode causal LM on CPU: the reference the ONNX graph must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, trust_remote_code=trust_remote_code)
    return model.eval()


def hf_encode(hf_dir: Path | str, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(hf_dir))(text)["input_ids"])


DEFAULT_PARITY_TEXT = "the quick brown fox jumps over the lazy dog. I feel happy, sad, afraid and surprised today."


def logits_parity(
    hf_dir: Path | str,
    onnx_dir: Path | str,
    prompt: str | Sequence[int] = DEFAULT_PARITY_TEXT,
    *,
    execution_provider: str = "cpu",
    adapter: str | Path | None = None,
) -> dict[str, float]:
    """Compare transformers and ONNX logits on the same token ids (tokenized by the HF tokenizer); with
    `adapter` (a PEFT folder) the reference is transformers + peft, unmerged.

    Returns max_abs_diff and mean_abs_diff over all positions x vocab, greedy_agree = fraction of positions
    whose argmax token is the same, and n_tokens. onnx_genai folders run through onnxruntime-genai, plain ONNX
    folders through an onnxruntime session.
    """
    import numpy as np

    ids = hf_encode(hf_dir, prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if adapter is not None:
        from peft import PeftModel

        ref = hf_logits(PeftModel.from_pretrained(load_hf_model(hf_dir), str(adapter)).eval(), ids)
    else:
        ref = hf_logits(hf_dir, ids)
    if (Path(onnx_dir) / GENAI_CONFIG).exists():
        got = GenaiModel(onnx_dir, execution_provider).logits(ids)
    else:
        got = ort_logits(onnx_dir, ids)
    if got.shape != ref.shape:
        raise ValueError(f"logits shapes differ: ONNX {got.shape} vs transformers {ref.shape}")
    diff = np.abs(got - ref)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "greedy_agree": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "n_tokens": float(len(ids)),
    }


# ---- the session settings OrtSessionParamsTuning picked (Olive's inference_settings) ---------------------------

SETTINGS_FILE = "inference_settings.json"


def session_options(settings: dict[str, Any]) -> Any:
    """onnxruntime.SessionOptions from the session_options part of inference_settings."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if settings.get("execution_mode") is not None:
        so.execution_mode = ort.ExecutionMode(settings["execution_mode"])
    if settings.get("graph_optimization_level") is not None:
        so.graph_optimization_level = ort.GraphOptimizationLevel(settings["graph_optimization_level"])
    if settings.get("intra_op_num_threads") is not None:
        so.intra_op_num_threads = int(settings["intra_op_num_threads"])
    if settings.get("inter_op_num_threads") is not None:
        so.inter_op_num_threads = int(settings["inter_op_num_threads"])
    for key, value in (settings.get("extra_session_config") or {}).items():
        so.add_session_config_entry(str(key), str(value))
    so.enable_profiling = bool(settings.get("enable_profiling"))
    return so


def tuned_session(
    model_file: Path | str, provider: str, given: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any] | None]:
    """An InferenceSession on `provider` with `given` settings (a metric's inference_settings), else the tuned
    settings saved beside the model when they are for that provider, else onnxruntime's defaults; returns the
    settings used (None: defaults)."""
    import onnxruntime as ort

    model_file = Path(model_file)
    path = model_file.parent / SETTINGS_FILE
    settings = json.loads(path.read_text()) if path.exists() else None
    if given:
        settings = {"execution_provider": [provider], **given}
    if settings is None or settings.get("execution_provider", [None])[0] != provider:
        return ort.InferenceSession(str(model_file), providers=[provider]), None
    so = session_options(settings.get("session_options") or {})
    opts = settings.get("provider_options") or [{}]
    return ort.InferenceSession(str(model_file), so, providers=[provider], provider_options=opts[:1]), settings
