"""The networks at run time: attention injection, backends (torch, ONNX Runtime, TensorRT), specs, manifests, memory."""
