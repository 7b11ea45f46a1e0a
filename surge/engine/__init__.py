"""The engine: requests in, a scheduler and a model runner stepped, outputs out."""
