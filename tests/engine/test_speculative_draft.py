"""Speculative decoding with a draft model (method "draft"): the target's greedy tokens and
sampled distribution, the draft's KV kept right across refusals, a worker process, the
quantized target as its own draft, bad drafts refused at start."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from surge import LLM, SamplingParams
from surge.core import speculation
from surge.errors import InvalidArgumentError
from surge.worker.draft_runner import DraftProposer
from tests.engine.test_speculative import chi_square_p

WORDS = "red blue green one two three alpha beta gamma north south east west".split()


def draft_config(model: str | Path, k: int = 4, p_min: float = 0.0) -> dict:
    """A draft model's config; every proposal made, however doubtful, unless p_min says."""
    return {"method": "draft", "model": str(model), "num_speculative_tokens": k, "draft_p_min": p_min}


def noisy_copy(src: Path, dst: Path, scale: float) -> Path:
    """The model at `src` with Gaussian noise (`scale` times each matrix's spread) on its
    matrices: a draft that agrees with it often, not always."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.add_(scale * param.std() * torch.randn(param.shape, generator=gen))
    model.save_pretrained(dst)
    for name in src.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(name, dst / name.name)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    from tests.conftest import build_tiny_model

    root = tmp_path_factory.mktemp("draft_models")
    target = build_tiny_model("llama", root / "target", tiny_tokenizer_dir, num_hidden_layers=3)
    return {"target": target, "noisy": noisy_copy(target, root / "noisy", 0.03),
            "qwen2": build_tiny_model("qwen2", root / "qwen2", tiny_tokenizer_dir, seed=3)}


# a KV cache small enough to preempt, prefills chunked beside decodes, prefix caching on
SMALL = dict(dtype="float32", kv_cache_memory=512 << 10, max_num_batched_tokens=48, long_prefill_token_threshold=24,
             max_num_seqs=8)


PREAMBLE = "Answer in the words of the list: " + " ".join(WORDS * 2) + ". "  # a prefix that caches


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, 4)
        out.append(" ".join(words * (1 + i % 3)) if i % 2 else f"{PREAMBLE}{words[0]} and {words[1]}, {i}")
    return out


@pytest.mark.slow
def test_greedy_tokens_identical_on_200_prompts_with_a_draft_model(models, monkeypatch: pytest.MonkeyPatch):
    """200 prompts in batches of 1 to 8, with preemptions, chunked prefill and prefix hits: a draft
    that is often right and often wrong changes no token."""
    monkeypatch.setattr(speculation.Speculator, "fixed_rows", 1e9)  # every request proposes K every step
    target = str(models["target"])
    plain = LLM(target, **SMALL)
    spec = LLM(target, **SMALL, speculative_config=draft_config(models["noisy"]))
    texts = prompts(200)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    sizes = [1, 3, 8, 2, 5, 4, 6, 8]
    i = k = 0
    while i < len(texts):
        batch = texts[i:i + sizes[k % len(sizes)]]
        i, k = i + len(batch), k + 1
        a = [o.outputs[0].token_ids for o in plain.generate(batch, params)]
        b = [o.outputs[0].token_ids for o in spec.generate(batch, params)]
        assert b == a, batch
    stats = spec.engine.stats()
    assert stats.spec_method == "draft" and stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert 0.2 < stats.spec_acceptance_rate < 0.95  # proposals both accepted and refused
    assert spec.engine.scheduler.all_blocks_free()


def test_the_drafts_cache_follows_verifications(models, monkeypatch: pytest.MonkeyPatch):
    """The target as its own draft. Every proposal right: all accepted, every step, so the last
    proposal (never fed to the draft) is computed by the next step's first pass. Then the second
    proposal of each step spoiled: the target keeps the first and refuses the second, so every
    verification accepts exactly one; the spoiled token's KV is recomputed."""
    monkeypatch.setattr(speculation.Speculator, "fixed_rows", 1e9)
    target = str(models["target"])
    plain = LLM(target, **SMALL)
    spec = LLM(target, **SMALL, speculative_config=draft_config(target, k=3))
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    texts = prompts(6, seed=1)
    expected = [o.outputs[0].token_ids for o in plain.generate(texts, params)]
    assert [o.outputs[0].token_ids for o in spec.generate(texts, params)] == expected
    stats = spec.engine.stats()
    assert stats.spec_drafts > 20 and stats.spec_accepted_tokens == stats.spec_draft_tokens

    run = DraftProposer._run

    def spoiled(self, step, depth):  # noqa: ANN001, ANN202
        tokens = run(self, step, depth)
        return {rid: ((t + 1) % 384, p) if depth == 2 else (t, p) for rid, (t, p) in tokens.items()}

    monkeypatch.setattr(DraftProposer, "_run", spoiled)
    assert [o.outputs[0].token_ids for o in spec.generate(texts, params)] == expected
    after = spec.engine.stats()
    drafts = after.spec_drafts - stats.spec_drafts
    assert drafts > 30 and after.spec_accepted_tokens - stats.spec_accepted_tokens == drafts


