"""A model's quality on a text: perplexity, and against a reference model the KL divergence of
the next-token distributions and top-1 agreement (the measures llama.cpp reports for its quants).

The text's tokens are cut into windows of `ctx` tokens, one every `stride` tokens, each run
from an empty cache; a window scores the tokens no earlier window scored (token t from the
logits at position t - 1):

    stride = ctx (default):   [0 ......... ctx)[ctx ......... 2 ctx)[2 ctx ...
                               scores 1..ctx-1  scores ctx+1..2ctx-1
    stride < ctx (sliding):   [0 ......... ctx)
                                   [stride ......... stride + ctx)      scores ctx..stride+ctx-1,
                                                                        each with >= ctx - stride
                                                                        tokens of context

Windows run through the engine's own layers and kernels (paged cache, prompt chunks, the
quantized linears, the KV-cache dtype), so what is measured is what serves.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from surge.errors import InvalidArgumentError

ROWS = 256  # logits rows turned into log-probabilities at a time: [256, 49152] float32 is 50 MB


@dataclass(frozen=True, slots=True)
class Window:
    start: int
    end: int
    first_target: int  # tokens first_target..end-1 are scored

    @property
    def targets(self) -> int:
        return self.end - self.first_target


def check_windows(ctx: int, stride: int | None) -> int:
    """The stride to use, once ctx and stride are checked."""
    stride = ctx if stride is None else stride
    if ctx < 2:
        raise InvalidArgumentError(f"ctx must be at least 2 tokens, got {ctx}")
    if not 1 <= stride <= ctx:
        raise InvalidArgumentError(f"stride must be between 1 and ctx ({ctx}), got {stride}")
    return stride


def plan_windows(n_tokens: int, ctx: int, stride: int | None = None) -> list[Window]:
    """The windows over `n_tokens` tokens; each scores at least one token."""
    stride = check_windows(ctx, stride)
    if n_tokens < 2:
        raise InvalidArgumentError(f"the text has {n_tokens} token(s); at least 2 are needed to score one")
    windows, scored, start = [], 0, 0
    while True:
        end = min(start + ctx, n_tokens)
        first = max(start + 1, scored)
        if first < end:
            windows.append(Window(start, end, first))
        scored = end
        if end == n_tokens:
            return windows
        start += stride


def read_text(path: str, what: str = "text") -> str:
    """A UTF-8 text file's contents, with a clear error for what can go wrong."""
    if not os.path.isfile(path):
        raise InvalidArgumentError(f"{what} file {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"{what} file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        raise InvalidArgumentError(f"{what} file {path} is empty")
    return text


class WindowRunner:
    """Runs one window at a time through a loaded model on a paged cache of its own, in
    prompt chunks of at most `chunk` tokens as the scheduler would cut them."""

    def __init__(self, loaded: Any, ctx: int, block_size: int = 16, chunk: int = 512, compile: bool = False,
                 kv_cache_dtype: str = "auto"):
        from surge.config import CacheConfig
        from surge.worker.kv_cache import allocate_kv_caches, cache_dtype
        from surge.worker.model_runner import ModelRunner

        limit = loaded.config.max_position_embeddings
        if ctx > limit:
            raise InvalidArgumentError(f"ctx {ctx} is longer than the model's context ({limit} tokens)")
        self.loaded = loaded
        self.ctx = ctx
        self.chunk = chunk
        device = str(loaded.model.model.norm.weight.device)
        blocks = -(-ctx // block_size)
        # block 0 stays unused, as in the engine, so a zero-padded block table cannot alias a live block
        kv_dtype = cache_dtype(CacheConfig(block_size, cache_dtype=kv_cache_dtype), loaded.dtype)
        caches = allocate_kv_caches(loaded.config, blocks + 1, block_size, kv_dtype, device)
        model = loaded.model
        if compile:
            from surge.worker.compiled import CompiledModel

            model = CompiledModel(loaded.model, limit)
        self.model = model
        self.runner = ModelRunner(model, caches, block_size, device)
        self.table = list(range(1, blocks + 1))

    @torch.inference_mode()
    def hidden(self, ids: list[int]) -> torch.Tensor:
        """Final hidden states at every position of `ids`, a sequence starting at position 0."""
        from surge.core.scheduler_output import ScheduledRequest, SchedulerOutput

        if len(ids) > self.ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the {self.ctx}-token cache")
        out = []
        for lo in range(0, len(ids), self.chunk):
            step = SchedulerOutput([ScheduledRequest("eval", ids[lo : lo + self.chunk], lo, self.table, False)])
            out.append(self.runner.hidden_states(step)[0])
        return torch.cat(out)

    @torch.inference_mode()
    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)


@dataclass
class PerplexityResult:
    model: str
    quantization: str
    tokens: int  # tokens scored
    windows: int
    ctx: int
    stride: int
    nll: float  # mean negative log-likelihood per scored token (nats)
    perplexity: float
    seconds: float


@dataclass
class CompareResult:
    model: str
    quantization: str
    reference: str
    reference_quantization: str
    tokens: int
    windows: int
    ctx: int
    stride: int
    perplexity: float
    reference_perplexity: float
    delta_ppl_pct: float  # 100 (ppl / reference ppl - 1)
    kld_mean: float  # KL(reference || model) of the next-token distributions, nats
    kld_median: float
    kld_p99: float
    kld_max: float
    top1_agreement: float  # share of positions where both models' most likely token is the same
    seconds: float


def _progress(windows: list[Window], show: bool) -> Iterable[Window]:
    if not show:
        return windows
    from tqdm import tqdm

    return tqdm(windows, desc="windows", unit="win", file=sys.stderr, leave=False)


def _target_rows(w: Window) -> tuple[slice, slice]:
    """Rows of the window's logits and indices of its tokens that they score."""
    return slice(w.first_target - 1 - w.start, w.end - 1 - w.start), slice(w.first_target, w.end)


def _scored(runners: list[WindowRunner], ids: list[int], windows: list[Window],
            progress: bool) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """Each runner's log-probabilities for up to ROWS scored positions at a time, and the
    tokens [n, 1] they score."""
    for w in _progress(windows, progress):
        window = ids[w.start : w.end]
        rows, targets = _target_rows(w)
        hidden = [r.hidden(window)[rows] for r in runners]
        t = torch.tensor(ids[targets])
        for lo in range(0, len(t), ROWS):
            yield [r.log_probs(h[lo : lo + ROWS]) for r, h in zip(runners, hidden)], t[lo : lo + ROWS, None]


def perplexity(runner: WindowRunner, ids: list[int], stride: int | None = None,
               progress: bool = False) -> PerplexityResult:
    start = time.perf_counter()
    windows = plan_windows(len(ids), runner.ctx, stride)
    nll, n = 0.0, 0
    for (lp,), t in _scored([runner], ids, windows, progress):
        nll -= lp.gather(1, t).double().sum().item()
        n += len(t)
    loaded = runner.loaded
    return PerplexityResult(loaded.source.name, loaded.quantization, n, len(windows), runner.ctx,
                            stride or runner.ctx, nll / n, math.exp(nll / n), time.perf_counter() - start)


def compare(runner: WindowRunner, reference: WindowRunner, ids: list[int], stride: int | None = None,
            progress: bool = False) -> CompareResult:
    """The model against the reference on the same windows, position by position."""
    if runner.ctx != reference.ctx:
        raise ValueError("both runners need the same ctx")
    vocab, ref_vocab = runner.loaded.config.vocab_size, reference.loaded.config.vocab_size
    if vocab != ref_vocab:
        raise InvalidArgumentError(
            f"the model has {vocab} tokens in its vocabulary and the reference {ref_vocab}: "
            "KL divergence needs the same vocabulary")
    start = time.perf_counter()
    windows = plan_windows(len(ids), runner.ctx, stride)
    nll = ref_nll = 0.0
    klds: list[torch.Tensor] = []
    agree = 0
    for (lp, ref_lp), t in _scored([runner, reference], ids, windows, progress):
        nll -= lp.gather(1, t).double().sum().item()
        ref_nll -= ref_lp.gather(1, t).double().sum().item()
        klds.append((ref_lp.exp() * (ref_lp - lp)).sum(-1))
        agree += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
    kld = torch.cat(klds).double()
    n = len(kld)
    ppl, ref_ppl = math.exp(nll / n), math.exp(ref_nll / n)
    a, b = runner.loaded, reference.loaded
    return CompareResult(
        a.source.name, a.quantization, b.source.name, b.quantization, n, len(windows), runner.ctx,
        stride or runner.ctx, ppl, ref_ppl, 100 * (ppl / ref_ppl - 1), kld.mean().item(), kld.median().item(),
        torch.quantile(kld, 0.99).item(), kld.max().item(), agree / n, time.perf_counter() - start)


def tokenize_text(loaded: Any, text: str, max_tokens: int | None = None) -> list[int]:
    """The text's token ids, no special tokens added (the text is scored as it is)."""
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    if max_tokens is not None:
        if max_tokens < 2:
            raise InvalidArgumentError(f"max tokens must be at least 2, got {max_tokens}")
        ids = ids[:max_tokens]
    return ids


def same_tokens(reference: Any, text: str, ids: list[int], max_tokens: int | None) -> None:
    """The reference must read the text as the same tokens, or the distributions are not comparable."""
    ref_ids = tokenize_text(reference, text, max_tokens)
    if ref_ids != ids:
        where = next((i for i, (x, y) in enumerate(zip(ids, ref_ids)) if x != y), min(len(ids), len(ref_ids)))
        raise InvalidArgumentError(
            f"the model and the reference tokenize the text differently (first difference at token {where}); "
            "compare models that share a tokenizer")
