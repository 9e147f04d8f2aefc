"""The passes, by family. `base` (the Pass contract) and `registry` (Olive type name -> lazy class path) sit at the
top; `common/` holds what several families share (data, ONNX helpers, Olive's quantized checkpoint); each family
(`models/`, `training/`, `onnx/`, `quantization/`, `evaluation/`) imports only `common/` and `base`, never another
family (tests/test_architecture.py)."""
