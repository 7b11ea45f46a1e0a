"""ModelRunner: turns a SchedulerOutput into flat tensors, runs the model, returns logits."""

from __future__ import annotations

import torch

from surge.core.scheduler_output import SchedulerOutput
from surge.layers.attention import AttentionMetadata


class ModelRunner:
    """Owns the KV cache tensors; `execute` returns logits [num_sampled, vocab] in request order."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, device: str):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device

    def prepare(self, output: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """(input ids, positions, attention metadata, rows of the tokens to sample from)."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        max_blocks = max((len(r.block_ids) for r in output.requests), default=1)
        tables = torch.zeros((len(output.requests), max(max_blocks, 1)), dtype=torch.int64)
        for i, r in enumerate(output.requests):
            n = len(r.token_ids)
            ids.extend(r.token_ids)
            pos = range(r.start_position, r.start_position + n)
            positions.extend(pos)
            slots.extend(r.block_ids[p // bs] * bs + p % bs for p in pos)
            starts.append(starts[-1] + n)
            seq_lens.append(r.start_position + n)
            tables[i, : len(r.block_ids)] = torch.tensor(r.block_ids, dtype=torch.int64)
            if r.sample:
                sample_rows.append(starts[-1] - 1)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=tables.to(dev),
            query_start_loc=starts,
            seq_lens=seq_lens,
            block_size=bs,
        )
        return (
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            meta,
            sample_rows,
        )

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> torch.Tensor:
        input_ids, positions, meta, sample_rows = self.prepare(output)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden[sample_rows])
