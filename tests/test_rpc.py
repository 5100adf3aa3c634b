"""Device farms over TVM RPC: a tracker and two servers on 127.0.0.1 (TVM's own), torn down at
the end; tuning and benchmarking measure through them; a tracker that is down names its address."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler import rpc
from tests.conftest import assert_close

KEY = "bitc-test"
pytestmark = pytest.mark.timeout(300)  # measured: 142 s for the file at a load of 12 on 2 cores


@pytest.fixture(scope="module")
def farm():
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker = Tracker("127.0.0.1", port=9190, port_end=9290, silent=True)
    servers = []
    try:

        def server(i: int) -> Server:  # port ranges apart: the two bind at the same time
            ports = 9300 + 50 * i, 9350 + 50 * i
            return Server("127.0.0.1", *ports, key=KEY, tracker_addr=("127.0.0.1", tracker.port), silent=True)

        with ThreadPoolExecutor(2) as pool:  # each starts a Python worker: in parallel
            servers = list(pool.map(server, range(2)))
        address = rpc.Address("127.0.0.1", tracker.port, KEY)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # both servers registered with the tracker
            queue = rpc.tracker(address).summary()["queue_info"].get(KEY, {})
            if queue.get("free", 0) >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the RPC servers did not register with the tracker in 30 s: {queue}")
        yield address
    finally:
        for s in servers:
            s.terminate()
        tracker.terminate()


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
