"""The fusion network (PyTorch): training, calibration, evaluation, ONNX export."""
