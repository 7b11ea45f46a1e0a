"""Test helpers that run surge's model layer directly on token ids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from surge.core.scheduler_output import ScheduledRequest, SchedulerOutput
from surge.loader import LoadedModel
from surge.worker.kv_cache import allocate_kv_caches
from surge.worker.model_runner import ModelRunner

BLOCK = 16


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def loaded_of(llm: Any) -> LoadedModel:
    """The model an LLM with the in-process worker runs, as the loader returns one."""
    from surge.loader.hub import ModelSource

    worker = llm.engine.core.executor.worker
    load = worker.config.load
    return LoadedModel(ModelSource(load.kind, load.path, load.name), worker.config.model, worker.model,
                       llm.tokenizer, worker.dtype, worker.info.quantization)


def surge_logits(loaded: LoadedModel, sequences: list[list[int]], chunks: int = 1) -> list[torch.Tensor]:
    """Logits at every position of each sequence, run as one flat batch through the paged cache.

    With chunks > 1 each sequence is fed in that many pieces, so later pieces attend to
    context that earlier steps wrote into the cache.
    """
    blocks_needed = [-(-len(s) // BLOCK) for s in sequences]
    caches = allocate_kv_caches(loaded.config, sum(blocks_needed) + 1, BLOCK, loaded.dtype, "cpu")
    runner = ModelRunner(loaded.model, caches, BLOCK, "cpu")
    tables, next_block = [], 1  # block 0 stays unused so a zero-padded table cannot alias it
    for n in blocks_needed:
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    pieces: list[list[torch.Tensor]] = [[] for _ in sequences]
    for step in range(chunks):
        scheduled = []
        for i, seq in enumerate(sequences):
            bounds = [len(seq) * k // chunks for k in range(chunks + 1)]
            lo, hi = bounds[step], bounds[step + 1]
            if hi > lo:
                scheduled.append((i, ScheduledRequest(str(i), seq[lo:hi], lo, tables[i], True)))
        out = SchedulerOutput([r for _, r in scheduled])
        with torch.inference_mode():
            hidden, meta = runner.hidden_states(out)
            logits = loaded.model.compute_logits(hidden)
        for (i, _), start, end in zip(scheduled, meta.query_start_loc, meta.query_start_loc[1:]):
            pieces[i].append(logits[start:end])
    return [torch.cat(p) for p in pieces]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """Max abs difference within `rel` of the logit scale (the largest |logit|)."""
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel} * logit scale {scale:.3g}"


def hf_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """A checkpoint tensor by its Hugging Face name, read back from surge's fused modules."""
    from surge.layers.quantization.quant_linear import QuantLinear

    from surge.loader.weight_loading import fused_name

    fused, shard = fused_name(model, name)
    module_name, _, attr = fused.rpartition(".")
    module = model.get_submodule(module_name)
    full = module.dequantize() if isinstance(module, QuantLinear) else getattr(module, attr).detach().float()
    sizes = model.shard_sizes(fused)
    if not sizes:
        return full
    start = sum(sizes[:shard])
    return full[start : start + sizes[shard]]


def assert_saved_equals_memory(model: str, saved_dir: str, opts, text: str
                               ) -> tuple[LoadedModel, list[int], LoadedModel]:
    """quantize -> save -> load runs exactly the in-memory quantized model: `model` quantized
    again with `opts` (deterministic) and installed into a fresh load gives the logits of
    `saved_dir` bit for bit, in float32 and bf16. Returns the float model, the first 70 ids of
    `text` and the saved checkpoint loaded in bf16."""
    from surge.loader import load_model
    from surge.quant.policy import Policy, load_policy, resolve_policy
    from surge.quant.quantize import install, quantize_weights

    src = load_model(model, "float32", "cpu", "none")
    schemes = resolve_policy(src.model, load_policy(opts.policy) if opts.policy else Policy(), opts.scheme)
    ids = src.tokenizer.encode(text, add_special_tokens=False)
    weights, _ = quantize_weights(src, schemes, opts, ids)
    seq = ids[:70]
    for dtype in ("float32", "bfloat16"):
        saved = load_model(saved_dir, dtype, "cpu")
        memory = load_model(model, dtype, "cpu", "auto", before_finalize=install(weights))
        assert saved.quantization == memory.quantization
        (a,), (b,) = surge_logits(saved, [seq], chunks=2), surge_logits(memory, [seq], chunks=2)
        assert torch.equal(a, b), dtype
    return src, seq, saved


def assert_quantize_cli_refuses(tmp_path: Path, model: Path, capsys: Any, argv: list[str], message: str) -> None:
    """`surge quantize -m MODEL ARGV -o tmp_path/out` exits 2 with `message` on stderr and
    leaves nothing behind (no output directory, no temporary one)."""
    from surge.entrypoints.cli import main

    try:
        rc = main(["quantize", "-m", str(model), "--no-progress", *argv, "-o", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".surge-quantize-")]
