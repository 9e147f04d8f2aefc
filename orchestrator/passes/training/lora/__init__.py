"""LoRA / QLoRA fine-tuning: the passes (train), HF training-argument normalization (training_args), and the
CUDA fast path (cuda: choices per GPU, fused: fused LoRA layers, kernels: Triton kernels).

Kept empty of imports so that `orchestrator.passes.training.lora.training_args` (config checking) loads no torch."""
