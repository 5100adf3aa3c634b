"""How many threads the compiled CPU code runs on: ``bc.set_num_threads(n)`` or ``TVM_NUM_THREADS``.

TVM runs parallel kernels on a thread pool of its own, one per calling Python thread, started at
that thread's first parallel kernel with ``TVM_NUM_THREADS`` threads (the calling thread counts as
one). Unset, TVM takes ``OMP_NUM_THREADS``, else half of ``os.cpu_count()`` (it assumes two
hardware threads per core: one thread on a 2-core VM).
A started pool can run on fewer threads, never on more. So the count has to be chosen first:

* ``TVM_NUM_THREADS=n`` in the environment of the process, or
* ``bc.set_num_threads(n)`` before the first call of a compiled model (it sets the variable for the
  pools still to start and starts the calling thread's pool with ``n`` threads); later it can
  lower the count, and raises :class:`~bitcompiler.errors.ThreadsError` if asked for more than
  the calling thread's pool was started with.

TVM pins each worker thread of a pool to a core of its own unless ``TVM_BIND_THREADS=0``;
importing bitcompiler sets ``TVM_BIND_THREADS=0`` unless the variable is already set. A pinned
worker cannot move off a core that another process is using, and every parallel kernel then
waits for it: on the 2-core dev VM under load (load average 12) binary ResNet-18 at 2 threads took
15.7-28 ms pinned against 3.8-4.3 ms unpinned (1.0-1.5 ms at 1 thread). ``TVM_BIND_THREADS=1``
restores the pinning.

After its last task a TVM worker spins (``sched_yield``) ``TVM_THREAD_POOL_SPIN_COUNT`` times
before it sleeps: 300,000 by default, tens of milliseconds in which torch's threads get the core
only now and then. Importing bitcompiler sets it to 10,000 unless it is set: measured on the
2-core VM (load average 9-10, 2 TVM and 2 torch threads, one process), a torch sum over 64x4096
floats right after W1A1 4096² calls took 12 ms with 300,000 and 0.013 ms with 10,000, the W1A1
call the same within noise; binary ResNet-18 at 2 threads took 4.3 ms with either (0 or 1,000,
sleeping between kernels: 6.2-8.0 ms).

torch's own intra-op threads (``torch.set_num_threads``) are separate: ``cm(x)`` runs no torch
operation on them, but a program that runs torch between calls has both pools on the same cores.

>>> import bitcompiler as bc
>>> bc.set_num_threads(1)
>>> bc.get_num_threads()
1
"""

from __future__ import annotations

import os

from bitcompiler.errors import ThreadsError

ENV = "TVM_NUM_THREADS"
os.environ.setdefault("TVM_BIND_THREADS", "0")  # read when a pool starts (see above)
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "10000")  # read when the first pool starts
_BIG_CORES = 1  # TVM's affinity mode "big cores" (all cores on a machine of one kind)


def set_num_threads(n: int) -> None:
    """Run compiled CPU code on ``n`` threads from now on (see the module's docs for when)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ThreadsError(f"set_num_threads takes a whole number of threads >= 1, got {n!r}")
    os.environ[ENV] = str(n)
    import tvm

    # the calling thread's pool: started now with n threads, or told to use n of its threads
    tvm.get_global_func("runtime.config_threadpool")(_BIG_CORES, n)
    got = get_num_threads()
    if got != n:
        raise ThreadsError(
            f"this thread's TVM pool was started with {got} thread(s) and cannot grow to {n}: call "
            f"bc.set_num_threads({n}) before the first call of a compiled model, or start Python with "
            f"{ENV}={n}"
        )


def get_num_threads() -> int:
    """The threads a compiled CPU model called from this thread runs on (starts the pool if needed)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())
