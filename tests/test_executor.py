"""lrqgraph.executor: per-layer solves on worker processes give the same output as in-process ones."""
import os
import time
from pathlib import Path

import numpy as np
import pytest

import builders
import lrqgraph
from lrqgraph import ExecutorConfig
from lrqgraph.config import AllocateConfig, OptimizeConfig
from lrqgraph.errors import LrqError
from lrqgraph.executor import AUTO_MIN_COST, Executor
from lrqgraph.io import save_model


def sleep_then_square(x: int, delay: float) -> int:  # a task: importable by the workers (tests/ is on sys.path)
    time.sleep(delay)
    return x * x


def test_results_come_back_in_task_order_whatever_order_they_finish_in():
    tasks = [(i, 0.3 if i % 3 == 0 else 0.0) for i in range(9)]  # the slow ones finish last
    with Executor(ExecutorConfig("process", workers=2)) as executor:
        assert list(executor.map(sleep_then_square, iter(tasks))) == [i * i for i in range(9)]
        assert executor.describe()["kind"] == "process" and executor.describe()["tasks"] == 9
        # the pool is reused by the next map of the same run
        assert list(executor.map(sleep_then_square, [(4, 0.0)] * 3)) == [16] * 3


def test_a_task_error_is_raised_in_the_caller_and_the_pool_still_works():
    with Executor(ExecutorConfig("process", workers=2)) as executor:
        with pytest.raises(ZeroDivisionError):
            list(executor.map(divmod, [(1, 1), (1, 0), (2, 1)]))
        assert list(executor.map(divmod, [(7, 2)] * 2)) == [(3, 1)] * 2


def test_a_dead_worker_is_a_clear_error():
    with Executor(ExecutorConfig("process", workers=2)) as executor:
        with pytest.raises(LrqError, match="worker process died"):
            list(executor.map(os._exit, [(3,), (3,)]))


def test_auto_starts_no_process_for_small_work():
    executor = Executor(ExecutorConfig("auto", workers=2))
    assert list(executor.map(divmod, [(9, 4)], costs=[AUTO_MIN_COST / 10])) == [(2, 1)]
    assert executor.describe()["kind"] == "local" and not executor._pool


def test_bad_executor_settings_are_refused():
    with pytest.raises(LrqError, match="--executor"):
        ExecutorConfig("threads")
    with pytest.raises(LrqError, match="--workers"):
        ExecutorConfig("process", workers=0)


def built_bytes(tmp_path, monkeypatch, goal: dict, executors: dict[str, ExecutorConfig]) -> dict[str, tuple]:
    """(the model file, the report's "executor" entry) each executor writes for the same
    calibrated MLP and goal; the entry must say what ran."""
    monkeypatch.setenv("LRQGRAPH_CACHE", str(tmp_path / "cache"))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
    outputs = {}
    for name, executor in executors.items():
        result = lrqgraph.run(builders.mlp_model(), OptimizeConfig(calib=str(calib), allocate=AllocateConfig(**goal),
                                                                   executor=executor))
        entry = result.report["executor"]
        assert entry["kind"] == executor.kind and entry["tasks"] > 0
        if executor.workers:
            assert entry["workers"] == (executor.workers if executor.kind != "local" else 1)
        save_model(result.model, tmp_path / f"{name}.onnx")
        outputs[name] = (tmp_path / f"{name}.onnx").read_bytes(), entry
    return outputs


@pytest.mark.parametrize("goal", [{}, {"target_bpw": 4.0}], ids=["factorize", "allocate"])
def test_process_and_local_executors_write_byte_identical_models(tmp_path, monkeypatch, goal):
    out = built_bytes(tmp_path, monkeypatch, goal, {k: ExecutorConfig(k, workers=2) for k in ("local", "process")})
    assert out["local"][0] == out["process"][0]


def need_ray():
    """The ray module. CI installs the ray extra (the test extra holds it), so there a missing ray
    fails instead of skipping."""
    if os.environ.get("LRQGRAPH_CI") == "1":
        import ray
        return ray
    return pytest.importorskip("ray", reason="the ray extra (pip install 'lrqgraph[ray]') is not installed")


