"""The 2-process runner of :mod:`finitetune.testing`: real process groups on CPU (gloo).

Distributed tests are real (OLMo-core's ``testing/distributed.py`` style): spawned processes,
an initialised group, a hard timeout, and no child left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT``)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _distributed_worker(fn: Callable[..., Any], args: tuple, kwargs: dict, rank: int,
                        world_size: int, port: int, backend: str, threads: int,
                        timeout: float, queue: Any) -> None:
    """Child process: set the launcher's env, join the group, run ``fn``, report, tear down."""
    import datetime
    import os
    import pickle
    import traceback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    try:
        torch.distributed.init_process_group(
            backend, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout))  # a collective that hangs times out too
        result = fn(*args, **kwargs)
        # plain pickle (tensors by value): torch's shared-memory pickling would need this
        # process alive after it exits
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn: Callable[..., Any], *args: Any, world_size: int = 2,
                    timeout: float = 120.0, backend: str = "gloo", threads: int = 1,
                    **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` in ``world_size`` fresh processes joined in a process group.

    Each process gets what ``torchrun`` would give it (``MASTER_ADDR=127.0.0.1``, a free
    ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), ``threads`` CPU threads, and an
    initialised ``backend`` group (gloo: CPU, runs anywhere); ``fn`` finds its rank with
    ``torch.distributed.get_rank()``. Returns ``fn``'s return values in rank order (they must
    pickle; tensors travel by value).

    A hang must fail, not block the suite: after ``timeout`` seconds every child still running
    is killed and :class:`TimeoutError` names the ranks that did not finish. When a rank raises,
    the others (probably waiting in a collective for it) are killed after a short grace and
    :class:`RuntimeError` carries every rank's traceback. Children never outlive the call.

    ``fn`` must be importable by name (a module-level function), since children are spawned,
    not forked: forking a process that already runs torch threads can deadlock.
    """
    import multiprocessing as mp
    import time

    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_distributed_worker, daemon=True,
                         args=(fn, args, kwargs, r, world_size, port, backend, threads, timeout,
                               results))
             for r in range(world_size)]
    done: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for p in procs:
            p.start()
        _collect(procs, results, done, errors, deadline=time.monotonic() + timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(10)
        results.close()
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RuntimeError(f"{len(errors)} of {world_size} ranks failed:\n{text}")
    missing = [r for r in range(world_size) if r not in done]
    if missing:
        raise TimeoutError(f"ranks {missing} did not finish within {timeout:g} s (a hang in "
                           "a collective?); every child was killed")
    return [done[r] for r in range(world_size)]


def _collect(procs: list[Any], results: Any, done: dict[int, Any], errors: dict[int, str],
             deadline: float) -> None:
    """Fill ``done`` (rank -> result) and ``errors`` (rank -> traceback) until every rank has
    reported, the deadline passes, or a short grace after the first failure ends (the other
    ranks are probably waiting in a collective for the failed one)."""
    import pickle
    import queue as queue_mod
    import time

    grace_end: float | None = None
    while len(done) + len(errors) < len(procs):
        now = time.monotonic()
        if now > deadline or (grace_end is not None and now > grace_end):
            return
        try:
            rank, ok, payload = results.get(timeout=0.2)
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs)
                    if p.exitcode is not None and r not in done and r not in errors]
            if dead and grace_end is None:
                grace_end = time.monotonic() + 2.0  # let its report arrive, if any
            elif dead:
                for r in dead:
                    errors[r] = f"rank {r} exited with code {procs[r].exitcode} without reporting"
            continue
        if ok:
            done[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
            if grace_end is None:
                grace_end = time.monotonic() + 2.0  # collect the other ranks' errors
