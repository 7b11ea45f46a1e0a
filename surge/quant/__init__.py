"""Offline quantization tools: quantize a checkpoint (RTN, GPTQ, SmoothQuant W8A8), calibrate,
choose schemes per module, measure quality. The runtime formats they write are in
surge/layers/quantization/; reading them back is surge/loader/quantized_checkpoint.py."""
