"""ModelRepository in process, on tiny real models: scanning, versions, switching, rollback,
failed loads, memory budget, settings files, routing and draining."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import time
import weakref
from pathlib import Path

import pytest
import torch

from surge.engine.args import EngineArgs
from surge.entrypoints.llm import LLM
from surge.errors import InvalidArgumentError
from surge.server.budget import MemoryBudget, MemoryBudgetError, MiB
from surge.sampling_params import SamplingParams
from surge.server.repository import (
    ModelRepository,
    ModelRequiredError,
    ModelUnavailableError,
    RepositoryConflictError,
)
from surge.worker.kv_cache import bytes_per_block
from tests.server.conftest import put

ARGS = EngineArgs(dtype="float32", quantization="none", kv_cache_memory=8 * MiB, max_num_seqs=8)


def factory(path, args, reserve):
    return LLM.from_engine_args(dataclasses.replace(args, model=path), reserve).engine


def greedy(dep, prompt="Hello, world.") -> list[int]:
    """What a deployment generates, run on its engine directly (the repository is not serving)."""
    engine = dep.engine
    rid = engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid and o.finished:
                out = o
    return out.outputs[0].token_ids


def offline(path: Path, prompt="Hello, world.") -> list[int]:
    llm = LLM(str(path), dtype="float32", quantization="none", kv_cache_memory=8 * MiB)
    return llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].token_ids


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def states(repo: ModelRepository, name: str) -> dict[str, str]:
    return {row["version"]: row["state"] for row in repo.index() if row["name"] == name}


@pytest.fixture
def make_repo(tmp_path):
    made: list[ModelRepository] = []

    def make(budget: int = 1 << 34, args: EngineArgs = ARGS) -> tuple[ModelRepository, Path]:
        root = tmp_path / "repo"
        root.mkdir(exist_ok=True)
        repo = ModelRepository.from_directory(str(root), factory, args, MemoryBudget(budget))
        made.append(repo)
        return repo, root

    yield make
    for repo in made:
        repo.shutdown()


def test_newest_version_serves_and_routes(make_repo, tiny_versions):
    repo, root = make_repo()
    put(root, "tiny", 1, tiny_versions[1])
    put(root, "tiny", 2, tiny_versions[2])
    put(root, "other", 1, tiny_versions[3])
    (root / "not-a-model.txt").write_text("ignored")
    (root / "tiny" / "latest").mkdir()  # not a number: ignored
    repo.start()
    assert states(repo, "tiny") == {"1": "UNAVAILABLE", "2": "READY"}
    dep, name = repo.acquire("tiny")
    assert (dep.version, name) == ("2", "tiny") and dep.in_flight == 1
    repo.release(dep)
    assert greedy(dep) == offline(tiny_versions[2])
    with pytest.raises(ModelRequiredError, match="other, tiny"):
        repo.acquire(None)
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        repo.acquire("nope")
    with pytest.raises(ModelUnavailableError, match="version 1 of model `tiny` is not being served"):
        repo.acquire("tiny:1")
    dep, name = repo.acquire("tiny:2")
    assert name == "tiny:2"
    repo.release(dep)


def test_switch_rollback_and_drain(make_repo, tiny_versions):
    repo, root = make_repo()
    put(root, "tiny", 1, tiny_versions[1])
    repo.start()
    v1, _ = repo.acquire("tiny")  # a request in flight on version 1 across the switch
    put(root, "tiny", 2, tiny_versions[2])
    repo.sync()  # seen once: not loaded until it has stopped changing
    assert states(repo, "tiny") == {"1": "READY", "2": "UNAVAILABLE"}
    repo.sync()
    assert states(repo, "tiny") == {"1": "UNLOADING", "2": "READY"}
    v2, _ = repo.acquire("tiny")
    assert v2.version == "2" and greedy(v2) == offline(tiny_versions[2])
    repo.release(v2)
    assert greedy(v1) == offline(tiny_versions[1])  # the old version still serves its request
    time.sleep(0.2)
    assert states(repo, "tiny")["1"] == "UNLOADING"
    repo.release(v1)
    engine = weakref.ref(v1.engine)
    del v1
    wait_for(lambda: states(repo, "tiny")["1"] == "UNAVAILABLE")
    # nothing keeps an unloaded version's weights and KV cache alive
    wait_for(lambda: gc.collect() >= 0 and engine() is None)
    assert set(repo.budget.holdings()) == {"tiny:2"}  # version 1's memory is returned
    repo.sync()
    assert states(repo, "tiny") == {"1": "UNAVAILABLE", "2": "READY"}  # no reload of anything

    repo.rollback("tiny")
    assert states(repo, "tiny") == {"1": "READY", "2": "UNLOADING"}
    dep, _ = repo.acquire("tiny")
    assert dep.version == "1"
    repo.release(dep)
    wait_for(lambda: states(repo, "tiny")["2"] == "UNAVAILABLE")
    repo.sync()
    repo.sync()
    assert states(repo, "tiny")["2"] == "UNAVAILABLE"  # polling does not undo a rollback
    with pytest.raises(RepositoryConflictError, match="no earlier version"):
        repo.rollback("tiny")

    put(root, "tiny", 3, tiny_versions[3])  # a newer version still switches in
    repo.sync()
    repo.sync()
    assert repo.acquire("tiny")[0].version == "3"


def test_failed_version_leaves_serving_untouched(make_repo, tiny_versions):
    repo, root = make_repo()
    put(root, "tiny", 1, tiny_versions[1])
    repo.start()
    bad = put(root, "tiny", 2, tiny_versions[2])
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    repo.sync()
    repo.sync()
    rows = {r["version"]: r for r in repo.index()}
    assert rows["2"]["state"] == "FAILED" and "model.safetensors" in rows["2"]["reason"]
    assert rows["1"]["state"] == "READY" and rows["1"]["serving"]
    dep, _ = repo.acquire("tiny")
    assert dep.version == "1"
    repo.release(dep)
    repo.sync()  # the same broken files are not retried at every poll
    assert states(repo, "tiny")["2"] == "FAILED"
    shutil.rmtree(bad)
    put(root, "tiny", 2, tiny_versions[2])  # fixed: loads at the next polls
    repo.sync()
    repo.sync()
    assert states(repo, "tiny")["2"] == "READY"


def test_memory_budget_refuses_a_load_that_does_not_fit(make_repo, tiny_versions):
    repo, root = make_repo(budget=12 * MiB)  # one tiny model with its 8 MiB cache fits, two do not
    put(root, "tiny", 1, tiny_versions[1])
    repo.start()
    assert states(repo, "tiny") == {"1": "READY"}
    put(root, "tiny", 2, tiny_versions[2])
    with pytest.raises(MemoryBudgetError, match=r"tiny:2: it needs about \d+ MiB .*budget is 12 MiB.*tiny:1"):
        repo.load("tiny", "2")
    rows = {r["version"]: r for r in repo.index()}
    assert rows["2"]["state"] == "FAILED" and "--memory-budget" in rows["2"]["reason"]
    assert rows["1"]["serving"] and rows["1"]["state"] == "READY"
    assert set(repo.budget.holdings()) == {"tiny:1"}
    # the measured footprint of version 1: its KV cache and its weights
    assert 8 * MiB < repo.budget.holdings()["tiny:1"] < 12 * MiB


def test_settings_files(make_repo, tiny_versions):
    repo, root = make_repo()
    put(root, "tiny", 1, tiny_versions[1])
    (root / "tiny" / "surge.toml").write_text('max_num_seqs = 4\nkv_cache_memory = "4MiB"\n')
    (root / "tiny" / "1" / "surge.toml").write_text("block_size = 8\nwarmup = false\n")
    repo.start()
    dep, _ = repo.acquire("tiny")
    repo.release(dep)
    engine = dep.engine
    assert engine.scheduler.max_num_seqs == 4 and engine.block_size == 8
    per_block = bytes_per_block(engine.model_config, 8, getattr(torch, engine.model_info.dtype))
    assert engine.scheduler.pool.num_blocks == 4 * MiB // per_block

    put(root, "tiny", 2, tiny_versions[2])
    (root / "tiny" / "2" / "surge.toml").write_text("max_num_sequences = 4\n")
    with pytest.raises(InvalidArgumentError, match=r"tiny/2/surge.toml: unknown setting 'max_num_sequences'"):
        repo.load("tiny", "2")
    (root / "tiny" / "2" / "surge.toml").write_text("max_num_seqs = 'many'\n")
    with pytest.raises(InvalidArgumentError, match="max_num_seqs must be a positive integer"):
        repo.load("tiny", "2")
    (root / "tiny" / "2" / "surge.toml").write_text("max_num_seqs = \n")
    with pytest.raises(InvalidArgumentError, match="not valid TOML"):
        repo.load("tiny", "2")
    assert states(repo, "tiny") == {"1": "READY", "2": "FAILED"}


def test_operations_errors(make_repo, tiny_versions):
    repo, root = make_repo()
    put(root, "tiny", 1, tiny_versions[1])
    repo.start()
    with pytest.raises(ModelUnavailableError, match="no model 'ghost'"):
        repo.load("ghost")
    with pytest.raises(ModelUnavailableError, match="has no version '9'"):
        repo.load("tiny", "9")
    entry = repo.models["tiny"]
    with entry.op_lock:  # another operation is running
        with pytest.raises(RepositoryConflictError, match="being loaded or unloaded"):
            repo.unload("tiny")
    repo.unload("tiny")
    assert states(repo, "tiny") == {"1": "UNAVAILABLE"}
    with pytest.raises(ModelUnavailableError, match="not being served"):
        repo.acquire("tiny")
    repo.load("tiny")
    assert states(repo, "tiny") == {"1": "READY"}


def test_removed_model_directory_is_unloaded(make_repo, tiny_versions):
    repo, root = make_repo()
    put(root, "tiny", 1, tiny_versions[1])
    put(root, "other", 1, tiny_versions[2])
    repo.start()
    shutil.rmtree(root / "other")
    repo.sync()
    assert [r["name"] for r in repo.index()] == ["tiny"]
    assert set(repo.budget.holdings()) == {"tiny:1"}


def test_warmup_runs_every_bucket_and_leaves_a_clean_engine(tiny_versions):
    from surge.engine.llm_engine import decode_buckets

    assert decode_buckets(1) == [1] and decode_buckets(8) == [1, 2, 4, 8] and decode_buckets(12) == [1, 2, 4, 8, 12]
    llm = LLM(str(tiny_versions[1]), dtype="float32", quantization="none", kv_cache_memory=8 * MiB, max_num_seqs=12)
    before = offline(tiny_versions[1])
    report = llm.engine.warm_up()
    assert report.decode_batch_sizes == [1, 2, 4, 8, 12] and report.prefill_lengths == [4, 16, 128, 512]
    stats = llm.engine.stats()
    assert (stats.generation_tokens, stats.prompt_tokens, stats.prefix_cache_queries) == (0, 0, 0)
    assert llm.engine.is_idle_clean()
    out = llm.generate("Hello, world.", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == before
    assert out[0].num_cached_tokens == 0  # nothing of the warm-up is left in the prefix cache
    assert out[0].first_token_time is not None  # the engine's clock, for TTFT of non-streaming requests