def test_a_draft_in_a_worker_process_and_beside_sampled_requests(models, monkeypatch: pytest.MonkeyPatch):
    """The mp executor's worker runs the draft; greedy and seeded requests in one batch give the
    tokens they give without speculation."""
    monkeypatch.setattr(speculation.Speculator, "fixed_rows", 1e9)
    target = str(models["target"])
    texts = prompts(4, seed=2)
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=0.7, seed=5, ignore_eos=True)] * 2
    expected = [o.outputs[0].token_ids for o in LLM(target, **SMALL).generate(texts, params)]
    with LLM(target, **SMALL, speculative_config=draft_config(models["qwen2"]),
             distributed_executor_backend="mp") as spec:
        assert [o.outputs[0].token_ids for o in spec.generate(texts, params)] == expected
        assert spec.engine.stats().spec_drafts > 0


@pytest.mark.slow
def test_sampled_tokens_follow_the_targets_distribution(models, monkeypatch: pytest.MonkeyPatch):
    """Temperature 0.8, top-p 0.9: the tokens after the first with a draft model and without agree
    by a chi-square test at p = 0.01 (they come from verified proposals)."""
    monkeypatch.setattr(speculation.Speculator, "fixed_rows", 1e9)
    target = str(models["target"])
    plain = LLM(target, dtype="float32")
    spec = LLM(target, dtype="float32", speculative_config=draft_config(models["noisy"], k=2))
    text = "red blue green red blue green red"
    n = 1000
    samples = {}
    for name, llm, offset in (("plain", plain, 0), ("spec", spec, 10**6)):
        params = [SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, seed=offset + i, ignore_eos=True)
                  for i in range(n)]
        outs = []
        for start in range(0, n, 100):
            chunk = params[start:start + 100]
            outs += [tuple(o.outputs[0].token_ids) for o in llm.generate([text] * len(chunk), chunk)]
        samples[name] = outs
    stats = spec.engine.stats()
    assert stats.spec_drafts >= n and stats.spec_draft_tokens > 1.5 * n and stats.spec_accepted_tokens > n // 5
    a, b = samples["plain"], samples["spec"]
    for position in (1, 2, 3):
        assert chi_square_p([x[position] for x in a], [x[position] for x in b]) > 0.01
    assert chi_square_p([x[1:3] for x in a], [x[1:3] for x in b]) > 0.01


def test_proposals_the_draft_doubts_are_not_made(models, monkeypatch: pytest.MonkeyPatch):
    """A proposal below the draft's own probability bar (draft_p_min) ends the request's
    proposals: with a bar no token clears nothing is verified, with none every scheduled
    proposal is; the tokens are the target's either way, and the stats count what was verified."""
    monkeypatch.setattr(speculation.Speculator, "fixed_rows", 1e9)
    target = str(models["target"])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    texts = prompts(4, seed=3)
    expected = [o.outputs[0].token_ids for o in LLM(target, **SMALL).generate(texts, params)]
    counts = {}
    for bar in (1.0, 0.0):
        spec = LLM(target, **SMALL, speculative_config=draft_config(models["noisy"], k=3, p_min=bar))
        assert [o.outputs[0].token_ids for o in spec.generate(texts, params)] == expected
        stats = spec.engine.stats()
        counts[bar] = (stats.spec_drafts, stats.spec_draft_tokens)
    assert counts[1.0] == (0, 0)
    drafts, tokens = counts[0.0]
    assert drafts > 10 and tokens > 2 * drafts