@pytest.fixture
def ray_cluster():
    """A two-node Ray cluster on this machine (one CPU each), shut down after the test."""
    ray = need_ray()
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_ray_on_a_two_node_cluster_writes_the_local_bytes(tmp_path, monkeypatch, ray_cluster):
    out = built_bytes(tmp_path, monkeypatch, {"target_bpw": 4.0},
                      {"local": ExecutorConfig("local"), "ray": ExecutorConfig("ray", address=ray_cluster.address)})
    assert out["local"][0] == out["ray"][0]
    assert out["ray"][1]["workers"] == 2  # the two nodes' CPUs


def test_ray_on_a_two_node_cluster_writes_the_local_bytes_of_a_streamed_calibrated_decoder(tmp_path, monkeypatch,
                                                                                            ray_cluster):
    """Weights by file reference (WeightFile) and H from files (StoredHessian) on both nodes."""
    from test_streaming import TINY, calibrated_bytes
    from lrqgraph.testing.llama_shaped import write_llama_shaped
    monkeypatch.setenv("LRQGRAPH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "decoder").mkdir()
    model = write_llama_shaped(tmp_path / "decoder" / "model.onnx", TINY)
    written = calibrated_bytes(model, tmp_path, {"local": (0, ExecutorConfig("local")),
                                                 "ray": (0, ExecutorConfig("ray", address=ray_cluster.address))})
    (local, _), (ray, report) = written["local"], written["ray"]
    assert report["executor"]["kind"] == "ray" and report["executor"]["workers"] == 2
    assert local.keys() == ray.keys() and all(np.array_equal(local[k], ray[k]) for k in local)


def test_ray_task_errors_come_back_as_themselves(ray_cluster):
    with Executor(ExecutorConfig("ray", address=ray_cluster.address)) as executor:
        with pytest.raises(ZeroDivisionError):
            list(executor.map(divmod, [(1, 1), (1, 0)]))
        assert list(executor.map(divmod, [(7, 2)] * 3)) == [(3, 1)] * 3


def test_ray_without_an_address_starts_a_local_cluster_and_stops_it():
    ray = need_ray()
    with Executor(ExecutorConfig("ray", workers=2)) as executor:
        # a task of this test module: the workers get the caller's import path, as worker processes do
        assert list(executor.map(sleep_then_square, [(i, 0.0) for i in range(5)])) == [i * i for i in range(5)]
        assert ray.is_initialized() and executor.describe()["kind"] == "ray"
    assert not ray.is_initialized()


def test_process_with_one_worker_still_solves_apart_from_this_process():
    with Executor(ExecutorConfig("process", workers=1)) as executor:
        pids = list(executor.map(os.getpid, [()] * 3))
    assert len(set(pids)) == 1 and pids[0] != os.getpid() and executor.describe()["workers"] == 1


def slow_or_quick(x: int, flag: str) -> tuple[int, bool]:
    """Task 0 waits (up to 60 s) for task 6 to raise ``flag``; the others return at once, task 6
    raising it. Task 0 sees the flag only if task 6 started while it ran: an order of events, not
    of clock readings."""
    if x == 6:
        Path(flag).touch()
    if x != 0:
        return x, True
    deadline = time.monotonic() + 60
    while not Path(flag).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return x, Path(flag).exists()


def test_quick_tasks_behind_a_slow_one_keep_the_other_worker_busy_within_a_cost_window(tmp_path):
    # one slow task (cost 8) at the head, then quick ones (cost 1): by count, at most 4 tasks could be
    # ahead of the caller, so the 7th could not start before the slow one is done; by cost it can
    flag = str(tmp_path / "task6-started")
    tasks = [(i, flag) for i in range(9)]
    costs = [8.0] + [1.0] * 8
    with Executor(ExecutorConfig("process", workers=2)) as executor:
        got = list(executor.map(slow_or_quick, tasks, costs=costs))
        assert [x for x, _ in got] == list(range(9))
        assert got[0][1], "task 6 did not start while task 0 ran"
        # the window still bounds the work ahead: 2 workers x the largest cost (16 here)
        four = (16.0, [0, 8, 16, 24, 32])  # four tasks of cost 8
        assert executor._room(four, 1, 0) and not executor._room(four, 2, 0) and executor._room(four, 2, 1)
