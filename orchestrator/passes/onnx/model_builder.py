"""ModelBuilder (Olive's name): HF checkpoint -> onnxruntime-genai ONNX folder, with its LM-head trap guarded.

Runs onnxruntime-genai's model builder in-process (its `parse_extra_options` + `create_model`, the exact path of
`python -m onnxruntime_genai.models.builder -i DIR ...`) and streams what it prints to the job log. Because the
builder silently builds a wrong graph when any nn.Linear besides lm_head has out_features == vocab_size, such
models are refused before building, and an fp32 build must reproduce the transformers logits (max |diff| <
parity_tolerance) or the pass fails. int4/int8 builds record the same parity numbers as metrics only.

Adapters: an `hf_adapter` input is built with the builder's `adapter_path`: unfused projections with a LoRA_A /
LoRA_B MatMul pair beside each adapted one. In int4/int8 builds the LoRA MatMuls are excluded from quantization
(nodes_to_exclude), so ExtractAdapters can lift them out as a float, swappable adapter. An fp32 build is checked
against transformers + peft (the adapter unmerged). `extra_options.adapter_path` is refused: give the adapter
as the input model (input_model.adapter_path, or a LoRA pass before), so caching sees its content.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from orchestrator.core.fs import atomic_write_text, commit_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput, Requirements

Precision = Literal["int4", "int8", "fp16", "bf16", "fp32"]

# precision -> execution providers the builder 0.18 builds it for (each combination built here).
_VALID = {
    "fp32": {"cpu", "cuda", "dml", "webgpu"},
    "fp16": {"cuda", "dml", "webgpu"},
    "bf16": {"cuda"},
    "int8": {"cpu", "cuda", "webgpu"},
    "int4": {"cpu", "cuda", "dml", "webgpu"},
}
_EP_NAMES = {
    "cpu": "cpu",
    "cpuexecutionprovider": "cpu",
    "cuda": "cuda",
    "gpu": "cuda",
    "cudaexecutionprovider": "cuda",
    "dml": "dml",
    "dmlexecutionprovider": "dml",
    "webgpu": "webgpu",
    "webgpuexecutionprovider": "webgpu",
}
OUTPUT_DIR = "model"


class ModelBuilderConfig(PassConfig):
    """Olive's ModelBuilder fields plus the parity knobs."""

    precision: Precision = "int4"
    execution_provider: str | None = None  # cpu | cuda | CUDAExecutionProvider ...; default: the job's first EP
    device: Literal["cpu", "gpu"] | None = None  # Olive-style alternative to execution_provider
    int4_block_size: Literal[16, 32, 64, 128, 256] = 32
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] | None = None  # None: 4 on cpu, the builder's default elsewhere
    int4_is_symmetric: bool = True
    int4_op_types_to_quantize: list[str] | None = None  # e.g. ["MatMul", "Gather"]
    extra_options: dict[str, str | int | float | bool] = Field(default_factory=dict)  # builder KEY=VALUE options
    search: dict[str, Any] | None = None  # overrides of genai_config.json "search" (max_length, top_k, ...)
    parity_prompt: str = "the quick brown fox jumps over the lazy dog. I feel happy, sad, afraid and surprised."
    parity_tolerance: float = 1e-4  # fp32 fails when max |logit diff| >= this
    check_parity: bool = True  # int4/int8/fp16: log parity metrics (fp32 always checks)
    check_generation: bool = True  # load with og and generate a few tokens after building
    # Olive's fields with one meaning here: the builder always writes one external-data file next to model.onnx
    save_as_external_data: Literal[True] = True
    all_tensors_to_one_file: Literal[True] = True
    metadata_only: bool = False  # an ONNX decoder graph in: write genai_config.json + tokenizer files for it
    # Olive's builder switches, passed to the builder under its names (builder.py --extra_options)
    int4_algo_config: str | None = None  # default | rtn | k_quant | rtn_last | k_quant_last | k_quant_mixed | ...
    int4_nodes_to_exclude: list[str] | None = None
    exclude_embeds: bool = False  # the graph takes inputs_embeds: no text-only parity/generation check
    exclude_lm_head: bool = False  # the graph outputs hidden states: no logits check
    include_hidden_states: bool = False
    enable_cuda_graph: bool | None = None
    use_qdq: bool = False
    use_8bits_moe: bool = False
    use_webgpu_fp32: bool = False  # the builder's: FP32 I/O on WebGPU (GPUs without fp16)
    use_cuda_bf16: bool = False  # the builder's: BF16 I/O in quantized CUDA models

    @property
    def checkable(self) -> bool:
        """Text in, logits at every position out: the graph transformers and onnxruntime-genai are compared on."""
        pruned = str(self.extra_options.get("prune_lm_head", "")).lower() in ("true", "1")
        return not (self.exclude_embeds or self.exclude_lm_head or pruned)


