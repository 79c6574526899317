"""The collectives TSP uses, in one place: async handles, byte accounting and shard-buffer residency.

The same code runs on gloo (CPU) and NCCL (GPU). Every op takes a TSP ``group`` and group-local ranks
(``owner``); group-local ranks map to global ranks with ``dist.get_global_rank``. Every op is issued
asynchronously and returns a :class:`Pending`; ``wait()`` gives the result tensor.

Byte accounting (:func:`comm_bytes`) records the algorithmic bytes each rank moves, per op name, with the
convention: ``broadcast``, ``reduce``, ``all_gather`` and ``reduce_scatter`` move (D-1)/D of the full
tensor's bytes (the full tensor being the broadcast/reduced tensor or the gathered/scattered
``[D*n, ...]`` one); ``ring_send`` moves the bytes sent. Counts are exact fractions.

Overlap tracking (:func:`track_overlap`) splits those bytes by whether compute ran while they travelled: a
transfer is *hidden* when at least one matrix product or attention kernel was dispatched between its issue
and its ``wait()`` (on a GPU those kernels queue on the compute stream while the collective runs on its own),
else *exposed*; the cost model's overlap flags are tested against it.

Residency tracking (:func:`track_shard_residency`) counts how many transient shard buffers made by
:func:`shard_buffer` are alive at once, so that tests can check the schedules' promises (two slots for a
weight ring, three for attention's calls, one grad buffer in flight).
"""

from __future__ import annotations

import time
import weakref
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "CommCounter",
    "Overlap",
    "Pending",
    "ShardLayout",
    "ShardResidency",
    "all_gather_linear_pair",
    "all_gather_seq",
    "all_gather_zigzag",
    "broadcast",
    "broadcast_parts",
    "comm_bytes",
    "group_rank",
    "group_size",
    "reduce",
    "reduce_parts",
    "reduce_scatter_seq",
    "reduce_scatter_zigzag",
    "ring_exchange",
    "same_on_all_ranks",
    "shard_buffer",
    "track_overlap",
    "track_shard_residency",
]


def group_size(group: dist.ProcessGroup) -> int:
    """``dist.get_world_size(group)`` for a group this rank belongs to, asked of the group itself: torch's
    function re-checks the default group on every call (a few microseconds, and the schedules ask on every
    collective, where a short sequence's step is host-bound)."""
    return group.size()


def group_rank(group: dist.ProcessGroup) -> int:
    """``dist.get_rank(group)`` (this rank's group-local rank) for a group this rank belongs to, likewise."""
    return group.rank()


