"""The Worker on its own: the set-up an executor runs, then steps given as plain SchedulerOutputs."""

from __future__ import annotations

import pickle

import pytest

from surge.core.scheduler_output import NewRequestData, ScheduledRequest, SchedulerOutput
from surge.engine.args import EngineArgs
from surge.sampling_params import SamplingParams
from surge.worker.worker import Worker
from tests.conftest import build_tiny_model


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny_tokenizer_dir):
    path = build_tiny_model("llama", tmp_path_factory.mktemp("worker") / "m", tiny_tokenizer_dir)
    config = EngineArgs(model=str(path), dtype="float32", kv_cache_memory=1 << 20,
                        block_size=16).create_engine_config()
    w = Worker(config)
    w.init_device()
    yield w
    w.shutdown()


def test_set_up_reports_estimate_model_and_footprint(worker):
    estimate = worker.estimate_memory()
    assert estimate.kv_cache_bytes == 1 << 20 and estimate.weight_bytes > 0
    info = worker.load_model()
    assert info.architecture == "LlamaForCausalLM" and info.dtype == "float32" and info.quantization == "none"
    blocks = worker.determine_num_blocks()
    # 2 layers x K and V x 16 tokens x 2 heads x 16 floats x 4 bytes = 8 KiB a block
    assert blocks == (1 << 20) // (2 * 2 * 16 * 2 * 16 * 4)
    info = worker.initialize_cache(blocks, frozenset({2}))
    assert info.kv_cache_bytes == 1 << 20 and 0 < info.weight_bytes <= estimate.weight_bytes
    assert pickle.loads(pickle.dumps(info)) == info


def test_steps_from_plain_data(worker):
    """A prompt prefilled in two chunks, then a decode step: the sampled tokens are the greedy ones,
    and what goes in and out survives pickling (what the mp executor ships)."""
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1)
    prompt = list(range(10, 30))
    first = SchedulerOutput([ScheduledRequest("a", prompt[:12], 0, [1, 2], False, NewRequestData(prompt, params))])
    second = SchedulerOutput([ScheduledRequest("a", prompt[12:], 12, [1, 2], True)])
    assert not worker.execute_model(pickle.loads(pickle.dumps(first))).sampled
    out = pickle.loads(pickle.dumps(worker.execute_model(second)))
    token = out.sampled["a"]
    assert out.logprobs["a"].token_id == token and out.logprobs["a"].rank == 1
    third = SchedulerOutput([ScheduledRequest("a", [token], 20, [1, 2], True)], finished_request_ids=[])
    assert "a" in worker.execute_model(third).sampled
    timings = worker.timings()
    assert timings.forward > 0 and timings.prepare > 0
    worker.finish_warmup()
    assert worker.timings().forward == 0
    worker.execute_model(SchedulerOutput(finished_request_ids=["a"]))
    assert "a" not in worker.runner.requests
