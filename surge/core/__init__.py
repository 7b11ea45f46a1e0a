"""Scheduling and KV-block bookkeeping. Pure Python: no torch import anywhere in core/."""
