"""OpenAI's response shapes, apart from HTTP: logprobs in the completions and the chat format,
usage, chunk envelopes."""

from __future__ import annotations

from typing import Any

from surge.engine.llm_engine import LLMEngine
from surge.outputs import PositionLogprobs


def _token_text(engine: LLMEngine, token_id: int, lp: PositionLogprobs | None) -> str:
    if lp is not None and token_id in lp and lp[token_id].decoded_token is not None:
        return lp[token_id].decoded_token  # type: ignore[return-value]
    return engine.token_text(token_id)


def completion_logprobs(
    engine: LLMEngine, token_ids: list[int], positions: list[PositionLogprobs | None], top_n: int, offset: int
) -> dict[str, list]:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, pos in zip(token_ids, positions):
        text = _token_text(engine, tid, pos)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if pos is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(pos[tid].logprob)
        best = sorted(pos.items(), key=lambda kv: kv[1].rank)[: max(top_n, 0)]
        tops.append({(lp.decoded_token or ""): lp.logprob for _, lp in best} if top_n else {})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(engine: LLMEngine, token_ids: list[int], positions: list[PositionLogprobs], top_n: int) -> dict:
    content = []
    for tid, pos in zip(token_ids, positions):
        text = _token_text(engine, tid, pos)
        alts = sorted((kv for kv in pos.items() if kv[1].rank <= top_n), key=lambda kv: kv[1].rank)[:top_n]
        content.append({
            "token": text,
            "logprob": pos[tid].logprob,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": lp.decoded_token or "", "logprob": lp.logprob,
                 "bytes": list((lp.decoded_token or "").encode("utf-8"))}
                for _, lp in alts
            ],
        })
    return {"content": content, "refusal": None}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage; `prompt_tokens_details.cached_tokens`: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def envelope(rid: str, obj: str, created: int, model: str, fingerprint: str, choices: list[dict],
             **extra: Any) -> dict[str, Any]:
    """The fields every completion, chat answer and chunk starts with."""
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": fingerprint,
            "choices": choices, **extra}
