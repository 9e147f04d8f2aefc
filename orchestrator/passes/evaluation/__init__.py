"""Evaluation: metrics of a model on the target (`evaluate`) and onnxruntime session tuning (`session_tuning`)."""
