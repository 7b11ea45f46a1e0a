"""OpenAI request bodies (pydantic), with surge's usual extensions, and their sampling params.

Field names, defaults and ranges follow OpenAI's API reference; top_k, min_p,
repetition_penalty, ignore_eos and min_tokens are the extensions vLLM users expect.

The API is honest: types are strict (no booleans for integers, no strings for numbers, no
inf/NaN); a field OpenAI defines that surge does not implement is a 400 naming it
(`_unsupported`); a field OpenAI documents as a hint for its own service (user, store,
metadata, ...) is accepted and ignored; any other unknown field is a 400, as OpenAI answers it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from surge.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    SEED_RANGE,
    RequestOutputKind,
    SamplingParams,
    StructuredOutputsParams,
)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
TokenId = int  # checked against the vocabulary by the engine (a clearer message than a range)
MAX_STOP = 16  # stop strings per request (OpenAI: 4)
MAX_STOP_CHARS = 512
MAX_LOGIT_BIAS_ENTRIES = 4096
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions API


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    """OpenAI's response_format.json_schema. surge enforces the schema whether `strict` is set or not."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type \"json_schema\" and only there")
        return self

    def constraint(self) -> StructuredOutputsParams | None:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            assert self.json_schema is not None
            # no schema: any JSON value, as OpenAI's own default
            return StructuredOutputsParams(json=self.json_schema.schema_ if self.json_schema.schema_ is not None
                                           else {})
        return None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: exactly one of json (a schema), json_object, regex, choice, grammar."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def constraint(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(json=self.json_, json_object=bool(self.json_object), regex=self.regex,
                                       choice=self.choice, grammar=self.grammar)


class _SamplingFields(_Strict):
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # OpenAI's hints for its own service: accepted and ignored
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    # extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: Probability | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    skip_special_tokens: bool = True
    priority: Int32 = 0
    data_parallel_rank: int | None = Field(None, ge=0, le=4095)  # route to this replica (or X-Surge-Replica)
    structured_outputs: StructuredOutputs | None = None
    response_format: ResponseFormat | None = None
    # vLLM's earlier names of structured_outputs' fields
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"stop strings must be 1 to {MAX_STOP_CHARS} characters")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and len(v) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries")
        for key in v or {}:
            # ASCII digits only: "³".isdigit() is true and int("³") fails
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {key!r}")
        return v

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def constraint_param(self) -> str | None:
        """The field that carries this request's output constraint, if any."""
        given = [name for name in ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                                   "guided_grammar") if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"give one output constraint, not {' and '.join(given)}")
        return given[0] if given else None

    def constraint(self) -> StructuredOutputsParams | None:
        name = self.constraint_param
        if name is None:
            return None
        if name == "response_format":
            assert self.response_format is not None
            return self.response_format.constraint()
        if name == "structured_outputs":
            assert self.structured_outputs is not None
            return self.structured_outputs.constraint()
        return StructuredOutputsParams(**{name.removeprefix("guided_"): getattr(self, name)})

    @model_validator(mode="after")
    def _one_constraint(self) -> "_SamplingFields":
        self.constraint_param  # raises when several are given
        return self

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None
                        ) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA if self.streaming else RequestOutputKind.FINAL_ONLY,
            structured_outputs=self.constraint(),
        )


def _unsupported(values: dict[str, Any], neutral: dict[str, tuple[Any, ...]]) -> None:
    """A 400 for the first field set to something this server cannot do yet."""
    for name, value in values.items():
        if value is not None and value not in neutral.get(name, ()):
            raise ValueError(f"'{name}' is not supported by this server (send it unset or null)")


PromptField = Annotated[str, Field(min_length=1)] | list[str] | list[TokenId] | list[list[TokenId]]


def _check_prompts(v: Any, what: str) -> Any:
    """A prompt field (text, token ids, or a list of either): no empty list, no empty member."""
    if isinstance(v, list) and not v:
        raise ValueError(f"{what} must not be an empty list")
    if isinstance(v, list) and any(isinstance(p, (str, list)) and not p for p in v):
        raise ValueError(f"no {what} in the list may be empty")
    return v


def _prompt_list(v: Any) -> list[str | list[int]]:
    """A prompt field as a list of prompts."""
    if isinstance(v, str):
        return [v]
    if v and isinstance(v[0], int):
        return [list(v)]
    return list(v)


class CompletionRequest(_SamplingFields):
    prompt: PromptField
    max_tokens: int | None = Field(COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1, le=2**31 - 1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: Any) -> Any:
        return _check_prompts(v, "prompt")

    @model_validator(mode="after")
    def _honest(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("'best_of' other than n is not supported by this server (send it unset or equal to n)")
        _unsupported({"suffix": self.suffix}, {"suffix": ("",)})
        return self

    def effective_max_tokens(self) -> int:
        """null means the default, as absent does (OpenAI's 16)."""
        return COMPLETIONS_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        return _prompt_list(self.prompt)


class EmbeddingRequest(_Strict):
    """OpenAI's /v1/embeddings: `input` is text, token ids, or a list of either."""

    model: str | None = None
    input: PromptField
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None  # a hint for OpenAI's own service: accepted and ignored
    pooling: Literal["mean", "last"] | None = None  # extension: the server's --embedding-pooling if unset

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, v: Any) -> Any:
        return _check_prompts(v, "input")

    def inputs(self) -> list[str | list[int]]:
        return _prompt_list(self.input)


