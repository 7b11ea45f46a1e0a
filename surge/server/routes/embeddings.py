"""POST /v1/embeddings: OpenAI's embeddings from a served causal LM, or from an encoder served by
a tensor backend with an `[embedding]` table (surge/tensor/embedding.py: its tokenizer, output
and pooling; the inputs go through its dynamic batcher, padded to share batches).

For a causal LM, each input runs through the engine as a prefill that ends with its prompt (batched with the
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
from surge.errors import InvalidArgumentError
from surge.outputs import RequestOutput
from surge.sampling_params import SamplingParams
from surge.server.errors import bad_request
from surge.server.generation import Generation, Prompt, check_prompt_count, merged, prepare_prompts
from surge.server import kserve_tensor
from surge.server.errors import APIError
from surge.server.kserve_codec import KServeError
from surge.server.lease import Lease, version_headers
from surge.server.repository import TensorDeployment
from surge.server.openapi import request_body
from surge.server.plumbing import off_loop, read_body, until_disconnect
from surge.server.protocol import EmbeddingRequest
from surge.server.state import ServerState


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    async def encoder_embeddings(request: Request, body: EmbeddingRequest, lease: Lease) -> Response:
        deployment = lease.deployment
        assert isinstance(deployment, TensorDeployment)
        embedder = deployment.model.embedder
        if embedder is None:
            raise bad_request(f"model `{lease.model}` is an {deployment.kind} model without an [embedding] table in "
                              f"its surge.toml: it serves /v2/models/{deployment.name}/infer only", "model")
        if body.pooling is not None:
            raise bad_request(f"'pooling' applies to language models; `{lease.model}` pools as its [embedding] table "
                              f"says ({embedder.config.pooling})", "pooling")
        size = embedder.hidden_size
        if body.dimensions is not None and body.dimensions != size:
            raise bad_request(f"'dimensions' must be this model's embedding size, {size}: its vectors are not "
                              "trained to be truncated", "dimensions")
        try:  # tokenized off the event loop, as the language models' prompts are
            ids = await off_loop(lambda: [embedder.tokens(item) for item in body.inputs()])
        except InvalidArgumentError as exc:
            raise bad_request(str(exc), "input") from None
        start = time.monotonic()
        try:
            outputs = await until_disconnect(request, kserve_tensor.run(
                deployment, [embedder.arrays(i) for i in ids], None, state.settings.retry_after_s))
        except KServeError as exc:
            raise APIError(exc.status, exc.message, "invalid_request_error" if exc.status == 400 else "server_error",
                           headers=exc.headers) from None
        end = time.monotonic()
        data = []
        for i, (out, tokens) in enumerate(zip(outputs, ids)):
            data.append({"object": "embedding", "index": i,
                         "embedding": _encoded(embedder.vector(out, len(tokens)), body.encoding_format)})
            state.metrics.record_finish(deployment.name, "stop")
            state.metrics.record_request(deployment.name, start, None, end, 0)
        used = sum(len(t) for t in ids)
        return JSONResponse({"object": "list", "data": data, "model": lease.model,
                             "usage": {"prompt_tokens": used, "total_tokens": used}}, headers=version_headers(lease))

    @api.post("/v1/embeddings", openapi_extra=request_body(EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        body = await read_body(request, EmbeddingRequest)
        inputs = body.inputs()
        check_prompt_count(state, len(inputs), "input")
        with Lease(state, body.model, 0, llm=False) as hold:
            if isinstance(hold.deployment, TensorDeployment):
                return await encoder_embeddings(request, body, hold)
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
