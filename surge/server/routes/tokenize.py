"""POST /tokenize and /detokenize with the served model's tokenizer (and chat template)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from surge.errors import SurgeError
from surge.server.errors import bad_request
from surge.server.generation import encode_chat
from surge.server.lease import Lease
from surge.server.openapi import request_body
from surge.server.plumbing import off_loop, read_body
from surge.server.protocol import DetokenizeRequest, TokenizeRequest
from surge.server.state import ServerState
from surge.server.tools import chat_prompt


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.post("/tokenize", openapi_extra=request_body(TokenizeRequest))
    async def tokenize(request: Request) -> dict:
        body = await read_body(request, TokenizeRequest)
        with Lease(state, body.model) as lease:
            engine = lease.engine
            if (body.prompt is None) == (body.messages is None):
                raise bad_request("give exactly one of 'prompt' or 'messages'")

            def encode() -> list[int]:
                if body.messages is not None:
                    _, messages, kwargs = chat_prompt(body, engine, state.settings.tool_call_parser)
                    return encode_chat(engine, messages, body.add_generation_prompt, kwargs)
                try:
                    return engine.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
                except SurgeError as exc:
                    raise bad_request(str(exc), "prompt") from exc

            ids = await off_loop(encode)
            return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @api.post("/detokenize", openapi_extra=request_body(DetokenizeRequest))
    async def detokenize(request: Request) -> dict:
        body = await read_body(request, DetokenizeRequest)
        with Lease(state, body.model) as lease:
            engine = lease.engine
            bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
            if bad:
                raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})", "tokens")
            text = await off_loop(lambda: engine.tokenizer.decode(body.tokens, skip_special_tokens=False))
            return {"prompt": text}

    return api
