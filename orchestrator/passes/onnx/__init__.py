"""ONNX export and graph work: torch's exporter (`onnx_conversion`), onnxruntime-genai's builder
(`model_builder`, `genai_metadata`), LoRA weights as inputs (`extract_adapters`), graph edits (`graph_surgeries`,
`ort_optimize`) and pipeline splits (`split_model`)."""
