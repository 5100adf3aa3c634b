"""bc.set_num_threads / TVM_NUM_THREADS: the compiled CPU code runs on the threads asked for.

Each case runs in a fresh Python: TVM starts a thread's pool once, so the order of the calls is
what is tested."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import bitcompiler as bc

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
import os, torch, bitcompiler as bc

def os_threads():
    return len(os.listdir("/proc/self/task"))

def pinned():
    # threads of this process allowed on fewer CPUs than the process
    n = len(os.sched_getaffinity(0))
    return [t for t in os.listdir("/proc/self/task") if len(os.sched_getaffinity(int(t))) < n]

net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).eval()
cm = bc.compile(net, (torch.randn(1, 256),), scheme="binary:act=binary")
before = os_threads()
{body}
x = torch.randn(8, 256)
assert torch.equal(cm(x), cm.reference(x))
print("ok", bc.get_num_threads())
"""


# this process imported bitcompiler, which set some of them: the fresh one starts without
POOL_VARIABLES = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "TVM_BIND_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")


def run(body: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in POOL_VARIABLES}
    return subprocess.run(
        [sys.executable, "-c", PROGRAM.format(body=body)],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_set_num_threads_before_the_first_call_starts_that_many():
    """Two threads asked for before the first call: the pool starts one worker beside the calling
    thread, the model runs on both (bit-exact), and a started pool can go down to one and back."""
    out = run(
        "bc.set_num_threads(2)\n"
        "assert bc.get_num_threads() == 2 and os.environ['TVM_NUM_THREADS'] == '2'\n"
        "assert os_threads() == before + 1, (before, os_threads())\n"
        "cm(torch.randn(3, 256))\n"
        "assert os.environ['TVM_BIND_THREADS'] == '0' and pinned() == [], pinned()\n"
        "assert os.environ['TVM_THREAD_POOL_SPIN_COUNT'] == '10000'\n"
        "bc.set_num_threads(1)\n"
        "assert bc.get_num_threads() == 1\n"
        "cm(torch.randn(3, 256))\n"
        "bc.set_num_threads(2)\n"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["ok", "2"]


def test_the_users_tvm_pool_variables_are_kept():
    """The defaults set on import (TVM_BIND_THREADS=0, TVM_THREAD_POOL_SPIN_COUNT=10000) are what
    the first test checks; a user's own values are kept (TVM then pins its worker to one core)."""
    out = run(
        "bc.set_num_threads(2)\nassert len(pinned()) == 1, pinned()\n"
        "assert os.environ['TVM_THREAD_POOL_SPIN_COUNT'] == '300000'\n",
        TVM_BIND_THREADS="1",
        TVM_THREAD_POOL_SPIN_COUNT="300000",
    )
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_started_pool_cannot_grow():
    """A pool started with TVM_NUM_THREADS=1: asking for 2 names when to set it."""
    out = run(
        "cm(torch.randn(64, 256))\n"
        "assert bc.get_num_threads() == 1  # the pool is started (by a parallel kernel, or by this)\n"
        "try:\n"
        "    bc.set_num_threads(2)\n"
        "except bc.ThreadsError as e:\n"
        "    print('refused:', e)\n",
        TVM_NUM_THREADS="1",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused: this thread's TVM pool was started with 1 thread(s) and cannot grow to 2" in out.stdout
    assert "bc.set_num_threads(2) before the first call" in out.stdout
    assert out.stdout.split()[-2:] == ["ok", "1"]


@pytest.mark.parametrize("bad", [0, -1, 2.0, "2", True])
def test_set_num_threads_refuses_what_is_not_a_count(bad):
    with pytest.raises(bc.ThreadsError, match="whole number of threads >= 1"):
        bc.set_num_threads(bad)
