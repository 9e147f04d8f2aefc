"""Evaluation: metrics of a model on the target (`evaluate` and its parts) and onnxruntime session tuning
(`session_tuning`)."""
