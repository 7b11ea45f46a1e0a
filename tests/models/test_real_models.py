"""Real GGUFs people download (surge.loader.zoo), run in float32 against transformers loading
the same file: greedy tokens on plain and chat prompts, the tokenizer and chat template (with a
tool definition where the template takes tools), and perplexity on the same token ids; and the
default load (bf16, the file's blocks on surge's kernels) against surge's float32 model."""

from __future__ import annotations

import gc
import math
import os
from pathlib import Path

import pytest
import torch

from surge import SamplingParams
from surge.errors import InvalidArgumentError
from surge.layers.native import linear_ops
from surge.loader import zoo
from surge.quant.evaluate import WindowRunner, perplexity, plan_windows
from tests.helpers import loaded_of

pytestmark = pytest.mark.slow

TEXT = Path(__file__).resolve().parents[1] / "data" / "apache-2.0.txt"
PLAIN = [
    "The capital of France is",
    "def quicksort(arr):\n",
    "Water boils at a temperature of",
]
# in place of the chats, for a model without a chat template (a base model)
MORE_PLAIN = ["Question: What is 12 times 12?\nAnswer:", "The three primary colors are"]
CHATS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
]
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
TOKENIZER_TEXTS = [
    "Hello, world! 12345 + 678 = ?",
    "  leading spaces\tand tabs\n\nnew lines ",
    "Ünïcödé: 日本語のテキスト, emoji 🤖, Ελληνικά",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n<start_of_turn>model\n<end_of_turn>",  # control tokens of either family
]
# the 1.5B comes with the extra qwen-1-5b (README command 2 installs it; in float32 both engines take
# ~6 minutes over it)
MODELS = ["gemma-3-270m-q4_k_m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m"]
TEMPLATE_TAKES_TOOLS = {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m"}


class Pair:
    """surge and transformers on one zoo model, both in float32 from the same GGUF."""

    def __init__(self, name: str):
        import transformers
        from surge import LLM

        self.name = name
        self.path = zoo.assemble(name)
        directory, file = os.path.dirname(self.path), os.path.basename(self.path)
        self.llm = LLM(name, dtype="float32", quantization="none", kv_cache_memory=128 << 20)
        self.ref = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=file, dtype=torch.float32).eval()
        self.ref_tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=file)


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    if not zoo.is_installed(request.param):
        pytest.skip(f"{request.param} is not installed: {zoo.ZOO[request.param].pip}")
    p = Pair(request.param)
    yield p
    del p
    gc.collect()


def _prompts(pair: Pair) -> list[list[int]]:
    tok = pair.llm.tokenizer
    if not tok.chat_template:
        return [tok.encode(p) for p in PLAIN + MORE_PLAIN]
    return [tok.encode(p) for p in PLAIN] + [tok.encode_chat(m) for m in CHATS]


def test_greedy_32_tokens_equal_transformers(pair):
    prompts = _prompts(pair)
    outs = pair.llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    pair.ref.generation_config.eos_token_id = None
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            full = pair.ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == full[0, len(ids):].tolist(), pair.llm.tokenizer.decode(ids)
    assert pair.llm.engine.is_idle_clean()


def test_tokenizer_and_chat_template_equal_transformers(pair):
    tok, ref = pair.llm.tokenizer, pair.ref_tok
    for text in TOKENIZER_TEXTS + [TEXT.read_text()[:2000]]:
        assert tok.encode(text) == ref.encode(text), text
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
    if ref.chat_template is None:  # a base model: chat is refused with the reason
        assert tok.chat_template is None
        with pytest.raises(InvalidArgumentError, match="no chat template"):
            pair.llm.chat(CHATS[0])
        return
    tools = TOOLS if pair.name in TEMPLATE_TAKES_TOOLS else None
    for messages in CHATS:
        ours = tok.apply_chat_template(messages, tools=tools) if tools else tok.apply_chat_template(messages)
        theirs = ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert ours == theirs
    if tools:
        assert '"get_weather"' in ours


def test_perplexity_equals_transformers(pair):
    ids = pair.llm.tokenizer.encode(TEXT.read_text(), add_special_tokens=False)[:384]
    ctx = 192
    ours = perplexity(WindowRunner(loaded_of(pair.llm), ctx, chunk=128), ids)
    nll, n = 0.0, 0
    for w in plan_windows(len(ids), ctx):
        x = torch.tensor([ids[w.start: w.end]])
        labels = x.clone()
        labels[0, : w.first_target - w.start] = -100
        with torch.no_grad():
            nll += pair.ref(x, labels=labels).loss.item() * w.targets
        n += w.targets
    assert ours.tokens == n
    assert ours.perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)  # to 4 digits


@pytest.mark.skipif(linear_ops() is None, reason="K-quant and Q5 blocks run on AVX-512 BF16 only")
def test_default_load_runs_the_blocks_within_the_file_size_and_keeps_the_perplexity(pair):
    """The load a user gets (bf16, -q auto) runs the file's Q4_K / Q6_K (and Q5_0, Q8_0) blocks
    on surge's kernels, its weights within 1.15x of the file, with the float32 model's
    perplexity within bf16's rounding (a wrong scale in any format moves it by far more)."""
    from surge import LLM

    llm = LLM(pair.name, dtype="bfloat16", kv_cache_memory=64 << 20)
    try:
        info = llm.engine.model_info
        assert "q4_k" in info.quantization and "q6_k" in info.quantization, info.quantization
        assert info.weight_bytes <= 1.15 * os.path.getsize(pair.path)
        ids = llm.tokenizer.encode(TEXT.read_text(), add_special_tokens=False)[:384]
        ours = perplexity(WindowRunner(loaded_of(llm), 192, chunk=128), ids)
        ref = perplexity(WindowRunner(loaded_of(pair.llm), 192, chunk=128), ids)
        assert ours.perplexity == pytest.approx(ref.perplexity, rel=0.02), (ours.perplexity, ref.perplexity)
    finally:
        llm.shutdown()
