"""Tensor models beside the LLMs: ONNX Runtime and torch backends behind a dynamic batcher
(config.py: settings and specs; batcher.py; onnx_backend.py; torch_backend.py; model.py)."""
