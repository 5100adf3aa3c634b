"""Device farms over TVM RPC: an address ``host:port/key`` names a TVM RPC tracker and the key its
servers registered with (``python -m tvm.exec.rpc_tracker``, ``python -m tvm.exec.rpc_server
--tracker host:port --key KEY``). ``bitcompiler.tune(..., runner="rpc://host:port/key")`` measures
the tuning candidates on those machines (MetaSchedule's ``RPCRunner``) and ``bitc bench --rpc
host:port/key`` runs and times the cpu rows there (:class:`RemoteCPU`).

    >>> parse("rpc://127.0.0.1:9190/farm")
    Address(host='127.0.0.1', port=9190, key='farm')
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from bitcompiler.errors import InputError, RemoteError, first_line

SESSION_TIMEOUT = 120  # seconds one RPC session may last
CONNECT_TIMEOUT = 5  # seconds to wait for the tracker to accept a connection


class Address(NamedTuple):
    host: str
    port: int
    key: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.key}"


def parse(address: str) -> Address:
    """``rpc://host:port/key`` or ``host:port/key``."""
    text = address.removeprefix("rpc://")
    hostport, _, key = text.partition("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not key:
        raise InputError(f"RPC address {address!r}: expected host:port/key (e.g. rpc://127.0.0.1:9190/farm)")
    return Address(host, int(port), key)


def tracker(address: Address) -> Any:
    """The tracker at ``address``; :class:`RemoteError` naming the address when it cannot be reached."""
    import socket

    from tvm import rpc

    try:  # TVM's own connect retries for a minute; a tracker that is down should fail at once
        socket.create_connection((address.host, address.port), timeout=CONNECT_TIMEOUT).close()
        return rpc.connect_tracker(address.host, address.port)
    except Exception as e:  # noqa: BLE001 - OSError here, a bare RuntimeError/TVMError from TVM
        raise RemoteError(
            f"cannot reach the TVM RPC tracker at {address.host}:{address.port} ({first_line(e)}); start one "
            "with `python -m tvm.exec.rpc_tracker --host HOST --port PORT` or fix the address"
        ) from None


def check(address: Address) -> None:
    """Raise :class:`RemoteError` unless the tracker is up and has a server registered with the key."""
    queues = tracker(address).summary().get("queue_info", {})
    if address.key not in queues:
        raise RemoteError(
            f"the TVM RPC tracker at {address.host}:{address.port} has no server with key {address.key!r} "
            f"(keys: {', '.join(sorted(queues)) or 'none'}); start one with `python -m tvm.exec.rpc_server "
            f"--tracker {address.host}:{address.port} --key {address.key}`"
        )


def session(address: Address, timeout: int = SESSION_TIMEOUT) -> Any:
    """An RPC session with a free server of ``address.key``; :class:`RemoteError` naming the
    address when the tracker cannot be reached or has no such server."""
    tracker_session = tracker(address)
    try:
        return tracker_session.request(address.key, session_timeout=timeout, max_retry=2)
    except Exception as e:  # noqa: BLE001
        raise RemoteError(
            f"the TVM RPC tracker at {address.host}:{address.port} gave no server for key {address.key!r} "
            f"({first_line(e)}); start one with `python -m tvm.exec.rpc_server --tracker "
            f"{address.host}:{address.port} --key {address.key}`"
        ) from None


def rpc_config(address: Address) -> Any:
    from tvm.s_tir.meta_schedule.runner import RPCConfig

    return RPCConfig(address.host, address.port, address.key, session_timeout_sec=SESSION_TIMEOUT)


class RemoteModel:
    """A compiled cpu model's library on a remote machine: ``fn(x)`` runs it there, ``time()``
    times it there (TVM's ``time_evaluator``)."""

    def __init__(self, sess: Any, runner: Any, example: torch.Tensor) -> None:
        import tvm
        from tvm import relax

        with tempfile.TemporaryDirectory(prefix="bitc-rpc-") as d:
            # the library the runner was loaded from (the compile cache), or one written now
            path = runner.library or Path(d) / "model.so"
            if runner.library is None:
                runner.executable.export_library(str(path))
            sess.upload(str(path), "model.so")
        self.sess, self.dev = sess, sess.cpu()
        self.vm = relax.VirtualMachine(sess.load_module("model.so"), self.dev)
        self.example = example
        self._tvm = tvm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vm["main"](self._tvm.runtime.tensor(x.contiguous().numpy(), self.dev))
        return torch.from_numpy((out[0] if not hasattr(out, "numpy") else out).numpy())

    def time(self, repeat: int = 10) -> list[float]:
        arg = self._tvm.runtime.tensor(self.example.contiguous().numpy(), self.dev)
        f = self.vm.time_evaluator("main", self.dev, number=1, repeat=repeat, min_repeat_ms=20)
        return [float(s) for s in f(arg).results]


class RemoteCPU:
    """cpu rows of a benchmark measured on a server of an RPC tracker."""

    def __init__(self, address: str) -> None:
        self.address = parse(address)
        check(self.address)
        self.sess = session(self.address)

    def runner(self, cm: Any) -> RemoteModel:
        if getattr(cm._runner, "executable", None) is None:
            raise InputError(f"--rpc measures cpu models only; {cm.target} runs elsewhere")
        example = torch.randn(1, *cm.inputs[0].shape)
        return RemoteModel(self.sess, cm._runner, example)

    def time(self, fn: Any) -> list[float]:
        return fn.time()
