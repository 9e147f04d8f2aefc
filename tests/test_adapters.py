"""The unmerged adapter flow: ModelBuilder from an hf_adapter -> ExtractAdapters -> base model with LoRA inputs +
adapter_weights.onnx_adapter, loaded by onnxruntime-genai's og.Adapters (what the Phi cookbook's app does), and
`convert-adapters` writing the same file straight from the PEFT folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA on the tiny Phi-3's fused projections, B non-zero (an untrained adapter would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    modules = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    peft = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=modules, lora_dropout=0.0))
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft.save_pretrained(out)
    return out


def _run(p: Any, out: Path, model: Any, **cfg: Any) -> Any:
    from orchestrator.core.job import Job
    from orchestrator.passes.base import PassContext

    job = Job(job_id="j", pass_name="p", pass_type=p.type_name, output_dir=str(out))
    res = p.run(p.Config(**cfg), model, PassContext(job=job, out_dir=out, emit=lambda e: None))
    return res, res.model.with_root(out)


def _references(tiny_model: Path, adapter: Path) -> tuple[Any, Any]:
    import torch
    from peft import PeftModel

    from orchestrator.passes.common import onnx_tools

    net = onnx_tools.load_hf_model(tiny_model)
    base = onnx_tools.hf_logits(net, IDS)
    with torch.no_grad():
        tuned = onnx_tools.hf_logits(PeftModel.from_pretrained(net, str(adapter)).eval(), IDS)
    return base, tuned


def _build(tmp: Path, tiny_model: Path, adapter: Path, precision: str) -> Path:
    from orchestrator.core.job import ModelArtifact
    from orchestrator.passes.onnx.extract_adapters import ExtractAdaptersPass
    from orchestrator.passes.onnx.model_builder import ModelBuilderPass

    hf_adapter = ModelArtifact(format="hf_adapter", path=str(tiny_model), adapter_path=str(adapter))
    _, built = _run(ModelBuilderPass(), tmp / "mb", hf_adapter, precision=precision)
    res, extracted = _run(ExtractAdaptersPass(), tmp / "ex", built)
    assert res.metrics["adapter_weights"] == 28  # 2 layers x (q, k, v, o, gate, up, down) x (A, B)
    return Path(extracted.path)


def test_fp32_adapter_parity_with_peft_and_base_without_it(tmp_path: Path, tiny_model: Path, adapter: Path) -> None:
    from orchestrator.passes.common import onnx_tools
    from orchestrator.passes.onnx.extract_adapters import ADAPTER_FILE, convert_peft_adapter, load_adapter

    folder = _build(tmp_path, tiny_model, adapter, "fp32")
    assert (folder / ADAPTER_FILE).is_file() and (folder / "genai_config.json").is_file()
    ref_base, ref_tuned = _references(tiny_model, adapter)
    tuned = onnx_tools.GenaiModel(folder).logits(IDS)  # og.Adapters + set_active_adapter
    base = onnx_tools.GenaiModel(folder, use_adapter=False).logits(IDS)  # the empty default LoRA inputs
    assert np.abs(tuned - ref_tuned).max() < 1e-4
    assert np.abs(base - ref_base).max() < 1e-4
    assert np.abs(tuned - base).max() > 0.1  # the adapter does something
    # convert-adapters: the same tensors, straight from the PEFT folder
    extracted = load_adapter(folder / ADAPTER_FILE)
    converted = convert_peft_adapter(adapter, json.loads((tiny_model / "config.json").read_text()))
    assert sorted(converted) == sorted(extracted)
    assert max(float(np.abs(converted[k] - extracted[k]).max()) for k in converted) < 1e-6


def test_int4_base_keeps_the_adapter_float(tmp_path: Path, tiny_model: Path, adapter: Path) -> None:
    from orchestrator.passes.common import onnx_tools

    folder = _build(tmp_path, tiny_model, adapter, "int4")
    assert onnx_tools.matmulnbits_count(folder) > 0  # the base is int4
    ref_base, ref_tuned = _references(tiny_model, adapter)
    tuned = onnx_tools.GenaiModel(folder).logits(IDS)
    base = onnx_tools.GenaiModel(folder, use_adapter=False).logits(IDS)
    # the adapter's delta on the int4 base is the float adapter's delta on the fp32 model
    delta, ref_delta = tuned - base, ref_tuned - ref_base
    rel = float(np.linalg.norm(delta - ref_delta) / np.linalg.norm(ref_delta))
    assert rel < 0.3, rel  # int4 activations move it a little; a lost or quantized adapter gives ~1


def test_extract_adapters_refusals(tmp_path: Path, tiny_model: Path) -> None:
    from orchestrator.olive import load_workflow
    from orchestrator.schema import ConfigError

    wf = {"input_model": {"type": "HfModel", "model_path": "./m"},
          "passes": {"b": {"type": "ModelBuilder", "precision": "int4"},
                     "x": {"type": "ExtractAdapters", "make_inputs": False}}}  # fmt: skip
    with pytest.raises(ConfigError, match="make_inputs false .* not supported"):
        load_workflow(wf, base_dir=tmp_path)


def test_cli_convert_and_generate_adapter(tmp_path: Path, tiny_model: Path, adapter: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/ml.db"}

    def orch(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "orchestrator.cli", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)

    conv = orch("convert-adapters", "--adapter_path", str(adapter), "--output_path", "conv/a.onnx_adapter",
                "--model_name_or_path", str(tiny_model))  # fmt: skip
    assert conv.returncode == 0, conv.stderr[-2000:]
    assert (tmp_path / "conv/a.onnx_adapter").is_file()
    ao = orch("auto-opt", "-m", str(tiny_model), "--adapter_path", str(adapter), "--precision", "int4",
              "--use_model_builder", "-o", "ao", "--no-tracking")  # fmt: skip
    assert ao.returncode == 0, ao.stderr[-3000:]
    assert (tmp_path / "ao/model/genai_config.json").is_file()
    from orchestrator.passes.onnx.extract_adapters import load_adapter

    built = load_adapter(tmp_path / "ao/model/adapter_weights.onnx_adapter")
    converted = load_adapter(tmp_path / "conv/a.onnx_adapter")  # fits the base auto-opt built, name for name
    assert sorted(built) == sorted(converted)
    assert max(float(np.abs(built[k] - converted[k]).max()) for k in built) < 1e-6
    ga = orch("generate-adapter", "-m", str(tiny_model), "--adapter_path", str(adapter), "--adapter_format", "numpy",
              "-o", "ga", "--no-tracking")  # fmt: skip
    assert ga.returncode == 0, ga.stderr[-3000:]
    assert (tmp_path / "ga/model/adapter_weights.npz").is_file()
    bad = orch("convert-adapters", "--adapter_path", str(adapter), "-o", "x", "--quantize_int4")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("orch: error: --quantize_int4"), bad.stderr


def test_onnx_conversion_keeps_an_adapter_unmerged_or_merges_it(tmp_path: Path, tiny_model: Path, adapter: Path):
    """Olive's OnnxConversion of a PEFT model: the LoRA MatMuls stay in the graph unless merge_adapter_weights;
    both graphs reproduce transformers + peft (prompt and cached step), and the adapter changes the logits."""
    import onnx

    from orchestrator.core.job import ModelArtifact
    from orchestrator.passes.common import onnx_tools
    from orchestrator.passes.onnx.onnx_conversion import OnnxConversionPass

    model = ModelArtifact(format="hf_adapter", path=str(tiny_model), adapter_path=str(adapter))
    unmerged, _ = _run(OnnxConversionPass(), tmp_path / "u", model)
    merged, _ = _run(OnnxConversionPass(), tmp_path / "m", model, merge_adapter_weights=True)
    assert unmerged.metrics["parity_max_abs_diff"] < 1e-4 and merged.metrics["parity_max_abs_diff"] < 1e-4

    def lora_nodes(folder: str) -> int:
        graph = onnx.load(str(tmp_path / folder / "model" / "model.onnx"), load_external_data=False).graph
        return sum("/base_layer/" in n.name for n in graph.node)  # peft's wrapped projection beside its A/B

    assert lora_nodes("u") == 8 and lora_nodes("m") == 0  # 4 adapted projections x 2 layers
    base, _ = _run(OnnxConversionPass(), tmp_path / "b", ModelArtifact(format="hf", path=str(tiny_model)))
    with_adapter = onnx_tools.ort_logits(tmp_path / "u" / "model", IDS)
    without = onnx_tools.ort_logits(tmp_path / "b" / "model", IDS)
    assert abs(with_adapter - without).max() > 1e-3


def test_extract_adapters_from_a_torch_exported_peft_graph(tmp_path: Path, tiny_model: Path, adapter: Path) -> None:
    """Olive's OnnxConversion -> ExtractAdapters -> ModelBuilder metadata_only: the LoRA weights of the unmerged
    torch graph become inputs + adapter_weights.onnx_adapter; with them fed back the logits are the adapter's,
    without them the base model's; onnxruntime-genai agrees with the graph both ways (metadata_only's check)."""
    import numpy as np

    from orchestrator.core.job import ModelArtifact
    from orchestrator.passes.common import onnx_tools
    from orchestrator.passes.onnx.extract_adapters import ADAPTER_FILE, ExtractAdaptersPass, load_adapter
    from orchestrator.passes.onnx.model_builder import ModelBuilderPass
    from orchestrator.passes.onnx.onnx_conversion import OnnxConversionPass

    model = ModelArtifact(format="hf_adapter", path=str(tiny_model), adapter_path=str(adapter))
    _, exported = _run(OnnxConversionPass(), tmp_path / "c", model, save_metadata_for_token_generation=True)
    res, extracted = _run(ExtractAdaptersPass(), tmp_path / "e", exported)
    weights = load_adapter(tmp_path / "e" / "model" / ADAPTER_FILE)
    assert res.metrics["adapter_weights"] == 16 and "model.layers.0.self_attn.qkv_proj.lora_A.weight" in weights
    full = onnx_tools.ort_logits(tmp_path / "c" / "model", IDS)
    fed = onnx_tools.ort_logits(tmp_path / "e" / "model", IDS, extra=weights)
    base = onnx_tools.ort_logits(tmp_path / "e" / "model", IDS)  # the empty default: no adapter
    assert np.abs(fed - full).max() < 1e-5 and np.abs(base - full).max() > 1e-3
    built, _ = _run(ModelBuilderPass(), tmp_path / "m", extracted, metadata_only=True)
    assert built.metrics["adapter_cached_decode_agreement"] == 1.0 and built.metrics["cached_decode_agreement"] == 1.0


@pytest.mark.parametrize("pass_type", ["OnnxBlockWiseRtnQuantization", "OnnxHqqQuantization",
                                       "OnnxKQuantQuantization"])  # fmt: skip
def test_weight_only_quantization_keeps_lora_inputs(tmp_path: Path, tiny_model: Path, adapter: Path,
                                                    pass_type: str) -> None:  # fmt: skip
    """An fp32 base built with LoRA inputs (auto-opt --precision fp32 --adapter_path) quantized by RTN / HQQ /
    k-quant: the base MatMuls become MatMulNBits, the LoRA MatMuls keep taking their weights from the inputs, and
    onnxruntime-genai with the adapter active stays close to the unquantized model with it (the adapter still
    moves the logits)."""
    from orchestrator.core.job import ModelArtifact
    from orchestrator.passes.common import onnx_tools
    from orchestrator.passes.onnx.extract_adapters import ExtractAdaptersPass
    from orchestrator.passes.onnx.model_builder import ModelBuilderPass
    from orchestrator.passes.registry import load_pass

    src = ModelArtifact(format="hf_adapter", path=str(tiny_model), adapter_path=str(adapter))
    _, built = _run(ModelBuilderPass(), tmp_path / "mb", src, precision="fp32")
    _, fp32 = _run(ExtractAdaptersPass(), tmp_path / "ex", built)
    extra: dict[str, Any] = {}
    if pass_type == "OnnxKQuantQuantization":  # k-quant's blocks need widths divisible by 128 (the tiny MLP: 352)
        extra["nodes_to_exclude"] = [f"/model/layers.{i}/mlp/down_proj/MatMul" for i in range(2)]
    res, q = _run(load_pass(pass_type)(), tmp_path / "q", fp32, **extra)
    onnx_file = Path(q.path) / "model.onnx"
    assert onnx_tools.matmulnbits_count(onnx_file) > 0
    import onnx

    proto = onnx.load(str(onnx_file), load_external_data=False)
    lora_inputs = [i.name for i in proto.graph.input if ".lora_" in i.name]
    assert lora_inputs and all(
        n.op_type == "MatMul" for n in proto.graph.node if len(n.input) > 1 and n.input[1] in lora_inputs
    )
    assert (Path(q.path) / "adapter_weights.onnx_adapter").is_file()
    ref = onnx_tools.GenaiModel(fp32.path).logits(IDS)
    got = onnx_tools.GenaiModel(q.path).logits(IDS)
    base_q = onnx_tools.GenaiModel(q.path, use_adapter=False).logits(IDS)
    assert np.abs(got - ref).max() < 0.5 * np.abs(ref).max()  # int4 noise, not a different model
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.5
    assert np.abs(got - base_q).max() > 1e-3  # the adapter inputs still act
    assert res.metrics["check_generated_tokens"] > 0


def test_quantize_cli_on_an_int4_adapter_model_is_one_line(tmp_path: Path, tiny_model: Path, adapter: Path) -> None:
    """auto-opt --adapter_path's int4 output (base already MatMulNBits, LoRA float inputs): quantize has nothing
    to do and says so in one line naming the LoRA inputs, instead of breaking them."""
    ao = orch("auto-opt", "-m", str(tiny_model), "--adapter_path", str(adapter), "--precision", "int4", "-o", "ao",
              "--no-tracking", cwd=tmp_path)  # fmt: skip
    assert ao.returncode == 0, ao.stderr[-2000:]
    q = orch("quantize", "-m", "ao", "--algorithm", "rtn", "-o", "q", "--no-tracking", cwd=tmp_path)
    errors = [ln for ln in q.stderr.splitlines() if ln.startswith("orch: error:")]
    assert q.returncode != 0 and len(errors) == 1 and "LoRA adapter inputs stay float" in errors[0], q.stderr
    assert "Traceback" not in q.stderr and "Invalid input name" not in q.stderr


def _tuned_peft(tiny_model: Path, out: Path, kind: str) -> Path:
    """A DoRA / LoHa / LoKr adapter with non-trivial weights, written by peft."""
    import torch
    from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    config = {
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True),
        "loha": LoHaConfig(r=4, alpha=8, target_modules=targets),
        "lokr": LoKrConfig(r=4, alpha=8, target_modules=targets),
    }[kind]
    peft = get_peft_model(net, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peft.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_dora_loha_lokr_merge_and_build_or_refuse_unmerged(tmp_path: Path, tiny_model: Path, kind: str) -> None:
    """DoRA / LoHa / LoKr: MergeAdapterWeights folds them (merged == transformers + peft unmerged), ModelBuilder
    builds the merged model (fp32 parity inside the pass); unmerged they are refused in one line each, since
    onnxruntime-genai's adapters are LoRA A/B pairs (ModelBuilder, ExtractAdapters, generate-adapter,
    convert-adapters, a workflow chain)."""
    import torch
    from peft import PeftModel

    from orchestrator.core.job import ModelArtifact
    from orchestrator.olive import load_workflow
    from orchestrator.passes.base import PassError
    from orchestrator.passes.common import onnx_tools
    from orchestrator.passes.onnx.model_builder import ModelBuilderPass
    from orchestrator.passes.training.merge import MergeAdapterWeightsPass
    from orchestrator.schema import ConfigError

    peft_dir = _tuned_peft(tiny_model, tmp_path / f"{kind}-adapter", kind)
    src = ModelArtifact(format="hf_adapter", path=str(tiny_model), adapter_path=str(peft_dir))
    res, merged = _run(MergeAdapterWeightsPass(), tmp_path / "merged", src)
    assert res.metrics["changed_tensors"] > 0
    net = onnx_tools.load_hf_model(tiny_model)
    with torch.no_grad():
        ref = onnx_tools.hf_logits(PeftModel.from_pretrained(net, str(peft_dir)).eval(), IDS)
    got = onnx_tools.hf_logits(onnx_tools.load_hf_model(merged.path), IDS)
    assert np.abs(got - ref).max() < 1e-4
    res, _ = _run(ModelBuilderPass(), tmp_path / "mb", merged, precision="fp32")
    assert res.metrics["parity_max_abs_diff"] < 1e-4
    with pytest.raises(PassError, match=f"a {kind.upper()} adapter cannot be built unmerged"):
        _run(ModelBuilderPass(), tmp_path / "mb2", src, precision="fp32")
    pass_type = {"dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}[kind]
    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n')
    wf = {"input_model": {"type": "HfModel", "model_path": str(tiny_model)},
          "data_configs": [{"name": "d", "load_dataset_config": {"data_name": "json", "data_files": "d.jsonl"}}],
          "passes": {"t": {"type": pass_type, "train_data_config": "d"}, "mb": {"type": "ModelBuilder"},
                     "e": {"type": "ExtractAdapters"}}}  # fmt: skip
    with pytest.raises(ConfigError, match="add a MergeAdapterWeights pass before passes.mb"):
        load_workflow(wf, base_dir=tmp_path)
    wf["passes"] = {"t": wf["passes"]["t"], "m": {"type": "MergeAdapterWeights"}, "mb": {"type": "ModelBuilder"}}
    assert list(load_workflow(wf, base_dir=tmp_path).passes) == ["t", "m", "mb"]
    gen = orch("generate-adapter", "-m", str(tiny_model), "--adapter_path", str(peft_dir), "-o", "g", cwd=tmp_path)
    assert gen.returncode == 2 and f"a {kind.upper()} adapter has no onnxruntime-genai adapter form" in gen.stderr
    conv = orch("convert-adapters", "-a", str(peft_dir), "-o", "c", cwd=tmp_path)
    assert conv.returncode == 2 and "convert-adapters:" in conv.stderr and "Traceback" not in conv.stderr
    ao = orch("auto-opt", "-m", str(tiny_model), "-a", str(peft_dir), "--precision", "fp32", "-o", "ao", "--dry-run",
              cwd=tmp_path)  # fmt: skip
    assert ao.returncode == 0 and f"the {kind.upper()} adapter is merged into the model before export" in ao.stderr


def orch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/ml.db"}
    cmd = [sys.executable, "-m", "orchestrator.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


def test_dynamic_quantization_keeps_lora_inputs(tmp_path: Path, tiny_model: Path, adapter: Path) -> None:
    """OnnxConversion of the unmerged PEFT model -> ExtractAdapters -> OnnxDynamicQuantization (onnxruntime's
    quantize_dynamic): the base MatMuls become int8 (MatMulInteger), the LoRA MatMuls stay float MatMuls fed by the
    adapter inputs, and with the adapter fed (as arrays, and as onnxruntime serves the file: LoraAdapter bound by
    RunOptions) the logits stay close to the float model's with it. Also with required LoRA inputs
    (optional_inputs false), where the pass's own logits check used to stop on the unfed inputs.

    Tolerance: int8 dynamic quantization rounds each weight to a per-tensor step of max|w|/127 and each
    activation to a per-tensor uint8 step at run time. On this tiny random-weight model (logits of magnitude ~1)
    that moves the logits by about 3% of their norm (measured 0.028-0.030 relative L2, max abs 0.03), so they must
    stay within 10% (room for another CPU's kernels). The bound has to separate quantization noise from a broken
    adapter: the adapter itself moves the logits by far more (asserted below), so a dropped, zeroed or baked-in
    adapter fails it, as it fails the adapter's own delta, which must survive quantization within 25% (int8 noise
    on both sides of a difference; a lost adapter gives 100%)."""
    import onnx
    import onnxruntime as ort

    from orchestrator.core.job import ModelArtifact
    from orchestrator.passes.common import onnx_tools
    from orchestrator.passes.common.onnx_common import PARITY_IDS
    from orchestrator.passes.onnx.extract_adapters import ADAPTER_FILE, ExtractAdaptersPass, load_adapter
    from orchestrator.passes.onnx.onnx_conversion import OnnxConversionPass
    from orchestrator.passes.quantization.onnx_dynamic_quant import OnnxDynamicQuantizationPass

    def rel(a: Any, b: Any) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    def lora_inputs(proto: Any) -> dict[str, list]:
        dims = {i.name: i.type.tensor_type.shape.dim for i in proto.graph.input if ".lora_" in i.name}
        return {name: [d.dim_param or d.dim_value for d in dim] for name, dim in dims.items()}

    model = ModelArtifact(format="hf_adapter", path=str(tiny_model), adapter_path=str(adapter))
    _, exported = _run(OnnxConversionPass(), tmp_path / "c", model)
    for optional in (True, False):
        ex_dir, q_dir = tmp_path / f"e-{optional}", tmp_path / f"q-{optional}"
        _, extracted = _run(ExtractAdaptersPass(), ex_dir, exported, optional_inputs=optional)
        res, q = _run(OnnxDynamicQuantizationPass(), q_dir, extracted)
        weights = load_adapter(ex_dir / "model" / ADAPTER_FILE)
        assert len(weights) == 16  # 2 layers x (qkv, o, gate_up, down) x (A, B)

        src = onnx.load(str(ex_dir / "model" / "model.onnx"), load_external_data=False)
        proto = onnx.load(str(q_dir / "model" / "model.onnx"), load_external_data=False)
        lora = lora_inputs(proto)
        assert lora == lora_inputs(src) and set(lora) == set(weights)  # every adapter input kept, by name and shape
        assert all("lora_r" in shape for shape in lora.values())
        defaults = {t.name for t in proto.graph.initializer} & set(lora)
        assert defaults == (set(lora) if optional else set())  # the empty defaults kept only where they were
        consumers = [n for n in proto.graph.node if set(n.input) & set(lora)]
        assert len(consumers) == 16 and all(n.op_type == "MatMul" for n in consumers)  # float, fed by the inputs
        # the base projections are int8: 2 layers x (qkv, o, gate_up, down) + the LM head
        assert sum(n.op_type == "MatMulInteger" for n in proto.graph.node) == 9
        assert (q_dir / "model" / ADAPTER_FILE).is_file()  # the adapter travels with the quantized model

        ref = onnx_tools.ort_logits(ex_dir / "model", IDS, extra=weights)  # the float model, adapter fed
        ref_base = onnx_tools.ort_logits(ex_dir / "model", IDS)  # its base (the inputs empty)
        fed = onnx_tools.ort_logits(q_dir / "model", IDS, extra=weights)
        base = onnx_tools.ort_logits(q_dir / "model", IDS)
        if optional:  # the adapter file as onnxruntime serves it, bound to the inputs by name (its Python API
            # wants required inputs in the feed before an adapter can bind them: optional inputs, Olive's default)
            served = ort.RunOptions()
            lora_file = ort.LoraAdapter()
            lora_file.Load(str(q_dir / "model" / ADAPTER_FILE))
            served.add_active_adapter(lora_file)
            np.testing.assert_allclose(
                onnx_tools.ort_logits(q_dir / "model", IDS, run_options=served), fed, rtol=0, atol=1e-5
            )
        assert rel(ref_base, ref) > 0.3  # the adapter matters: losing it would be far outside the bound below
        assert rel(fed, ref) < 0.1, rel(fed, ref)
        assert (fed.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
        assert rel(fed - base, ref - ref_base) < 0.25, rel(fed - base, ref - ref_base)
        # the pass's own report measures the model as served (adapter fed) as well as its base
        parity = [onnx_tools.ort_logits(d / "model", PARITY_IDS, extra=weights) for d in (q_dir, ex_dir)]
        assert res.metrics["logits_max_abs_diff_vs_input_with_adapter"] == pytest.approx(
            float(np.abs(parity[0] - parity[1]).max()), abs=1e-5
        )
        assert res.metrics["greedy_token_agreement_vs_input_with_adapter"] >= 0.75
        assert res.metrics["logits_max_abs_diff_vs_input"] > 0  # int8 did move the base logits
