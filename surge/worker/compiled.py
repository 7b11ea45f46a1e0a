"""The model forward under torch.compile (Inductor), with its compilations counted and logged.

The model's attention layers read the forward context (surge/layers/forward_context.py): a
decode-only step's is a DecodeBatch whose tensors the graph hands to the native
`surge_native::paged_decode_step`; in any other step each layer is the opaque
`surge::attention` op reading the step's metadata at run time. Either way the graph depends only on
tensor shapes; with dynamic shapes a handful of graphs (one token, a few, many: the quantized
linears switch kernels at 9 rows) cover every batch. Warm-up runs each decode bucket so they are compiled before serving; a
compilation after that is logged as a recompile. Inductor's on-disk cache is kept under
~/.cache/surge/inductor (unless the user's TORCHINDUCTOR_CACHE_DIR says otherwise), so a restart
reuses the compiled kernels (one directory per version of the native kernels' sources: the
cache's key does not cover a custom op's schema, so a changed kernel signature would
otherwise meet graphs that call the old one). The wrapper that calls the kernels is C++ (`cpp_wrapper`) unless
TORCHINDUCTOR_CPP_WRAPPER says otherwise.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from surge.layers.attention import DecodeBatch
from surge.layers.forward_context import ForwardContext, bind_traced, get_forward_context
from surge.layers.native import sources_version

logger = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64  # Dynamo's default is 8, for all CompiledModels together; one model warms up 5-8


def _user_cache_dir() -> str | None:
    """TORCHINDUCTOR_CACHE_DIR as the user set it: importing torch._dynamo (which building any
    model on the meta device does) writes Inductor's default there, which is not a choice."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return value
    return None if value is None or os.path.abspath(value) == os.path.abspath(default_cache_dir()) else value


def _configure_inductor() -> None:
    if _user_cache_dir() is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.path.expanduser("~"), ".cache", "surge", "inductor",
                                                             sources_version())
    if "TORCHINDUCTOR_CPP_WRAPPER" not in os.environ:
        # the graph's kernel calls from C++ rather than Python: batch-1 decode of the default
        # model 70 -> 80 tok/s, for about twice the compile time (docs/performance.md)
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True


class CompiledModel:
    """Drop-in for the model in the runner: same call, same compute_logits."""

    def __init__(self, model: torch.nn.Module, max_positions: int):
        _configure_inductor()
        model.prepare_compile(max_positions)  # type: ignore[operator]
        self.model = model
        self.compute_logits: Callable[[torch.Tensor], torch.Tensor] = model.compute_logits  # type: ignore[assignment]
        self.num_compiles = 0
        self.compile_seconds = 0.0
        self.serving = False  # set after warm-up: a compilation from then on is a recompile
        # No guards on the model's parameters: they are never replaced while it serves (a new
        # version is a new model), and checking ~300 of them cost ~1 ms per step.
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self._fn = torch.compile(self._forward, backend=self._backend, dynamic=True, fullgraph=True, options=options)
        self._static_caches: list[torch.Tensor] = []
        # No duck sizing: with it, two inputs that happen to share a size when a graph is
        # traced (a block table 2 wide and the caches' K/V axis) are assumed equal in that
        # graph, and the next step where they differ compiles another. The graph limit is
        # raised because every CompiledModel shares one Dynamo cache (one code object): two
        # models in one process passed the default 8 together, a hard error under fullgraph.
        # Both patches are made once: entering them costs ~12 us a step, making them ~70.
        self._no_duck_shapes = torch.fx.experimental._config.patch(use_duck_shape=False)
        self._graph_limit = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 batch: DecodeBatch | None) -> Any:
        # the traced context: the caches and a decode batch are graph inputs; None makes each
        # layer the opaque op that reads the step's metadata at run time
        bind_traced(ForwardContext(kv_caches, batch))
        hidden = self.model(input_ids, positions)
        bind_traced(None)
        return hidden

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        self.num_compiles += 1
        tokens = next((t.shape[0] for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 1), "?")
        log = logger.warning if self.serving else logger.info
        log("compiling the forward (graph %d, first seen with %s tokens)%s", self.num_compiles, tokens,
            " while serving: a shape outside the warmed-up buckets" if self.serving else "")
        return compile_fx(gm, example_inputs)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The model's forward, in the runner's forward context (set_forward_context)."""
        context = get_forward_context()
        kv_caches, meta = context.kv_caches, context.metadata
        before = self.num_compiles
        start = time.perf_counter()
        if kv_caches is not self._static_caches:
            # The caches never change shape: static sizes, so no size of theirs is a symbol
            # that another input could be tied to.
            for cache in kv_caches:
                torch._dynamo.mark_static(cache)
            self._static_caches = kv_caches
        with self._no_duck_shapes, self._graph_limit:
            # a decode batch: the graph calls the native kernel with the step's tensors
            out = self._fn(input_ids, positions, kv_caches, meta if isinstance(meta, DecodeBatch) else None)
        if self.num_compiles != before:
            self.compile_seconds += time.perf_counter() - start
        return out
