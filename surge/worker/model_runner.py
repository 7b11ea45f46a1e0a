"""ModelRunner: turns a SchedulerOutput into flat tensors, runs the model, samples.

It keeps what it needs of each request between steps (sampling settings, seeded generator,
token history for penalties) from the first time the request is scheduled until the
scheduler reports it finished; a preempted request keeps its state, so a seeded request
resumes its random stream where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from surge.core.scheduler_output import SchedulerOutput
from surge.layers.attention import AttentionMetadata
from surge.layers.sampler import Sampler, SamplingRow, TokenLogprobs, token_logprobs


@dataclass(slots=True)
class ModelRunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # prompt logprobs computed this step, in prompt order (position p scores token p + 1)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


class ModelRunner:
    """Owns the KV cache tensors; `execute` runs one scheduled step."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: str,
        eos_ids: frozenset[int] = frozenset(),
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.eos_ids = eos_ids
        self.sampler = Sampler()
        self.requests: dict[str, SamplingRow] = {}

    def prepare(self, output: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """(input ids, positions, attention metadata, rows of the tokens to sample from)."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        width = max((len(r.block_ids) for r in output.requests), default=1)
        tables = [r.block_ids + [0] * (width - len(r.block_ids)) for r in output.requests]
        for r in output.requests:
            n = len(r.token_ids)
            ids.extend(r.token_ids)
            pos = range(r.start_position, r.start_position + n)
            positions.extend(pos)
            table = r.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            starts.append(starts[-1] + n)
            seq_lens.append(r.start_position + n)
            if r.sample:
                sample_rows.append(starts[-1] - 1)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int64, device=dev),
            query_start_loc=starts,
            seq_lens=seq_lens,
            block_size=bs,
        )
        meta.split_decode()
        return (
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            meta,
            sample_rows,
        )

    def _update_states(self, output: SchedulerOutput) -> None:
        for request_id in output.finished_request_ids:
            self.requests.pop(request_id, None)
        for r in output.requests:
            if r.new is not None:
                params = r.new.sampling_params
                gen = None
                if params.seed is not None:
                    gen = torch.Generator(device="cpu").manual_seed(params.seed)
                self.requests[r.request_id] = SamplingRow(params, gen, r.new.prompt_token_ids, [])

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(output)
        result = ModelRunnerOutput()
        if not output.requests:
            return result
        input_ids, positions, meta, sample_rows = self.prepare(output)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        self._prompt_logprobs(output, hidden, meta, result)
        sampled = [r for r in output.requests if r.sample]
        if not sampled:
            return result
        logits = self.model.compute_logits(hidden[sample_rows]).cpu()
        rows = [self.requests[r.request_id] for r in sampled]
        tokens, logprobs = self.sampler(logits, rows, self.eos_ids)
        for r, row, token, lp in zip(sampled, rows, tokens, logprobs):
            row.output_ids.append(token)
            result.sampled[r.request_id] = token
            if lp is not None:
                result.logprobs[r.request_id] = lp
        return result

    def _prompt_logprobs(
        self, output: SchedulerOutput, hidden: torch.Tensor, meta: AttentionMetadata, result: ModelRunnerOutput
    ) -> None:
        """Score each prompt token from the logits of the position before it."""
        for i, r in enumerate(output.requests):
            state = self.requests[r.request_id]
            top_n = state.params.prompt_logprobs
            if top_n is None:
                continue
            prompt = state.prompt_ids
            last = min(r.start_position + len(r.token_ids), len(prompt) - 1)  # positions < last
            if last <= r.start_position:
                continue
            rows = torch.arange(meta.query_start_loc[i], meta.query_start_loc[i] + last - r.start_position)
            logprobs = self.model.compute_logits(hidden[rows.to(hidden.device)]).cpu().log_softmax(-1)
            targets = torch.tensor(prompt[r.start_position + 1 : last + 1], dtype=torch.long)
            result.prompt_logprobs[r.request_id] = token_logprobs(logprobs, targets, [top_n] * len(targets))
