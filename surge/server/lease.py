"""A request's lease on the deployment that serves it: admission (readiness, capacity, the
waiting room) and its engine streams, through the response cache where it applies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from surge.engine.async_engine import AsyncEngine
from surge.engine.llm_engine import LLMEngine
from surge.outputs import RequestOutput
from surge.sampling_params import RequestOutputKind, SamplingParams
from surge.server.errors import APIError, bad_request
from surge.server.repository import Deployment, ModelRequiredError, ModelUnavailableError
from surge.server.response_cache import cache_key, is_deterministic, replay

if TYPE_CHECKING:
    from surge.server.state import ServerState


class Lease:
    """A request's hold on the deployment it is routed to: taken before anything is queued,
    returned when the response has been sent, so a retired version unloads only after it."""

    def __init__(self, state: "ServerState", requested: str | None, sequences: int = 1, llm: bool = True):
        if state.status != "ready":
            raise APIError(503, f"the server is {state.status}; retry later", "service_unavailable")
        try:
            self.deployment, self.model = state.repository.acquire(requested, sequences)
        except ModelUnavailableError as exc:
            raise APIError(404, str(exc), "invalid_request_error", "model", "model_not_found") from exc
        except ModelRequiredError as exc:
            raise bad_request(str(exc), "model") from exc
        self.state = state
        self.sequences = sequences
        self.released = False
        if not isinstance(self.deployment, Deployment):
            if not llm:  # a hold on a tensor model (server/kserve_tensor.py)
                return
            self.release()
            raise bad_request(f"model `{self.model}` is an {self.deployment.kind} model, not a language model: it "
                              f"answers on the KServe v2 protocol, POST /v2/models/{self.deployment.name}/infer",
                              "model")
        self.engine: LLMEngine = self.deployment.engine
        self.aengine: AsyncEngine = self.deployment.async_engine
        if not self.aengine.is_running:
            self.release()
            raise APIError(503, f"the engine of {self.deployment.key} has stopped: {self.aengine.error}",
                           "service_unavailable")
        limit = state.settings.max_queue
        capacity = self.engine.max_num_seqs + (limit or 0)
        if limit is not None and sequences > capacity:
            self.release()
            raise bad_request(f"the request asks for {sequences} sequences (n x prompts); {self.model} takes at "
                              f"most {capacity} at once (--max-num-seqs + --max-queue)")
        if limit is not None and self.deployment.sequences > capacity:
            self.release()
            raise APIError(429, f"{self.model} is at capacity ({self.deployment.sequences - sequences} sequences in "
                                f"flight, waiting room of {limit}); retry later", "rate_limit_exceeded",
                           headers={"Retry-After": str(state.settings.retry_after_s)})

    @property
    def fingerprint(self) -> str:
        """Which version answered, as OpenAI's `system_fingerprint` and the X-Surge-Model-Version header."""
        return self.deployment.key

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.repository.release(self.deployment, self.sequences)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def generate(self, ids: list[int], params: SamplingParams, request_id: str, priority: int,
                 prompt_text: str | None = None, replica: int | None = None) -> AsyncIterator[RequestOutput]:
        """The engine's stream for one prompt, or a replay from the response cache. `replica`:
        the data-parallel replica asked for (a cached answer is replayed wherever it came from)."""
        cache = self.state.response_cache
        if cache is None or not is_deterministic(params):
            return self.aengine.generate(ids, params, request_id, priority, prompt_text=prompt_text,
                                         data_parallel_rank=replica)
        key = cache_key(self.deployment.key, ids, params)
        hit = cache.get(key)
        self.state.metrics.record_cache(self.deployment.name, hit is not None)
        if hit is not None:
            return replay(hit, request_id)
        stream = self.aengine.generate(ids, params, request_id, priority, prompt_text=prompt_text,
                                       data_parallel_rank=replica)
        return cache.through(key, stream, cumulative=params.output_kind is RequestOutputKind.CUMULATIVE)


def version_headers(lease: Lease) -> dict[str, str]:
    return {"X-Surge-Model-Version": lease.fingerprint}
