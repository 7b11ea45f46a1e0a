"""POST /v1/embeddings: OpenAI's embeddings from the served causal LM.

Each input runs through the engine as a prefill that ends with its prompt (batched with the
other requests like any prefill); its vector is the model's final hidden states pooled, the
last token's (the default, as vLLM does for decoder models) or the mean over the input, and
L2-normalised. `encoding_format` "base64" gives the little-endian float32 bytes, as OpenAI's
clients decode them. The model is not trained to truncate its vectors, so `dimensions` is only
accepted at the model's own size.
"""

from __future__ import annotations

import base64
import time

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from surge.engine.llm_engine import LLMEngine
from surge.outputs import RequestOutput
from surge.sampling_params import SamplingParams
from surge.server.errors import bad_request
from surge.server.generation import Generation, Prompt, check_prompt_count, merged, prepare_prompts
from surge.server.lease import version_headers
from surge.server.openapi import request_body
from surge.server.plumbing import read_body, until_disconnect
from surge.server.protocol import EmbeddingRequest
from surge.server.state import ServerState


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/embeddings", openapi_extra=request_body(EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        body = await read_body(request, EmbeddingRequest)
        inputs = body.inputs()
        check_prompt_count(state, len(inputs), "input")
        params = SamplingParams(pooling=body.pooling or state.settings.embedding_pooling)

        def prepare(engine: LLMEngine) -> list[Prompt]:
            size = engine.config.model.hidden_size
            if body.dimensions is not None and body.dimensions != size:
                raise bad_request(f"'dimensions' must be this model's embedding size, {size}: its vectors are "
                                  "not trained to be truncated", "dimensions")
            return prepare_prompts(engine, inputs, params, prompt_param="input")

        gen = await Generation.start(state, body.model, len(inputs), prepare, params, "embd", 0, False,
                                     numbered=True)
        metrics, model = state.metrics, gen.lease.deployment.name

        async def collect() -> dict:
            start = time.monotonic()
            finals: dict[int, RequestOutput] = {}
            async for i, out in merged(gen.gens, gen.deadline, state.aborting):
                finals[i] = out
            end = time.monotonic()
            data = []
            for i in range(len(inputs)):
                vector = finals[i].embedding
                assert vector is not None
                data.append({"object": "embedding", "index": i, "embedding": _encoded(vector, body.encoding_format)})
                metrics.record_finish(model, "stop")
                metrics.record_request(model, start, None, end, 0)
            return {"object": "list", "data": data, "model": gen.lease.model,
                    "usage": {"prompt_tokens": gen.prompt_tokens, "total_tokens": gen.prompt_tokens}}

        try:
            return JSONResponse(await until_disconnect(request, collect()), headers=version_headers(gen.lease))
        finally:
            gen.lease.release()

    return api
