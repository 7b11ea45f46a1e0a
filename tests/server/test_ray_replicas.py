"""`surge serve --distributed-executor-backend ray`: replicas as Ray actors on a two-node Ray
cluster on this machine. They land on different nodes, answer as one engine does, and a node
removed under load is survived; bad addresses and unplaceable sizes are refused in bounded time."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from surge import LLM, SamplingParams
from tests.server.conftest import MODEL_NAME, launch
from tests.server.test_data_parallel import ARGS, client, prompt, replica_infos, replica_metric, streams_through

ray = pytest.importorskip("ray", reason="Ray is a test extra (pip install -e '.[test]')")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, 2 CPUs each, each a raylet of its own on this machine. The
    second listens on another loopback address, so the server (a Ray driver, which attaches to the
    raylet of its own address) is the head's: removing the second is losing a machine of replicas."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    second = c.add_node(num_cpus=2, node_ip_address="127.0.0.2")
    c.wait_for_nodes()
    yield c, second
    c.shutdown()


def test_replicas_on_two_nodes_equal_one_engine_and_survive_a_lost_node(cluster, default_gguf_path, tmp_path):
    c, second = cluster
    srv = launch(tmp_path, "-dp", "2", "--threads", "1", "--distributed-executor-backend", "ray", "--ray-address",
                 c.address, *ARGS)
    rows = replica_infos(srv.url)
    assert [r["state"] for r in rows] == ["up", "up"]
    nodes = {r["node"] for r in rows}
    assert len(nodes) == 2 and second.node_id in nodes, rows
    assert all(len(r["node"]) == 56 for r in rows)  # Ray node ids
    oc = client(srv.url)
    prompts = [prompt(i) for i in range(24)]
    with cf.ThreadPoolExecutor(12) as pool:
        served = list(pool.map(lambda p: oc.completions.create(model=MODEL_NAME, prompt=p, max_tokens=12,
                                                                temperature=0).choices[0].text, prompts))
    llm = LLM(default_gguf_path, dtype="float32", quantization="none", kv_cache_memory=96 << 20)
    try:
        expected = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]
    finally:
        llm.shutdown()
    assert served == expected
    assert all(replica_metric(srv.url, "surge_replica_requests_total", r) > 0 for r in (0, 1))

    # the second node goes away while 16 clients stream
    results = streams_through(oc, 16, lambda: c.remove_node(second, allow_graceful=False))
    assert len(results) == 16
    assert all(r == "ok" or r.startswith("error") for r in results.values()), results
    assert sum(r == "ok" for r in results.values()) >= 8, results  # the surviving node's, and the re-sent
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = replica_infos(srv.url)
        if [r["state"] for r in rows] == ["up", "up"]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the lost replica did not come back within 60 s: {rows}")
    assert all(r["node"] != second.node_id for r in rows)
    with cf.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda i: oc.completions.create(model=MODEL_NAME, prompt=prompt(i), max_tokens=4)
                              .choices[0].text, range(16)))
    assert len(texts) == 16
    assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
    srv.stop()


def test_bad_ray_settings_are_refused_in_bounded_time(cluster, tmp_path):
    c, _ = cluster
    for args, message in ((("--ray-address", "127.0.0.1:1"), "no Ray cluster answers there"),
                          (("--ray-address", c.address, "-dp", "3", "--threads", "2"),
                           "cannot place 3 replicas of 2 CPU each"),
                          (("--ray-address", c.address, "--distributed-executor-backend", "mp"),
                           "ray_address needs distributed_executor_backend ray")):
        start = time.monotonic()
        srv = launch(tmp_path, "--distributed-executor-backend", "ray", *args, *ARGS, wait=False)
        code = srv.proc.wait(120)
        assert time.monotonic() - start < 90
        assert message in srv.log(), srv.log()[-2000:]
        assert code != 0


def test_engines_in_one_process_share_its_ray_connection(cluster, default_gguf_path):
    """Two engines on Ray in one process (two models of a repository, or a version and its
    reload) share the process's one Ray connection; it ends with the last of them."""
    import asyncio

    from surge.engine.args import EngineArgs
    from surge.engine.data_parallel import DataParallelEngine
    from surge.errors import InvalidArgumentError

    c, _ = cluster
    common = dict(model=default_gguf_path, dtype="float32", quantization="none", kv_cache_memory=32 << 20,
                  warmup=False, threads=1, distributed_executor_backend="ray")
    config = EngineArgs(**common, ray_address=c.address).create_engine_config()

    async def complete(engine: DataParallelEngine) -> str:
        async for out in engine.generate("The capital of France is", SamplingParams(max_tokens=6, temperature=0)):
            last = out
        return last.outputs[0].text

    first = DataParallelEngine(config)
    second = None
    try:
        second = DataParallelEngine(config)
        with pytest.raises(InvalidArgumentError, match="joined to the Ray cluster at .* already"):
            DataParallelEngine(EngineArgs(**common, ray_address="auto").create_engine_config())
        text = asyncio.run(complete(first))
        assert text and asyncio.run(complete(second)) == text
        first.shutdown()
        assert ray.is_initialized()  # the second still holds it
        assert asyncio.run(complete(second)) == text
    finally:
        first.shutdown()
        if second is not None:
            second.shutdown()
    assert not ray.is_initialized()