def same_on_all_ranks(values: Sequence[int]) -> bool:
    """Whether every rank of the default group passed the same ``values`` (one blocking all-reduce of
    ``[values, -values]`` by max, which all ranks must call; the answer is the same on every rank)."""
    on_gpu = "nccl" in dist.get_backend()  # "nccl", or a mixed "cpu:gloo,cuda:nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else None
    extremes = torch.tensor([*values, *(-v for v in values)], dtype=torch.int64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    largest, smallest = extremes[:len(values)], -extremes[len(values):]
    return bool(torch.equal(largest, smallest))


class Pending:
    """An issued collective; ``wait()`` blocks until it has finished and returns its result tensor."""

    def __init__(self, result: Tensor, works: list, issued: Sequence[_Issued] = ()) -> None:
        self._result = result
        self._works = works
        self._issued = issued  # for the overlap trackers active at issue (none outside tests)

    @classmethod
    def merged(cls, result: Tensor, parts: Sequence[Pending]) -> Pending:
        """One handle for several issued ``parts``, whose result is ``result``."""
        return cls(result, [work for part in parts for work in part._works],
                   tuple(issued for part in parts for issued in part._issued))

    def wait(self) -> Tensor:
        for work in self._works:
            work.wait()
        self._works = []
        if self._issued:
            for overlap, op, nbytes, clock_at_issue in self._issued:
                overlap._settle(op, nbytes, hidden=overlap._clock.ticks > clock_at_issue)
            self._issued = ()
        return self._result


class Prefetch:
    """Collectives started ahead of the module that needs their results, tied to the tensors they send.

    :meth:`take` hands them over only while every source is the same tensor at the same version, and once;
    otherwise they are drained and None tells the caller to start its own. Every rank runs the same program,
    so every rank decides alike. Version counters do not see writes through ``.data`` (Megatron's mixed-precision
    optimizer updates parameters so), so a prefetch must also not outlive the step that started it: its owner
    drains it (:meth:`drain`) at the end of that step (``specs.TSPTransformerLayer``: the layer's forward)."""

    def __init__(self, sources: Sequence[Tensor | None], pendings: Sequence[Pending | None]) -> None:
        self._sources = [(t, None if t is None else t._version) for t in sources]
        self._pendings: list[Pending | None] | None = list(pendings)

    def take(self, *sources: Tensor | None) -> list[Pending | None] | None:
        """The pending collectives if they were started from ``sources`` as they are now and not taken or
        drained yet, else None (and they are drained)."""
        current = all(held is given and (given is None or given._version == version)
                      for (held, version), given in zip(self._sources, sources, strict=True))
        pendings, self._pendings = self._pendings, None
        if pendings is not None and not current:
            self._pendings = pendings
            self.drain()
        return pendings if current else None

    def drain(self) -> None:
        """Wait for the collectives and drop their results (nothing to hand over afterwards)."""
        pendings, self._pendings = self._pendings or [], None
        for pending in pendings:
            if pending is not None:
                pending.wait()


@dataclass
class CommCounter:
    """Algorithmic bytes this rank moved, per op name (see the module docstring for the convention), and the
    messages that carried them (collective calls, or sends for ``ring_send``; none in a group of one)."""

    bytes_by_op: dict[str, Fraction] = field(default_factory=lambda: defaultdict(Fraction))
    messages_by_op: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def total(self) -> Fraction:
        return sum(self.bytes_by_op.values(), Fraction(0))


_active_counters: list[CommCounter] = []


@contextmanager
def comm_bytes() -> Iterator[CommCounter]:
    """Count the bytes and messages of every TSP op issued by this process inside the block (nesting
    allowed)."""
    counter = CommCounter()
    _active_counters.append(counter)
    try:
        yield counter
    finally:
        _active_counters.remove(counter)


_MATRIX_PRODUCTS = frozenset({"mm", "addmm", "bmm", "baddbmm"})


class _ComputeClock(TorchDispatchMode):
    """Ticks on every matrix product and attention kernel dispatched (what a collective can hide behind)."""

    def __init__(self) -> None:
        super().__init__()
        self.ticks = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _MATRIX_PRODUCTS or "attention" in name:
            self.ticks += 1
        return func(*args, **(kwargs or {}))


@dataclass
class Overlap:
    """Bytes of the TSP ops waited for inside :func:`track_overlap`'s block, per op name, split into those
    that compute overlapped (``hidden``) and the rest (``exposed``); same convention as :class:`CommCounter`."""

    hidden: dict[str, Fraction] = field(default_factory=lambda: defaultdict(Fraction))
    exposed: dict[str, Fraction] = field(default_factory=lambda: defaultdict(Fraction))
    _clock: _ComputeClock = field(default_factory=_ComputeClock, repr=False)

    def _settle(self, op: str, nbytes: Fraction, hidden: bool) -> None:
        (self.hidden if hidden else self.exposed)[op] += nbytes


_Issued = tuple[Overlap, str, Fraction, int]  # tracker, op name, bytes, compute ticks at issue
_active_overlaps: list[Overlap] = []


@contextmanager
def track_overlap() -> Iterator[Overlap]:
    """Split the bytes of the TSP ops issued and waited for inside the block into hidden and exposed (module
    docstring). A test instrument: it watches every op torch dispatches in this thread."""
    overlap = Overlap()
    _active_overlaps.append(overlap)
    try:
        with overlap._clock:
            yield overlap
    finally:
        _active_overlaps.remove(overlap)


def _record(op: str, group: dist.ProcessGroup, tensor: Tensor, *, scale: int = 1, messages: int = 1,
            collective: bool = True) -> Sequence[_Issued]:
    """Count ``scale`` x ``tensor``'s bytes (times (D-1)/D for a ``collective``, module docstring) and
    ``messages`` under ``op`` in the active counters, and return what the active overlap trackers settle at
    ``wait()``; nothing to compute, not even the group size, when none is active (every collective of a
    training step passes here)."""
    if not _active_counters and not _active_overlaps:
        return ()
    size = group_size(group)
    nbytes = scale * tensor.numel() * tensor.element_size() * (Fraction(size - 1, size) if collective else 1)
    sent = messages if size > 1 else 0
    for counter in _active_counters:
        counter.bytes_by_op[op] += nbytes
        counter.messages_by_op[op] += sent
    return [(overlap, op, nbytes, overlap._clock.ticks) for overlap in _active_overlaps]


def broadcast(tensor: Tensor, owner: int, group: dist.ProcessGroup) -> Pending:
    """In-place broadcast of ``tensor`` (any shape, contiguous) from group-local rank ``owner``."""
    issued = _record("broadcast", group, tensor)
    if group_size(group) == 1:
        return Pending(tensor, [])
    work = dist.broadcast(tensor, src=dist.get_global_rank(group, owner), group=group, async_op=True)
    return Pending(tensor, [work], issued)


def broadcast_parts(flat: Tensor, owners: Sequence[int], group: dist.ProcessGroup) -> Pending:
    """In-place broadcast of the j-th of ``len(owners)`` equal parts of ``flat [n]`` from ``owners[j]``: one
    message per part (each owner's shard travels as it was packed), waited for together; the result is
    ``flat``. (Where every rank owns a part, :func:`all_gather_seq` is the collective to use.)"""
    parts = [broadcast(part, owner, group) for part, owner in zip(flat.chunk(len(owners)), owners, strict=True)]
    return Pending.merged(flat, parts)


def all_gather_seq(tensor: Tensor, group: dist.ProcessGroup) -> Pending:
    """Gather ``[n, ...]`` from every rank into ``[D*n, ...]`` in group-rank order (dim 0 = sequence).

    The output is the flat ``[D*n, ...]`` form because gloo rejects a stacked ``[D, n, ...]`` output.
    """
    size = group_size(group)
    tensor = tensor.contiguous()
    issued = _record("all_gather", group, tensor, scale=size)
    if size == 1:
        return Pending(tensor, [])
    gathered = tensor.new_empty((size * tensor.shape[0], *tensor.shape[1:]))
    work = dist.all_gather_into_tensor(gathered, tensor, group=group, async_op=True)
    return Pending(gathered, [work], issued)


def all_gather_linear_pair(column_weight: Tensor, column_bias: Tensor | None, row_weight: Tensor,
                           group: dist.ProcessGroup) -> list[Pending | None]:
    """Start gathering the D shards of Megatron's column- then row-parallel linear pair (attention's qkv and
    proj, the MLP's fc1 and fc2) straight into their full layouts, one message per tensor: the column weight
    ``[D*r, h]`` and its bias ``[D*r]`` (None stays None) with the ranks' rows in rank order, and the row
    weight transposed, ``[D*c, h]`` (each rank sends its ``row_weight.t()``, so that the gathered rows are
    the full weight's columns)."""
    return [all_gather_seq(column_weight, group), None if column_bias is None else all_gather_seq(column_bias, group),
            all_gather_seq(row_weight.t(), group)]


def all_gather_zigzag(tensor: Tensor, group: dist.ProcessGroup) -> Pending:
    """Gather every rank's zigzag-local tokens ``[2c, ...]`` (its chunks p then 2D-1-p along dim 0) into
    ``[2Dc, ...]`` chunk-major: every rank's second chunk in rank order, then every rank's first chunk
    (``zigzag.gathered_positions``). Two all-gathers of half the rows each, counted as one ``all_gather``
    of the whole: in this order each causal part of a query chunk is one contiguous key range, so attention
    needs no reordering copy."""
    size, half = group_size(group), tensor.shape[0] // 2
    tensor = tensor.contiguous()
    issued = _record("all_gather", group, tensor, scale=size, messages=2)
    if size == 1:
        return Pending(torch.cat((tensor[half:], tensor[:half])), [])
    gathered = tensor.new_empty((size * tensor.shape[0], *tensor.shape[1:]))
    works = [dist.all_gather_into_tensor(gathered[:size * half], tensor[half:], group=group, async_op=True),
             dist.all_gather_into_tensor(gathered[size * half:], tensor[:half], group=group, async_op=True)]
    return Pending(gathered, works, issued)


def reduce_scatter_seq(tensor: Tensor, group: dist.ProcessGroup) -> Pending:
    """The transpose of :func:`all_gather_seq`: sum ``[D*n, ...]`` over the group and give rank p rows
    ``[p*n, (p+1)*n)``, ``[n, ...]``."""
    size = group_size(group)
    tensor = tensor.contiguous()
    issued = _record("reduce_scatter", group, tensor)
    if size == 1:
        return Pending(tensor, [])
    scattered = tensor.new_empty((tensor.shape[0] // size, *tensor.shape[1:]))
    work = dist.reduce_scatter_tensor(scattered, tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return Pending(scattered, [work], issued)


def reduce_scatter_zigzag(tensor: Tensor, group: dist.ProcessGroup) -> Pending:
    """The transpose of :func:`all_gather_zigzag`: sum a chunk-major ``[2Dc, ...]`` over the group and give
    each rank its own two chunks, ``[2c, ...]`` in local order (first chunk, then second)."""
    size = group_size(group)
    tensor = tensor.contiguous()
    half = tensor.shape[0] // (2 * size)
    issued = _record("reduce_scatter", group, tensor, messages=2)
    if size == 1:
        return Pending(torch.cat((tensor[half:], tensor[:half])), [])
    scattered = tensor.new_empty((2 * half, *tensor.shape[1:]))
    works = [dist.reduce_scatter_tensor(scattered[half:], tensor[:size * half], op=dist.ReduceOp.SUM, group=group,
                                        async_op=True),
             dist.reduce_scatter_tensor(scattered[:half], tensor[size * half:], op=dist.ReduceOp.SUM, group=group,
                                        async_op=True)]
    return Pending(scattered, works, issued)


def reduce(tensor: Tensor, owner: int, group: dist.ProcessGroup) -> Pending:
    """Sum ``tensor`` over the group into group-local rank ``owner`` (in place there).

    On the other ranks the tensor's content afterwards is unspecified.
    """
    issued = _record("reduce", group, tensor)
    if group_size(group) == 1:
        return Pending(tensor, [])
    work = dist.reduce(tensor, dst=dist.get_global_rank(group, owner), op=dist.ReduceOp.SUM, group=group,
                       async_op=True)
    return Pending(tensor, [work], issued)


def reduce_parts(flat: Tensor, owners: Sequence[int], group: dist.ProcessGroup) -> Pending:
    """Sum the j-th of ``len(owners)`` equal parts of ``flat [n]`` over the group into ``owners[j]``. The
    result is this rank's summed part (``[n / len(owners)]``) if it is an owner, else unspecified. (Where
    every rank owns a part, :func:`reduce_scatter_seq` is the collective to use.)"""
    rank = group_rank(group)
    parts = [reduce(part, owner, group) for part, owner in zip(flat.chunk(len(owners)), owners, strict=True)]
    own = flat.chunk(len(owners))[owners.index(rank)] if rank in owners else flat
    return Pending.merged(own, parts)


def ring_exchange(send: Tensor, recv: Tensor, group: dist.ProcessGroup) -> Pending:
    """One ring step: send ``send`` to the next group rank, receive ``recv`` from the previous one.

    Both are contiguous buffers of equal size; ``send`` must stay untouched until ``wait()``, whose result
    is ``recv``.
    """
    size = group_size(group)
    if size == 1:
        raise ValueError("ring_exchange needs a group of at least 2 ranks")
    issued = _record("ring_send", group, send, collective=False)
    rank = group_rank(group)
    ops = [dist.P2POp(dist.isend, send, dist.get_global_rank(group, (rank + 1) % size), group),
           dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, (rank - 1) % size), group)]
    return Pending(recv, dist.batch_isend_irecv(ops), issued)


class ShardLayout:
    """Where several tensors (one shard's weights, or their grads) sit in one flat buffer, in order.

    Packing lets one message carry a whole shard; the layout holds shapes only, so the same layout serves a
    weight buffer and an fp32 grad buffer.
    """

    def __init__(self, shapes: Sequence[torch.Size]) -> None:
        self.shapes = [torch.Size(shape) for shape in shapes]
        self.numels = [shape.numel() for shape in self.shapes]
        self.numel = sum(self.numels)

    def unpack(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat [numel]`` with the layout's shapes."""
        return [part.view(shape) for part, shape in zip(flat.split(self.numels), self.shapes)]

    def unpack_stacked(self, flat: Tensor, count: int) -> list[Tensor]:
        """Views of ``flat [count * numel]``, ``count`` shards back to back: one ``[count, *shape]`` view per
        tensor of the layout (strided: shard j's tensors sit in its own stretch)."""
        rows = flat.view(count, self.numel).split(self.numels, dim=1)
        return [part.view(count, *shape) for part, shape in zip(rows, self.shapes)]

    def pack(self, tensors: Sequence[Tensor], flat: Tensor) -> Tensor:
        """Copy ``tensors`` (cast to ``flat``'s dtype) into ``flat [numel]``; returns ``flat``."""
        for view, tensor in zip(self.unpack(flat), tensors, strict=True):
            view.copy_(tensor)
        return flat


@dataclass
class ShardResidency:
    """Live and peak counts of transient shard buffers, per kind (``"weight"``, ``"grad"``)."""

    live: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    peak: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def _alloc(self, kind: str) -> None:
        self.live[kind] += 1
        self.peak[kind] = max(self.peak[kind], self.live[kind])

    def _free(self, kind: str) -> None:
        self.live[kind] -= 1

    def _settle(self, kind: str, timeout_s: float = 0.02) -> None:
        """Before counting a new buffer, give buffers of ``kind`` that the schedule is done with time to go:
        gloo's worker thread lets go of a finished collective's tensors only once it holds the GIL, which
        may be after ``wait()`` returned (a buffer still in use just costs the wait)."""
        deadline = time.monotonic() + timeout_s
        while self.live[kind] and time.monotonic() < deadline:
            time.sleep(1e-3)


_active_residency: list[ShardResidency] = []


@contextmanager
def track_shard_residency() -> Iterator[ShardResidency]:
    """Track the shard buffers :func:`shard_buffer` makes inside the block until each is freed."""
    residency = ShardResidency()
    _active_residency.append(residency)
    try:
        yield residency
    finally:
        _active_residency.remove(residency)


def shard_buffer(numel: int, dtype: torch.dtype, device: torch.device, kind: str) -> Tensor:
    """A flat ``[numel]`` buffer for one transient shard (weights in flight, or a travelling grad).

    The schedules make every transient shard through here, so residency tracking sees all of them; a
    finaliser (fired when the buffer and every view of it are gone) marks it freed.
    """
    buffer = torch.empty(numel, dtype=dtype, device=device)
    for residency in _active_residency:
        residency._settle(kind)
        residency._alloc(kind)
        weakref.finalize(buffer, residency._free, kind)
    return buffer
