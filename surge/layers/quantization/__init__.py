"""Runtime weight formats and the layers that run them: int4/int8/W8A8 weights, quantized
linears, and applying a quantization to a loaded model (apply.py)."""
