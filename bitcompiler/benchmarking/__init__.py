"""Which target and which scheme for my model: ``bitcompiler.benchmark`` and ``bitc bench MODEL``.

>>> import torch, bitcompiler as bc
>>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
>>> rows = bc.benchmark(net, input_shape=(1, 64), schemes=["none", "binary"], peers=False, progress=False)
>>> [(r.target, r.scheme, r.exact) for r in rows]
[('cpu', 'none', True), ('cpu', 'binary', True)]

Modules: :mod:`.run` (the loop), :mod:`.measure` (one target x scheme), :mod:`.peers` (torch,
ONNX Runtime), :mod:`.data` (datasets and training), :mod:`.output` and :mod:`.plots` (table,
files, PNGs), :mod:`bitcompiler.rpc` (TVM RPC tracker), :mod:`.progress`.
"""

from bitcompiler.benchmarking.rows import Row
from bitcompiler.benchmarking.run import benchmark, load_model

__all__ = ["Row", "benchmark", "load_model"]
