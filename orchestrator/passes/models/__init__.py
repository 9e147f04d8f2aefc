"""Model sources: the tiny random-weight Phi-3 built from nothing (`tiny_model`) and the demo's SmolLM2
converted from its packaged GGUF (`pretrained`)."""