def resolve_execution_provider(config: ModelBuilderConfig, job_providers: list[str]) -> str:
    """Explicit execution_provider > device > the job's first execution provider; in the builder's spelling."""
    raw = (
        config.execution_provider
        or ({"cpu": "cpu", "gpu": "cuda"}[config.device] if config.device else None)
        or (job_providers[0] if job_providers else "cpu")
    )
    ep = _EP_NAMES.get(raw.lower())
    if ep is None:
        raise PassError(f"ModelBuilder: unknown execution provider {raw!r}; use one of cpu, cuda, dml, webgpu")
    return ep


def lm_head_impostors(hf_dir: Path | str, trust_remote_code: bool = False) -> list[str]:
    """Names of nn.Linear layers other than the LM head whose out_features == vocab_size.

    onnxruntime-genai's builder treats every such layer as the LM head and silently builds a wrong graph. The
    model is instantiated on the meta device (no weights, no memory) so fused layers (qkv_proj, gate_up_proj)
    are seen exactly as the builder sees them; if that fails, widths are derived from config.json.
    """
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg) if "vocab_size" not in cfg else cfg
    vocab = int(cfg["vocab_size"])
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(hf_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        head = model.get_output_embeddings()
        return [
            name
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and mod.out_features == vocab and mod is not head
        ]
    except Exception:  # noqa: BLE001 - architectures transformers cannot instantiate: fall back to arithmetic
        return [f"{name} (out_features {w})" for name, w in _config_widths(cfg).items() if w == vocab]


def _config_widths(cfg: dict[str, Any]) -> dict[str, int]:
    """out_features of the usual decoder Linear layers, from config.json alone."""
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    widths = {
        "o_proj/hidden_size": hidden,
        "q_proj": heads * head_dim,
        "k_proj/v_proj": kv * head_dim,
        "qkv_proj": (heads + 2 * kv) * head_dim,
    }
    if cfg.get("intermediate_size"):
        inter = int(cfg["intermediate_size"])
        widths |= {"up_proj/gate_proj": inter, "gate_up_proj": 2 * inter}
    return widths


class _LineWriter(io.TextIOBase):
    """A file-like that forwards complete lines to a callback (builder prints -> ctx.info); tqdm's \\r frames
    are collapsed to their last state so the log is not flooded."""

    def __init__(self, sink: Any, passthrough: Any) -> None:
        self.sink = sink
        self.passthrough = passthrough  # the real stream, for whatever the sink itself prints
        self.buf = ""
        self.busy = False

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if self.busy:  # the sink printed (e.g. an emit that echoes events): do not loop back into it
            return self.passthrough.write(s)
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self._send(line)
        return len(s)

    def _send(self, line: str) -> None:
        line = line.rsplit("\r", 1)[-1].strip()
        if line:
            self.busy = True
            try:
                self.sink(line)
            finally:
                self.busy = False

    def flush(self) -> None:
        if not self.busy:
            line, self.buf = self.buf, ""
            self._send(line)


def run_builder(
    hf_dir: Path,
    out_dir: Path,
    precision: str,
    execution_provider: str,
    cache_dir: Path,
    options: dict[str, str],
    log: Any,
) -> None:
    """The builder's CLI path, in-process: parse KEY=VALUE options, then create_model; prints go to `log`."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    writer = _LineWriter(log, sys.stdout)
    kv = [f"{k}={v}" for k, v in options.items()]
    with contextlib.redirect_stdout(writer), contextlib.redirect_stderr(writer):
        try:
            extra = parse_extra_options(
                None, str(hf_dir), str(out_dir), precision, execution_provider, str(cache_dir), kv
            )
            create_model(None, str(hf_dir), str(out_dir), precision, execution_provider, str(cache_dir), **extra)
        finally:
            writer.flush()


def _option_str(value: str | int | float | bool) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class ModelBuilderPass(Pass):
    """HF checkpoint (merged) -> onnx_genai folder: model.onnx(+.data), genai_config.json, tokenizer files."""

    type_name = "ModelBuilder"
    Config = ModelBuilderConfig
    version = "1"
    libraries = ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "transformers", "torch")

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=False, environment="cpu-export")

    def builder_options(self, config: ModelBuilderConfig, ep: str, model: ModelArtifact) -> dict[str, str]:
        """Our typed fields -> the builder's KEY=VALUE options; explicit extra_options win."""
        opts: dict[str, str] = {"hf_token": "false"}
        if model.trust_remote_code:
            opts["hf_remote"] = "true"
        if config.precision in ("int4", "int8"):
            opts["block_size"] = str(config.int4_block_size)
            opts["is_symmetric"] = _option_str(config.int4_is_symmetric)
            level = (
                config.int4_accuracy_level if config.int4_accuracy_level is not None else (4 if ep == "cpu" else None)
            )
            if level is not None:
                opts["accuracy_level"] = str(level)
            if config.int4_op_types_to_quantize:
                opts["op_types_to_quantize"] = "/".join(config.int4_op_types_to_quantize)
        if config.int4_algo_config:
            opts["int4_algo_config"] = config.int4_algo_config
        if config.int4_nodes_to_exclude:
            opts["nodes_to_exclude"] = ",".join(config.int4_nodes_to_exclude)
        for key in ("exclude_embeds", "exclude_lm_head", "include_hidden_states", "use_qdq", "use_8bits_moe",
                    "use_webgpu_fp32", "use_cuda_bf16"):  # fmt: skip
            if getattr(config, key):
                opts[key] = "true"
        if config.enable_cuda_graph is not None:
            opts["enable_cuda_graph"] = _option_str(config.enable_cuda_graph)
        if model.format == "hf_adapter":
            opts["adapter_path"] = str(model.adapter_path)
            if config.precision in ("int4", "int8"):  # LoRA weights stay float: a swappable adapter
                from orchestrator.passes.onnx.extract_adapters import lora_node_names

                layers = int(json.loads((Path(model.path) / "config.json").read_text())["num_hidden_layers"])
                lora = ",".join(lora_node_names(layers))
                opts["nodes_to_exclude"] = f"{opts['nodes_to_exclude']},{lora}" if "nodes_to_exclude" in opts else lora
        for key, value in config.extra_options.items():
            if key == "adapter_path":
                raise PassError(
                    "ModelBuilder: extra_options.adapter_path is not supported; give the adapter as the input "
                    "model (input_model.adapter_path / --adapter_path), or merge it first (MergeAdapterWeights)"
                )
            if key == "nodes_to_exclude" and "nodes_to_exclude" in opts:
                opts[key] = f"{opts[key]},{_option_str(value)}"
                continue
            opts[key] = _option_str(value)
        return opts

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, ModelBuilderConfig)
        if model is None:
            raise PassError("ModelBuilder needs an input model: set input_model to an HF checkpoint folder")
        if config.metadata_only:
            from orchestrator.passes.onnx.genai_metadata import write_genai_metadata

            ep = resolve_execution_provider(config, ctx.job.execution_providers)
            return write_genai_metadata(model, ep, config.precision, ctx, lambda hf, out, opts: run_builder(
                hf, out, config.precision, ep, ctx.out_dir / ".builder_cache", opts, ctx.info))  # fmt: skip
        if model.format == "hf_adapter" and (model.quantized or not model.adapter_path):
            raise PassError(
                "ModelBuilder: a QLoRA adapter (quantized base) or an adapter without adapter_path cannot be built "
                "unmerged; merge it first (MergeAdapterWeights)"
            )
        if model.format not in ("hf", "hf_adapter"):
            raise PassError(f"ModelBuilder builds from an HF checkpoint (format 'hf'), got format {model.format!r}")
        if model.format == "hf_adapter":
            from orchestrator.passes.onnx.extract_adapters import adapter_type

            kind = adapter_type(Path(model.adapter_path or ""))
            if kind != "lora":
                raise PassError(
                    f"ModelBuilder: a {kind.upper()} adapter cannot be built unmerged (the builder and "
                    "onnxruntime-genai's adapters are LoRA A/B pairs); merge it first (MergeAdapterWeights)"
                )
        hf_dir = Path(model.path)
        if not (hf_dir / "config.json").exists():
            raise PassError(f"ModelBuilder: {hf_dir} has no config.json; point input_model at an HF checkpoint folder")

        ep = resolve_execution_provider(config, ctx.job.execution_providers)
        # Olive builds one model per execution provider of the target; the first is the chain's model/, the
        # others go to model/<ep>/ (each a complete onnxruntime-genai folder)
        extra_eps: list[str] = []
        if config.execution_provider is None and config.device is None:
            for raw in ctx.job.execution_providers[1:]:
                other = resolve_execution_provider(config.model_copy(update={"execution_provider": raw}), [])
                if other != ep and other not in extra_eps:
                    extra_eps.append(other)
        for one in (ep, *extra_eps):
            if one not in _VALID[config.precision]:
                ok = ", ".join(sorted(p for p, eps in _VALID.items() if one in eps))
                raise PassError(
                    f"ModelBuilder: precision {config.precision} is not supported on {one} by onnxruntime-genai's "
                    f"builder; on {one} use one of: {ok}"
                )

        impostors = lm_head_impostors(hf_dir, model.trust_remote_code)
        if impostors:
            vocab = json.loads((hf_dir / "config.json").read_text()).get("vocab_size")
            raise PassError(
                f"ModelBuilder: layer(s) {', '.join(impostors)} have out_features == vocab_size ({vocab}); "
                "onnxruntime-genai's builder would take them for the LM head and silently build a wrong graph. "
                "Change vocab_size (or the layer widths: hidden_size, 2*intermediate_size, "
                "(heads+2*kv_heads)*head_dim) so no other Linear layer is vocab_size wide"
            )

        options = self.builder_options(config, ep, model)
        ctx.log_param("builder_precision", config.precision)
        ctx.log_param("builder_execution_provider", ep)
        ctx.log_param("builder_options", json.dumps(options, sort_keys=True))

        final = ctx.out_dir / OUTPUT_DIR
        tmp = ctx.out_dir / f".{OUTPUT_DIR}.tmp"
        cache = ctx.out_dir / ".builder_cache"
        for p in (tmp, cache):
            shutil.rmtree(p, ignore_errors=True)
        ctx.info(f"building {config.precision} ONNX for {ep} from {hf_dir}")
        ctx.progress(0, 3, "build")
        t0 = time.perf_counter()
        from orchestrator.passes.common.olive_quant import stage_for_builder

        source_dir = hf_dir  # the checks read the checkpoint as given (the staged copy is gone by then)
        prequantized = model.quantized or "quantization_config" in json.loads((hf_dir / "config.json").read_text())
        hf_dir = stage_for_builder(hf_dir, ctx.out_dir / ".olive_staged")  # Olive checkpoint, quantized embedding
        try:
            run_builder(hf_dir, tmp, config.precision, ep, cache, options, ctx.info)
            for other in extra_eps:
                ctx.info(f"building {config.precision} ONNX for {other} into {OUTPUT_DIR}/{other}/")
                run_builder(
                    hf_dir, tmp / other, config.precision, other, cache, self.builder_options(config, other, model),
                    ctx.info,
                )  # fmt: skip
                ctx.info(f"{OUTPUT_DIR}/{other}/: built for {other}; not run here (checks run on CPU only)")
        except PassError:
            raise
        except Exception as exc:  # the builder raises bare Exceptions/ValueErrors for user-fixable inputs
            shutil.rmtree(tmp, ignore_errors=True)
            raise PassError(f"ModelBuilder: onnxruntime-genai's builder failed: {type(exc).__name__}: {exc}") from exc
        finally:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(ctx.out_dir / ".olive_staged", ignore_errors=True)
        build_s = time.perf_counter() - t0
        if config.search:
            self._apply_search(tmp, config.search)

        from orchestrator.passes.common import onnx_tools

        metrics: dict[str, float] = {
            "build_s": build_s,
            "model_size_bytes": float(onnx_tools.model_size_bytes(tmp)),
            "matmulnbits_nodes": float(onnx_tools.matmulnbits_count(tmp)),
            "execution_providers_built": float(1 + len(extra_eps)),
        }
        ctx.progress(1, 3, "check")
        if model.format == "hf_adapter":
            self._check_lora_float(tmp)
        metrics |= self._check(config, ep, source_dir, tmp, ctx, prequantized=prequantized, adapter=model.adapter_path)

        commit_dir(tmp, final)
        ctx.progress(3, 3, "done")
        ctx.log_metrics(metrics)
        return PassOutput(
            model=ModelArtifact(format="onnx_genai", path=OUTPUT_DIR, task=model.task, quantized=False),
            metrics=metrics,
        )

    @staticmethod
    def _check_lora_float(model_dir: Path) -> None:
        import onnx

        from orchestrator.passes.onnx.extract_adapters import LORA_NODE

        proto = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
        lora = [n for n in proto.graph.node if LORA_NODE.match(n.name)]
        if not lora:
            raise PassError("ModelBuilder: built from an adapter, but the graph has no LoRA MatMul")
        quantized = [n.name for n in lora if n.op_type != "MatMul"]
        if quantized:
            raise PassError(f"ModelBuilder: LoRA MatMul(s) got quantized despite nodes_to_exclude: {quantized[:3]}")

    @staticmethod
    def _apply_search(model_dir: Path, search: dict[str, Any]) -> None:
        """Write generation defaults into genai_config.json's search section (only keys it already has)."""
        path = model_dir / "genai_config.json"
        genai = json.loads(path.read_text())
        unknown = sorted(set(search) - set(genai["search"]))
        if unknown:
            raise PassError(
                f"ModelBuilder: unknown search option(s) {unknown}; known: {', '.join(sorted(genai['search']))}"
            )
        genai["search"].update(search)
        atomic_write_text(path, json.dumps(genai, indent=4))

    @staticmethod
    def _check(
        config: ModelBuilderConfig,
        ep: str,
        hf_dir: Path,
        model_dir: Path,
        ctx: PassContext,
        *,
        prequantized: bool = False,
        adapter: str | None = None,
    ) -> dict[str, float]:
        """Parity with transformers (a hard gate for fp32) and a short og generation, where this host can run it."""
        from orchestrator.passes.common import onnx_tools

        metrics: dict[str, float] = {}
        if ep != "cpu":
            ctx.info(f"post-build checks skipped: the model targets {ep} and they run on CPU only")
            return metrics
        if not config.checkable:
            ctx.info("parity vs transformers skipped: exclude_embeds / exclude_lm_head / prune_lm_head leave no "
                     "per-position logits to compare")
            return ModelBuilderPass._generation(config, model_dir, ctx, metrics) if not (
                config.exclude_embeds or config.exclude_lm_head) else metrics
        if prequantized:
            # an AWQ/GPTQ checkpoint: transformers loads it only through optimum / gptqmodel, which the export
            # environment does not carry; the int4 values are the checkpoint's own, so the generation check remains
            ctx.info("parity vs transformers skipped: the input is a pre-quantized (GPTQ-layout) checkpoint")
        elif config.precision == "fp32" or config.check_parity:
            parity = onnx_tools.logits_parity(hf_dir, model_dir, config.parity_prompt, adapter=adapter)
            metrics["parity_max_abs_diff"] = parity["max_abs_diff"]
            metrics["parity_mean_abs_diff"] = parity["mean_abs_diff"]
            metrics["greedy_token_agreement"] = parity["greedy_agree"]
            ctx.info(
                f"parity vs transformers over {int(parity['n_tokens'])} tokens: max |diff| "
                f"{parity['max_abs_diff']:.3g}, greedy agreement {parity['greedy_agree']:.3f}"
            )
            if config.precision == "fp32" and not parity["max_abs_diff"] < config.parity_tolerance:
                raise PassError(
                    f"ModelBuilder: fp32 ONNX logits differ from transformers by {parity['max_abs_diff']:.3g} "
                    f"(>= {config.parity_tolerance}); the graph is wrong. Check the LM-head trap and rope_scaling "
                    "in config.json (FACTS: Phi-3 LongRoPE needs 'type': 'longrope')"
                )
        return ModelBuilderPass._generation(config, model_dir, ctx, metrics)

    @staticmethod
    def _generation(config: ModelBuilderConfig, model_dir: Path, ctx: PassContext, metrics: dict[str, float]) -> dict[
            str, float]:  # fmt: skip
        """A few tokens generated by onnxruntime-genai from the built folder."""
        from orchestrator.passes.common import onnx_tools

        if config.check_generation:
            text, n_tokens, seconds = onnx_tools.generate(model_dir, config.parity_prompt[:40], 8)
            metrics["check_generated_tokens"] = float(n_tokens)
            ctx.info(f"og generated {n_tokens} tokens in {seconds * 1000:.1f} ms: {text!r}")
            if n_tokens == 0:
                raise PassError("ModelBuilder: the built model loads but generates no tokens; check eos/max_length")
        return metrics
