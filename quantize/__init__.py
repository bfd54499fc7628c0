"""INT8 post-training quantization (QDQ ONNX), fidelity report, TensorRT engine build/cache."""
