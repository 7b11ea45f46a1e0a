"""Runs the model: flat input tensors, slot mapping, block tables, the KV cache tensors."""