def test_the_default_model_drafts_for_itself_quantized(monkeypatch: pytest.MonkeyPatch):
    """"self-int4": the target's own weights in int4 groups propose; greedy tokens unchanged."""
    monkeypatch.setattr(speculation.Speculator, "fixed_rows", 1e9)
    common = dict(dtype="float32", quantization="none", kv_cache_memory=64 << 20)
    spec = LLM(**common, speculative_config=draft_config("self-int4"))
    convs = [[{"role": "user", "content": t}] for t in ("Tell me about the sea.", "Count from 1 to 10.")]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    expected = [o.outputs[0].token_ids for o in LLM(**common).chat(convs, params)]
    assert [o.outputs[0].token_ids for o in spec.chat(convs, params)] == expected
    stats = spec.engine.stats()
    assert stats.spec_method == "draft" and stats.spec_accepted_tokens > 10


def test_a_draft_on_the_native_decode_step(monkeypatch: pytest.MonkeyPatch):
    """The default model as served (bf16, the native decode step for the target's verification
    and the draft's passes, a short catch-up as rows of one step), its int4 self as the draft:
    nearly every proposal right, and the draft's passes timed for the speculator."""
    monkeypatch.setattr(speculation.Speculator, "fixed_rows", 1e9)
    spec = LLM(kv_cache_memory=64 << 20, speculative_config=draft_config("self-int4"))
    assert spec.engine.core.executor.worker.runner.drafter.runner.native_decode
    convs = [[{"role": "user", "content": "Count from one to forty in words."}]] * 2
    outs = spec.chat(convs, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids  # the same request twice in one batch
    stats = spec.engine.stats()
    assert stats.spec_drafts > 5 and stats.spec_acceptance_rate > 0.9
    speculator = spec.engine.scheduler.speculator
    assert speculator._passes[0] > 0 and speculator.pass_rows != speculation.DRAFT_PASS_ROWS


def test_bad_drafts_are_one_clear_error_at_start(models, tmp_path: Path):
    target = str(models["target"])
    # another vocabulary: the default model's tokenizer against the tiny one
    with pytest.raises(InvalidArgumentError, match="another vocabulary than the target"):
        LLM(target, dtype="float32", speculative_config=draft_config(_default_gguf()))
    with pytest.raises(InvalidArgumentError, match="draft model .*no-such-model.*no such file"):
        LLM(target, speculative_config=draft_config(tmp_path / "no-such-model"))
    broken = tmp_path / "broken"  # a config and a tokenizer, weights of the wrong shapes
    shutil.copytree(models["qwen2"], broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "model.safetensors")
    save_file({k: v[..., :3].contiguous() for k, v in weights.items()}, broken / "model.safetensors")
    with pytest.raises(InvalidArgumentError, match="the draft model .* did not load"):
        LLM(target, dtype="float32", speculative_config=draft_config(broken))


def _default_gguf() -> str:
    from surge.loader.hub import default_model_path

    return default_model_path()


def test_a_cached_prefix_keeps_the_drafts_kv(models, monkeypatch: pytest.MonkeyPatch):
    """A prompt seen before: the target's prefix cache gives its blocks back, and the draft's KV
    in them (computed for the same prefix) is used, not recomputed; a block the draft wrote
    since holds nothing for it."""
    monkeypatch.setattr(speculation.Speculator, "fixed_rows", 1e9)
    fed: list[int] = []
    run = DraftProposer._run

    def counting(self, step, depth):  # noqa: ANN001, ANN202
        fed.append(sum(len(r.token_ids) for r in step))
        return run(self, step, depth)

    monkeypatch.setattr(DraftProposer, "_run", counting)
    target = str(models["target"])
    spec = LLM(target, dtype="float32", kv_cache_memory=1 << 20, speculative_config=draft_config(target, k=2))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    text = PREAMBLE * 2
    first = spec.generate([text], params)[0]
    prompt = len(first.prompt_token_ids)
    assert prompt > 64 and fed[0] == prompt + 1  # all of it and the first token, the first time
    fed.clear()
    assert spec.generate([text], params)[0].outputs[0].token_ids == first.outputs[0].token_ids
    assert fed[0] <= 16  # the tail after the last full cached block (block size 16)
    # other prompts through the small cache, with and without speculation (logprobs): blocks
    # change hands; the draft must never take a block's KV for a prefix it no longer holds
    others = [f"{i} {PREAMBLE}"[: 40 + 7 * i] for i in range(24)]
    spec.generate(others, [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                          logprobs=1 if i % 3 == 0 else None) for i in range(24)])
    fed.clear()
    assert spec.generate([text], params)[0].outputs[0].token_ids == first.outputs[0].token_ids
    stats = spec.engine.stats()
    assert stats.spec_drafts > 30 and stats.spec_accepted_tokens == stats.spec_draft_tokens  # every proposal right
