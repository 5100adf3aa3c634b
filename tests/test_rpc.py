"""Device farms over TVM RPC: a tracker and two servers on 127.0.0.1 (TVM's own), torn down at
the end; tuning and benchmarking measure through them; a tracker that is down names its address."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler import rpc
from tests.conftest import assert_close

KEY = "bitc-test"
# per test, the fixture included: a hang in the RPC path fails here instead of at the suite's 900 s.
# At load 6-9 on 2 cores the file took 36 s (14 s of CPU); with the tracker and servers in fresh
# interpreters (each imports TVM and torch: 3 s of CPU) it took 68 s; beside two zoo test runs and
# a full test run on 2 cores, tuning through the farm passed 60 s once (a 180 s bound keeps the margin).
pytestmark = pytest.mark.timeout(180)


def _serve(start: Callable[[], Any], conn: Any) -> None:
    """In a forked child: start TVM's tracker or server state, report its port, serve until killed.
    Its own process group, so that teardown also ends the session processes a server forks."""
    os.setpgid(0, 0)
    state = start()
    conn.send(state.port)
    state.thread.join()


def _forked(start: Callable[[], Any]) -> tuple[Any, int]:
    """TVM's own tracker or RPC server (the state ``tvm.rpc.Tracker``/``Server`` build in a fresh
    Python worker), run in a fork of this process instead: TVM is imported already, so it starts in
    milliseconds rather than the seconds (and 3 s of CPU) a new interpreter takes to import TVM."""
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(start, there))  # not daemonic: a server forks its sessions
    proc.start()
    if not here.poll(30):
        proc.kill()
        pytest.fail("an RPC tracker or server did not bind a port in 30 s")
    return proc, here.recv()


@pytest.fixture(scope="module")
def farm():
    from tvm.rpc.server import PopenRPCServerState
    from tvm.rpc.tracker import PopenTrackerServerState

    procs = []
    try:
        tracker, port = _forked(partial(PopenTrackerServerState, "127.0.0.1", 9190, 9290, silent=True))
        procs.append(tracker)
        for i in range(2):  # port ranges apart: the two bind at the same time
            server = partial(
                PopenRPCServerState, "127.0.0.1", 9300 + 50 * i, 9350 + 50 * i,
                tracker_addr=("127.0.0.1", port), key=KEY, silent=True,
            )  # fmt: skip
            procs.append(_forked(server)[0])
        address = rpc.Address("127.0.0.1", port, KEY)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # both servers registered with the tracker
            queue = rpc.tracker(address).summary()["queue_info"].get(KEY, {})
            if queue.get("free", 0) >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the RPC servers did not register with the tracker in 30 s: {queue}")
        yield address
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.join(5)


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ).eval()


def test_tune_through_the_farm(farm, tmp_path):
    x = torch.randn(1, 128)
    cm = bc.tune(_net(), (x,), scheme="binary:act=binary", trials=2, db=tmp_path, runner=f"rpc://{farm}")
    assert cm.report().extra["tuned kernels"] >= 1
    assert (tmp_path / "database_tuning_record.json").read_text().strip()
    xs = torch.randn(8, 128)
    assert_close(cm(xs), cm.reference(xs))


def test_benchmark_through_the_farm(farm):
    rows = bc.benchmark(
        _net(), (1, 128), ["cpu"], ["binary:act=binary"], peers=False, rpc=str(farm), progress=False
    )
    (row,) = rows
    assert row.status == "ok" and row.exact is True, row.reason
    assert 0 < row.latency_ms <= row.latency_p90_ms


def test_a_tracker_that_is_down_names_its_address():
    with pytest.raises(bc.RemoteError, match=r"TVM RPC tracker at 127\.0\.0\.1:9 "):
        bc.tune(_net(), (torch.randn(1, 128),), trials=2, runner="rpc://127.0.0.1:9/farm")
    with pytest.raises(bc.RemoteError, match=r"127\.0\.0\.1:9"):
        bc.benchmark(_net(), (1, 128), rpc="127.0.0.1:9/farm", progress=False)
    with pytest.raises(bc.InputError, match="expected host:port/key"):
        rpc.parse("127.0.0.1/farm")


def test_unknown_key_is_named(farm):
    with pytest.raises(bc.RemoteError, match="no server with key 'nobody'"):
        rpc.check(rpc.Address(farm.host, farm.port, "nobody"))
