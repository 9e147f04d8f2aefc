"""OnnxMatMul4Quantizer / OnnxBlockWiseRtnQuantization (Olive's names): weight-only int4 MatMulNBits.

For ONNX models that do not come out of the genai builder already quantized (an fp32 builder build, another
exporter's model). Uses onnxruntime's MatMulNBitsQuantizer with its default blockwise round-to-nearest
config, which needs no calibration data. An onnx_genai folder stays loadable by onnxruntime-genai: the
quantized decoder keeps its file name and genai_config.json / tokenizer files are copied alongside.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Literal

from orchestrator.core.fs import commit_dir, fresh_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput, Requirements

OUTPUT_DIR = "model"


class QuantizeConfig(PassConfig):
    """Olive's OnnxMatMul4Quantizer fields (algorithm: only the calibration-free blockwise RTN default)."""

    block_size: Literal[16, 32, 64, 128, 256] = 32
    is_symmetric: bool = True
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = None  # None: 4 (int8 compute) on CPU, the EP default elsewhere
    bits: Literal[4, 8] = 4
    axis: Literal[0] = 0  # Olive's; MatMulNBits blocks run along the input dimension (axis 0) only
    nodes_to_exclude: list[str] | None = None  # e.g. ["/lm_head/MatMul"]
    nodes_to_include: list[str] | None = None
    op_types_to_quantize: list[Literal["MatMul", "Gather"]] | None = None  # default: MatMul
    algorithm: Literal["DEFAULT", "RTN"] | None = None  # both mean the default blockwise RTN quantizer
    check_generation: bool = True  # onnx_genai: generate a few tokens and compare logits with the input model
    check_prompt: str = "the quick brown fox jumps over the lazy dog. I feel happy, sad, afraid and surprised."
    save_as_external_data: Literal[True] = True  # Olive's; the quantized model always has one model.onnx.data
    all_tensors_to_one_file: Literal[True] = True


def genai_provider(model_dir: Path) -> str:
    """The execution provider an onnxruntime-genai folder was built for ("cpu" when it names none)."""
    import json

    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    options = decoder.get("session_options", {}).get("provider_options") or []
    return next(iter(options[0]), "cpu") if options and isinstance(options[0], dict) else "cpu"


