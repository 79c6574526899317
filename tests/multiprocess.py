"""Run a function on N gloo ranks forked from the test process.

The parent imports torch (and Megatron) once; the children inherit those imports through ``fork``, so a
multi-rank case costs a fraction of a second instead of one ``torchrun`` start per rank (CPU_GLOO.md).
Each child initialises the default gloo process group, runs ``fn(rank, world_size, *args)`` and sends back
its return value (which must pickle) or its traceback. Any failure or a timeout fails the whole call.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # N ranks share the machine's cores
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # report everything, including asserts and SystemExit, to the parent
        results.put((rank, False, traceback.format_exc()))


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks; return results by rank.

    Raises ``RuntimeError`` with the failing ranks' tracebacks if any rank raised, and on timeout (after
    killing every child), so a hang in a collective fails the test instead of stalling the suite.
    """
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, rank, world_size, port, args, results), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    collected: dict[int, tuple[bool, Any]] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout_s)
            collected[rank] = (ok, value)
            if not ok:
                break  # the other ranks may now be stuck in a collective with the failed one
    except Exception as exc:  # queue.Empty: some rank never answered
        raise RuntimeError(f"ranks {sorted(set(range(world_size)) - set(collected))} did not finish "
                           f"within {timeout_s:.0f} s") from exc
    finally:
        for proc in procs:
            proc.join(timeout=1 if len(collected) < world_size else 30)
            if proc.is_alive():
                proc.kill()
    failures = {rank: value for rank, (ok, value) in collected.items() if not ok}
    if failures:
        raise RuntimeError("\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(failures.items())))
    return [collected[rank][1] for rank in range(world_size)]