class ContentPart(_Strict):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> "ContentPart":
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported (text only)")
        if self.text is None:
            raise ValueError("a text content part needs 'text'")
        return self


FUNCTION_NAME = r"^[A-Za-z0-9_.:-]{1,64}$"  # OpenAI's: letters, digits, _ and -, at most 64 (and . :)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCallMessage(_Strict):
    """A call in an assistant message the client sends back (OpenAI's shape)."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class _ToolFields(_Strict):
    """What a chat prompt takes besides its messages, shared by chat requests and /tokenize."""

    tools: list[Tool] | None = Field(None, max_length=512)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be \"none\", \"auto\", \"required\" or "
                             f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {v!r}")
        return v

    @property
    def tools_active(self) -> bool:
        """Tools are offered to the model (and its reply read for calls)."""
        return bool(self.tools) and self.tool_choice != "none"


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # what clients echo back from an earlier response: accepted while empty
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None
    tool_calls: list[ToolCallMessage] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # a reasoning model's thinking, echoed back: the template's to use

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        content = data.get("content") if isinstance(data, dict) else None
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise ValueError(f"content parts of type {kind!r} are not supported (text only)")
        return data

    @model_validator(mode="after")
    def _tool_fields_in_place(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry 'tool_calls'")
        for call in self.tool_calls or ():
            try:
                json.loads(call.function.arguments)
            except ValueError as exc:
                raise ValueError(f"tool call {call.id!r}: 'arguments' is not JSON ({exc})") from None
        return self

    def as_template_dict(self) -> dict[str, Any]:
        """The message as transformers hands it to a chat template: text parts joined, a tool
        call's arguments as an object (the templates write them with tojson), and the developer
        role as the system role the templates know."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text or "" for part in content)
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:  # Qwen3's template writes it back in <think> on the last turn
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                for c in self.tool_calls]
        return message


class ChatCompletionRequest(_SamplingFields, _ToolFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    # defined by OpenAI, not implemented here: a 400 unless unset or neutral
    functions: list[Any] | None = None
    function_call: Any = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None

    @model_validator(mode="after")
    def _honest(self) -> "ChatCompletionRequest":
        _unsupported(
            {name: getattr(self, name) for name in ("functions", "function_call", "audio", "modalities",
                                                    "prediction", "web_search_options", "reasoning_effort")},
            {"functions": ([],), "function_call": ("none",), "modalities": (["text"],)},
        )
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice \"required\" needs tools")
        if self.tools_active and self.constraint_param is not None:
            raise ValueError(f"tool calls and {self.constraint_param} cannot be combined")
        return self

    def effective_max_tokens(self, default: int | None) -> int | None:
        """max_completion_tokens, else max_tokens, else the server's --max-tokens-default (None: up to
        the context)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens if self.max_tokens is not None else default


class TokenizeRequest(_ToolFields):
    """The prompt a completion or chat request would run (messages with the same tools and
    template variables give the same tokens)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=4096)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    parallel_tool_calls: bool | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId]


class LoadRequest(_Strict):
    """The body of /v2/repository/models/{name}/load: which version (default: the newest)."""

    version: str | int | None = None

    @field_validator("version")
    @classmethod
    def _positive(cls, v: str | int | None) -> str | int | None:
        text = str(v)
        if v is not None and not (text.isascii() and text.isdigit() and 0 < int(text) < 10**9):
            raise ValueError(f"'version' must be a positive integer, got {v!r}")
        return v


class IndexRequest(_Strict):
    """The body of POST /v2/repository/index (Triton's): `ready` true lists the ready versions only."""

    ready: bool | None = None


class EmptyRequest(_Strict):
    """The body of unload and rollback: nothing, or {}."""


# ---- KServe v2 (documentation of the bodies server/kserve_codec.py parses) ------------------


class KServeTensor(_Strict):
    name: str
    datatype: str  # BOOL, INT8..INT64, UINT8..UINT64, FP16, FP32, FP64, BYTES
    shape: list[int]
    data: list[Any] | None = None  # row-major; absent when the binary extension carries it
    parameters: dict[str, Any] | None = None  # binary_data_size


class KServeRequestedOutput(_Strict):
    name: str
    parameters: dict[str, Any] | None = None  # binary_data


class KServeInferRequest(_Strict):
    id: str | None = None
    parameters: dict[str, Any] | None = None  # generation settings; binary_data_output, priority
    inputs: list[KServeTensor]
    outputs: list[KServeRequestedOutput] | None = None


class KServeGenerateRequest(_Strict):
    text_input: str
    parameters: dict[str, Any] | None = None