class MatMulNBitsQuantizePass(Pass):
    """ONNX (fp32/fp16) -> the same model with MatMul weights in 4-bit blocks (MatMulNBits)."""

    type_name = "OnnxMatMul4Quantizer"
    Config = QuantizeConfig
    version = "1"
    libraries = ("onnxruntime", "onnx", "onnxruntime-genai")

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=False, environment="cpu-export")

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, PassConfig)  # QuantizeConfig, or a subclass pass's own (OnnxHqqQuantization)
        from orchestrator.passes.common import onnx_tools

        if model is None or model.format not in ("onnx", "onnx_genai"):
            got = "no model" if model is None else f"format {model.format!r}"
            raise PassError(
                f"{self.type_name} quantizes ONNX models (format 'onnx' or 'onnx_genai'), got {got}: "
                "export first (e.g. a ModelBuilder pass with precision fp32)"
            )
        src_dir = Path(model.path)
        try:
            src = onnx_tools.onnx_model_file(src_dir)
        except (FileNotFoundError, KeyError) as exc:
            raise PassError(f"{self.type_name}: no ONNX model found in {src_dir}: {exc}") from exc
        already = onnx_tools.matmulnbits_count(src)
        if already:
            ctx.info(f"input already has {already} MatMulNBits nodes; only remaining float MatMuls are quantized")
        size_before = onnx_tools.model_size_bytes(src)
        data_files = {p.name for p in onnx_tools.external_data_files(src)}

        final = ctx.out_dir / OUTPUT_DIR
        tmp = fresh_dir(ctx.out_dir / OUTPUT_DIR)
        ctx.progress(0, 2, "quantize")
        t0 = time.perf_counter()
        kept = self.adapter_nodes(src)
        if kept:
            ctx.info(f"{len(kept)} MatMuls take their weight from a graph input (LoRA adapter inputs): kept float, "
                     "so the adapter stays swappable; the base weights are quantized")  # fmt: skip
            config = config.model_copy(update={"nodes_to_exclude": [*(config.nodes_to_exclude or []), *kept]})
        self._quantize(config, src, tmp / src.name, ctx)
        quantize_s = time.perf_counter() - t0
        # Everything else of the folder (genai_config.json, tokenizer, chat template) travels unchanged.
        if src_dir.is_dir():
            for item in src_dir.iterdir():
                if item.name == src.name or item.name in data_files or item.name.startswith("."):
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)

        n_nodes = onnx_tools.matmulnbits_count(tmp / src.name)
        if n_nodes <= already:
            shutil.rmtree(tmp, ignore_errors=True)
            lora = " (its LoRA adapter inputs stay float by design)" if kept else ""
            raise PassError(
                f"{self.type_name}: no MatMul with constant weights was quantized in {src.name}; the model is "
                f"already quantized{lora} or nodes_to_exclude/nodes_to_include left nothing to do"
            )
        size_after = onnx_tools.model_size_bytes(tmp / src.name)
        metrics = {
            "matmulnbits_nodes": float(n_nodes),
            "size_before_bytes": float(size_before),
            "size_after_bytes": float(size_after),
            "compression_ratio": size_before / size_after,
            "quantize_s": quantize_s,
        }
        ctx.info(
            f"quantized {n_nodes - already} MatMuls to {config.bits}-bit blocks of {config.block_size}: "
            f"{size_before / 1e6:.2f} MB -> {size_after / 1e6:.2f} MB"
        )
        ctx.progress(1, 2, "check")
        provider = genai_provider(tmp) if (tmp / onnx_tools.GENAI_CONFIG).exists() else "cpu"
        if config.check_generation and provider != "cpu":
            ctx.info(f"generation check skipped: the model targets {provider} and the check runs on CPU only")
        elif config.check_generation and (tmp / onnx_tools.GENAI_CONFIG).exists():
            metrics |= self._check(config, src_dir, tmp, ctx)
        elif config.check_generation:
            metrics |= self._check_ort(src, tmp / src.name, ctx)

        commit_dir(tmp, final)
        ctx.progress(2, 2, "done")
        ctx.log_metrics(metrics)
        fmt = model.format if (final / onnx_tools.GENAI_CONFIG).exists() else "onnx"
        return PassOutput(
            model=ModelArtifact(format=fmt, path=OUTPUT_DIR, task=model.task, quantized=True), metrics=metrics
        )

    @staticmethod
    def adapter_nodes(src: Path) -> list[str]:
        """The MatMuls whose weight is a graph input (onnx_common.input_weight_nodes), read without the weights."""
        import onnx

        from orchestrator.passes.common.onnx_common import input_weight_nodes

        return input_weight_nodes(onnx.load(str(src), load_external_data=False))

    @staticmethod
    def _quantize(config: QuantizeConfig, src: Path, dst: Path, ctx: PassContext) -> None:
        """Load (with external data), quantize in memory, save with one external data file next to dst."""
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        level = config.accuracy_level if config.accuracy_level is not None else 4
        proto = onnx.load(str(src), load_external_data=True)
        algo = DefaultWeightOnlyQuantConfig(
            block_size=config.block_size,
            is_symmetric=config.is_symmetric,
            accuracy_level=level,
            op_types_to_quantize=tuple(config.op_types_to_quantize) if config.op_types_to_quantize else None,
            bits=config.bits,
        )
        quant = MatMulNBitsQuantizer(
            proto,
            bits=config.bits,
            block_size=config.block_size,
            is_symmetric=config.is_symmetric,
            accuracy_level=level,
            nodes_to_exclude=config.nodes_to_exclude,
            nodes_to_include=config.nodes_to_include,
            algo_config=algo,
        )
        quant.process()
        data = dst.parent / f"{dst.name}.data"
        data.unlink(missing_ok=True)  # convert_model_to_external_data appends to an existing file
        quant.model.save_model_to_file(str(dst), use_external_data_format=True)
        data.chmod(0o644)  # onnx creates it 0600; containers running as another user must read it
        ctx.info(f"wrote {dst.name} + {data.name}")

    @staticmethod
    def _check_ort(src: Path, dst: Path, ctx: PassContext) -> dict[str, float]:
        """Plain ONNX: run both graphs with onnxruntime on a few token ids, when their inputs can be fed."""
        import numpy as np

        from orchestrator.passes.common import onnx_tools

        ids = list(range(1, 17))
        try:
            ref, got = onnx_tools.ort_logits(src, ids), onnx_tools.ort_logits(dst, ids)
        except (ValueError, KeyError, FileNotFoundError) as exc:
            ctx.info(f"logits check skipped: cannot feed this graph generically ({exc})")
            return {}
        return {
            "logits_max_abs_diff_vs_input": float(np.abs(got - ref).max()),
            "greedy_token_agreement_vs_input": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        }

    @staticmethod
    def _check(config: QuantizeConfig, src_dir: Path, out_dir: Path, ctx: PassContext) -> dict[str, float]:
        """The quantized model still generates with onnxruntime-genai; how far its logits moved from the input's."""
        import numpy as np

        from orchestrator.passes.common import onnx_tools

        before = onnx_tools.GenaiModel(src_dir)
        after = onnx_tools.GenaiModel(out_dir)
        ids = after.encode(config.check_prompt)
        ref, got = before.logits(ids), after.logits(ids)
        text, n_tokens, seconds = onnx_tools.generate(after, config.check_prompt[:40], 8)
        if n_tokens == 0:
            raise PassError(f"{MatMulNBitsQuantizePass.type_name}: the quantized model generates no tokens")
        ctx.info(f"og generated {n_tokens} tokens in {seconds * 1000:.1f} ms: {text!r}")
        return {
            "logits_max_abs_diff_vs_input": float(np.abs(got - ref).max()),
            "greedy_token_agreement_vs_input": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "check_generated_tokens": float(n_tokens),
        }
