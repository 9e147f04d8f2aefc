"""What several pass families share, below all of them: data configs -> text splits (`data`, `text_blocks`),
dummy inputs (`dummy_data`), ONNX helpers (`onnx_tools`, `onnx_common`), Olive's quantized checkpoint layout
(`olive_quant`) and the GPTQ checkpoint layout (`gptq_layout`), written by the quantizers and read by
the ONNX exporters."""
