"""Executors: how the engine reaches its workers (in this process, or in worker processes)."""
