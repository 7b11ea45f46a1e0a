"""Worker: owns one device's share of the model. It sets up the device and its threads, loads
the weights, sizes and allocates the KV cache, wraps the forward for compilation, and runs
steps through its ModelRunner. An executor calls these methods in this process or in another.

    estimate_memory -> load_model -> determine_num_blocks -> initialize_cache -> execute_model ...
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from surge.config import EngineConfig
from surge.core.runner_output import ModelRunnerOutput
from surge.core.scheduler_output import SchedulerOutput
from surge.distributed.comm import Communicator, ParallelGroups, Rendezvous
from surge.distributed.pipeline_parallel import PipelineLayout
from surge.distributed.tensor_parallel import TensorParallelLayout
from surge.errors import InvalidArgumentError
from surge.worker.reports import MemoryEstimate, ModelInfo, StepTimings

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, rendezvous: Rendezvous | None = None):
        self.config = config
        self.rank = rank
        self.rendezvous = rendezvous  # where the ranks of a tensor / pipeline parallel grid meet (world size > 1)
        self.groups: ParallelGroups | None = None
        self.comm: Communicator | None = None  # the tensor-parallel group's
        self.device = config.device.device
        parallel = config.parallel
        tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
        stage, tensor_rank = divmod(rank, tp)
        self.layout = (TensorParallelLayout(config.model, tensor_rank, tp, parallel.enable_expert_parallel)
                       if tp > 1 else None)
        self.stages = PipelineLayout(config.model.num_hidden_layers, stage, pp) if pp > 1 else None
        # the model this worker holds: its rank's share of each layer, its stage's layers
        model_config = self.layout.local_config() if self.layout is not None else config.model
        if self.stages is not None:
            model_config = dataclasses.replace(model_config, layer_range=self.stages.layer_range())
        self.model_config = model_config
        self.stage = None  # the model's PipelineStage once loaded (pipeline parallelism)
        self._threads_before: int | None = None  # torch's thread count before init_device set ours
        self.model: torch.nn.Module | None = None
        self.runner = None  # a ModelRunner once the cache is allocated
        self.compiled = None  # the CompiledModel with --compile
        self.info: ModelInfo | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.draft_model: torch.nn.Module | None = None  # speculative method "draft"
        self.draft_kv_caches: list[torch.Tensor] = []

    # ---- set-up, in the order an executor calls it --------------------------------------

    def init_device(self) -> None:
        threads = self.config.device.threads
        if threads is not None:  # process-wide: given back at shutdown (a worker in the caller's process)
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
        if self.rendezvous is not None and self.rendezvous.world_size > 1:
            if self.device.startswith("cuda"):  # a device per rank
                self.device = f"cuda:{self.rank}"
                torch.cuda.set_device(self.rank)
            parallel = self.config.parallel
            self.groups = ParallelGroups(self.rendezvous, self.rank, parallel.tensor_parallel_size,
                                         parallel.pipeline_parallel_size, self.device)
            self.comm = self.groups.tensor

    @property
    def dtype(self) -> torch.dtype:
        from surge.platform import TORCH_DTYPES

        return TORCH_DTYPES[self.config.load.dtype]

    def estimate_memory(self) -> MemoryEstimate:
        """What loading will take, before any weight is read (a model repository checks its budget)."""
        from surge.loader import estimate_model_bytes
        from surge.worker.kv_cache import kv_cache_budget

        weights = estimate_model_bytes(self.model_config, self.dtype, self.config.quant.method)
        draft = self.config.draft
        if draft is not None:
            weights += estimate_model_bytes(draft.model, self.dtype, draft.quant.method)
        return MemoryEstimate(weights, kv_cache_budget(self.config.cache, self.device))

    def load_model(self) -> ModelInfo:
        from surge.loader import describe_quantization, load_weights
        from surge.loader.hub import ModelSource

        start = time.perf_counter()
        load, quant = self.config.load, self.config.quant
        source = ModelSource(load.kind, load.path, load.name)
        share = None
        if self.layout is not None:
            from surge.distributed.tensor_parallel import TensorParallelShards
            from surge.models.registry import get_model_class

            assert self.groups is not None, "init_device() first"
            share = TensorParallelShards(self.layout, get_model_class(self.config.model.architecture).tp_plan)
        self.model = load_weights(source, self.config.model, self.dtype, self.device, quant.method, quant.group_size,
                                  share=share, model_config=self.model_config)
        if self.layout is not None:
            from surge.distributed.tensor_parallel import parallelize

            parallelize(self.model, self.layout, self.comm)
        if self.stages is not None:
            from surge.distributed.pipeline_parallel import pipeline

            assert self.groups is not None and self.groups.pipeline is not None
            self.stage = pipeline(self.model, self.stages, self.groups.pipeline)
        self.info = ModelInfo(load.name, load.path, self.config.model.architecture, load.dtype,
                              describe_quantization(self.model))
        logger.info("loaded %s (%s, %s) in %.1fs", load.name, self.config.model.architecture, load.dtype,
                    time.perf_counter() - start)
        draft = self.config.draft
        if draft is not None:
            start = time.perf_counter()
            try:
                self.draft_model = load_weights(ModelSource(draft.load.kind, draft.load.path, draft.load.name),
                                                draft.model, self.dtype, self.device, draft.quant.method,
                                                draft.quant.group_size)
            except Exception as exc:
                raise InvalidArgumentError(f"speculative_config: the draft model {draft.load.name!r} did not load: "
                                           f"{exc}") from exc
            logger.info("loaded the draft model %s (%s, %s) in %.1fs", draft.load.name, draft.model.architecture,
                        describe_quantization(self.draft_model), time.perf_counter() - start)
        return self.info

    def determine_num_blocks(self) -> int:
        """KV blocks that fit the configured budget (or the fraction of free memory)."""
        from surge.worker.kv_cache import cache_dtype, num_kv_blocks

        draft = self.config.draft
        return num_kv_blocks(self.model_config, self.config.cache, cache_dtype(self.config.cache, self.dtype),
                             self.device, draft.model if draft is not None else None)

    def initialize_cache(self, num_blocks: int, eos_token_ids: frozenset[int]) -> ModelInfo:
        """Allocate the cache, wrap the forward for compilation, build the runner; returns the
        model's measured footprint."""
        from surge.loader.memory import module_bytes, tensor_bytes
        from surge.worker.kv_cache import allocate_kv_caches, cache_dtype
        from surge.worker.model_runner import ModelRunner

        assert self.model is not None and self.info is not None, "load_model() first"
        cache = self.config.cache
        kv_dtype = cache_dtype(cache, self.dtype)
        self.kv_caches = allocate_kv_caches(self.model_config, num_blocks, cache.block_size, kv_dtype, self.device)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%s)", num_blocks, cache.block_size,
                    num_blocks * cache.block_size, str(kv_dtype).removeprefix("torch."))
        model = self.model
        if self.config.compilation.compile:
            from surge.worker.compiled import CompiledModel

            model = self.compiled = CompiledModel(self.model, self.config.scheduler.max_model_len)  # type: ignore
        decoder = self._native_decoder(self.model, self.kv_caches)
        drafter = self._drafter(num_blocks, kv_dtype) if self.draft_model is not None else None
        self.runner = ModelRunner(model, self.kv_caches, cache.block_size, self.device, eos_token_ids, decoder,
                                  drafter, driver=self.rank == 0, holds_head=self.model_config.holds_ends,
                                  stage=self.stage)
        weights, caches = module_bytes(self.model), tensor_bytes(self.kv_caches)
        if self.draft_model is not None:
            weights += module_bytes(self.draft_model)
            caches += tensor_bytes(self.draft_kv_caches)
        self.info = dataclasses.replace(self.info, weight_bytes=weights, kv_cache_bytes=caches)
        return self.info

    def _native_decoder(self, model: torch.nn.Module, kv_caches: list[torch.Tensor]):  # noqa: ANN202
        """A model's decode-only step in one native call over its caches, unless turned off."""
        if not self.config.compilation.native_decode or self.config.parallel.world_size > 1:
            return None  # (its one call runs every layer: no place for an all-reduce or a stage's hand-over)
        from surge.layers.native_decoder import build_native_decoder

        return build_native_decoder(model, kv_caches)

    def _drafter(self, num_blocks: int, kv_dtype: torch.dtype):  # noqa: ANN202 (a DraftProposer)
        """The draft model's runner over its own KV cache of the target's blocks."""
        from surge.worker.draft_runner import DraftProposer
        from surge.worker.kv_cache import allocate_kv_caches
        from surge.worker.model_runner import ModelRunner

        draft, cache = self.config.draft, self.config.cache
        assert draft is not None and self.draft_model is not None
        self.draft_kv_caches = allocate_kv_caches(draft.model, num_blocks, cache.block_size, kv_dtype, self.device)
        decoder = self._native_decoder(self.draft_model, self.draft_kv_caches)
        runner = ModelRunner(self.draft_model, self.draft_kv_caches, cache.block_size, self.device, decoder=decoder)
        spec = self.config.speculative
        return DraftProposer(runner, self.config.model.vocab_size, self.config.scheduler.max_num_batched_tokens,
                             spec.draft_p_min if spec is not None else 0.0, draft.model.vocab_size)

    # ---- serving ------------------------------------------------------------------------

    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        assert self.runner is not None, "initialize_cache() first"
        out = self.runner.execute(scheduled)
        if self.compiled is not None:
            out.num_compiles = self.compiled.num_compiles
        return out

    def execute_start(self, scheduled: SchedulerOutput) -> None:
        """The first half of a pipelined step (this stage's part, handed on); execute_finish()
        completes the oldest step started."""
        assert self.runner is not None, "initialize_cache() first"
        self.runner.start(scheduled)

    def execute_finish(self) -> ModelRunnerOutput:
        assert self.runner is not None, "initialize_cache() first"
        return self.runner.finish()

    def timings(self) -> StepTimings:
        return self.runner.timings if self.runner is not None else StepTimings()

    def reset_timings(self) -> None:
        if self.runner is not None:
            self.runner.timings = StepTimings()

    def finish_warmup(self) -> None:
        """Warm-up is over: timings restart, and a compilation from now on is logged as a recompile."""
        self.reset_timings()
        if self.compiled is not None:
            self.compiled.serving = True

    def check_health(self) -> None:
        """Raises if the worker cannot serve (an in-process worker always can)."""

    def shutdown(self) -> None:
        if self.groups is not None:
            self.groups.close()
            self.groups = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        self.runner = None
        self.kv_caches = []
        self.model = None
        self.draft_kv_caches = []
        self.draft_model = None
