"""Weights over a collective group: policy rank 0 broadcasts them to every engine in buckets.

The ``collective`` weight-sync method. Policy rank 0 and every engine join one process
group made for this sync only (its own TCPStore, outside Ray Train's default group): gloo
when the policy runs on CPU, NCCL on GPUs, the same code. The weights travel as buckets: a
bucket is one flat byte buffer holding several tensors (or one tensor larger than the bucket
size), broadcast from rank 0. Under ZeRO-3 the policy ranks gather a bucket's parameters,
rank 0 broadcasts it, and the gathered copies are released before the next bucket, so no
process ever holds more than a bucket beyond its own model. The engines feed each tensor to
their model's weight loaders as it arrives (vLLM: ``reload_weights(weights_iterator=...)``).

    plan_buckets(entries, bucket_bytes) -> [Bucket]     pure: who goes in which bucket, at which offset
    GroupSender(backend=, device=, world_size=, ...)    policy rank 0: hosts the store, sends buckets
        .ticket(buckets, ...) -> SyncTicket             what the engines need to join (small, picklable)
        .connect(); .send(bucket, tensors); .close()
    receive(ticket, rank=, device=) -> iterator         an engine: (name, tensor) as buckets arrive

A sync is one group: made at the sync, dropped after it. A peer that dies mid-sync breaks
the group for everyone (gloo and NCCL both report it); the caller makes a new one and sends
again (policy/weights.py).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from ray_dpo import compat

ALIGN = 64
"""Byte alignment of every tensor inside a bucket (a uint8 slice viewed as any dtype)."""


@dataclass(frozen=True)
class Slot:
    """One tensor's place in a bucket."""

    name: str
    dtype: str  # torch dtype name without "torch."
    shape: tuple[int, ...]
    offset: int  # bytes from the bucket's start

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class Bucket:
    """Tensors broadcast together as one flat byte buffer of ``nbytes``."""

    slots: tuple[Slot, ...]
    nbytes: int

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]


def plan_buckets(entries: Sequence[tuple[str, str, Sequence[int]]], bucket_bytes: int) -> list[Bucket]:
    """Buckets for ``entries`` [(name, dtype name, full shape)] in their order: each holds
    consecutive tensors up to ``bucket_bytes`` in all; a tensor larger than that is a bucket
    of its own. Offsets are aligned to ALIGN bytes."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be > 0 bytes, got {bucket_bytes}")
    buckets: list[Bucket] = []
    slots: list[Slot] = []
    end = 0
    for name, dtype, shape in entries:
        dtype, shape = dtype.removeprefix("torch."), tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * getattr(torch, dtype).itemsize
        start = _aligned(end)
        if slots and start + nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(slots), end))
            slots, start = [], 0
        slots.append(Slot(name, dtype, shape, start))
        end = start + nbytes
    if slots:
        buckets.append(Bucket(tuple(slots), end))
    return buckets


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class SyncTicket:
    """What an engine needs to take part in one collective sync (sent with the sync call).

    host/port: the group's TCPStore (on policy rank 0's node); world_size: 1 + engines,
    engine i is rank i + 1. backend: "gloo" | "nccl". buckets: what arrives, in order.
    adapter: a LoRA policy's peft config when the tensors are its adapter (engines load
    them as an adapter), else None. version: the policy step (names an adapter version).
    """

    host: str
    port: int
    world_size: int
    backend: str
    buckets: tuple[Bucket, ...]
    timeout_s: float
    adapter: Optional[dict] = None
    version: int = 0


def backend_for(device: torch.device | str) -> str:
    """The collective backend for the policy's device: NCCL on CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


ARRIVED, ABORT = "arrived", "abort"
"""Store keys: the counter each engine adds 1 to before anyone joins the group; set by rank 0
when it gives up on the sync before the group formed (an engine never came)."""


def _await_arrivals(store, engines: int, timeout_s: float, poll_s: float = 0.05) -> None:
    """An engine's wait until every engine has arrived, so none joins a group that cannot
    form; GroupBroken if rank 0 gave up meanwhile (or its store is gone)."""
    import time

    deadline = time.monotonic() + timeout_s
    try:
        while store.add(ARRIVED, 0) < engines:
            if store.check([ABORT]):
                raise GroupBroken("policy rank 0 gave up on this sync before every engine joined")
            if time.monotonic() > deadline:
                raise GroupBroken(f"not every engine joined the sync group within {timeout_s:.0f}s")
            time.sleep(poll_s)
    except GroupBroken:
        raise
    except RuntimeError as err:  # the store's server (rank 0) is gone
        raise GroupBroken(_first_line(err)) from None


GROUP_TIMEOUT_S = 60.0
"""How long the group's forming and each broadcast may take once every member has arrived
(the sync's timeout_s bounds the wait for arrivals, which queue behind a generation): a
member that dies after it arrived breaks the sync within this, not after timeout_s."""


def _group(store, rank: int, world_size: int, backend: str, timeout_s: float, device: torch.device):
    """A process group over ``store`` that is not torch.distributed's default group (policy
    rank 0 is in Ray Train's already). Collectives are called on the object directly."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=min(timeout_s, GROUP_TIMEOUT_S))
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    options = compat.nccl_options(timeout)  # GPU path: not testable on CPU CI
    torch.cuda.set_device(device)
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def _broadcast(group, buffer: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    group.broadcast([buffer], opts).wait()
    if buffer.is_cuda:
        torch.cuda.current_stream().synchronize()  # GPU path: the buffer is read right after


class GroupBroken(RuntimeError):
    """The sync group failed mid-sync (a peer died or timed out); make a new one and resend."""


class GroupSender:
    """Policy rank 0's end: hosts the group's store on this node and broadcasts buckets.

    Create it, hand ``ticket(...)`` to the engines (they join with ``receive``), then
    ``connect()`` (returns once every engine has joined), ``send`` each bucket, ``close()``.
    ``sent_bytes`` and ``largest_bucket`` say what went out.
    """

    def __init__(self, *, backend: str, device: torch.device | str, world_size: int, timeout_s: float,
                 host: Optional[str] = None):
        import torch.distributed as dist

        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        self.backend, self.device, self.world_size, self.timeout_s = backend, torch.device(device), world_size, timeout_s
        self.host = host
        self._store = dist.TCPStore(host, 0, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                                    wait_for_workers=False)
        self.port = self._store.port
        self._group = None
        self.sent_bytes = 0
        self.largest_bucket = 0

    def ticket(self, buckets: Sequence[Bucket], *, adapter: Optional[dict] = None, version: int = 0) -> SyncTicket:
        return SyncTicket(host=self.host, port=self.port, world_size=self.world_size, backend=self.backend,
                          buckets=tuple(buckets), timeout_s=self.timeout_s, adapter=adapter, version=version)

    def connect(self, check: Optional[Callable[[], Optional[str]]] = None, poll_s: float = 0.5) -> None:
        """Join the group as rank 0; returns once every engine has joined (or raises GroupBroken).

        Engines say they arrived (``receive``) before they join, and until all have, ``check``
        is asked every ``poll_s`` whether one of them failed (the follower reads their load
        calls: an engine that was dead when its call was sent never comes); a problem it
        names breaks the group at once instead of after timeout_s."""
        import time

        import torch.distributed as dist

        deadline = time.monotonic() + self.timeout_s
        while self._store.add(ARRIVED, 0) < self.world_size - 1:
            problem = check() if check is not None else None
            if not problem and time.monotonic() > deadline:
                problem = (f"{self.world_size - 1 - self._store.add(ARRIVED, 0)} engine(s) did not join the "
                           f"sync group within {self.timeout_s:.0f}s")
            if problem:
                self._store.set(ABORT, "1")  # the engines that arrived stop waiting for the others
                raise GroupBroken(problem)
            time.sleep(poll_s)
        try:
            self._group = _group(dist.PrefixStore("sync/", self._store), 0, self.world_size, self.backend,
                                 self.timeout_s, self.device)
        except RuntimeError as err:
            raise GroupBroken(_first_line(err)) from None

    def send(self, bucket: Bucket, tensors: Sequence[torch.Tensor]) -> None:
        """Broadcast ``tensors`` (the bucket's, in its order, full shapes) as one buffer."""
        if len(tensors) != len(bucket.slots):
            raise ValueError(f"bucket of {len(bucket.slots)} tensor(s) got {len(tensors)}")
        buffer = _pack(bucket, tensors, self.device)
        try:
            _broadcast(self._group, buffer)
        except RuntimeError as err:
            raise GroupBroken(_first_line(err)) from None
        self.sent_bytes += bucket.nbytes
        self.largest_bucket = max(self.largest_bucket, bucket.nbytes)

    def close(self) -> None:
        """Drop the group and the store (after a failure too: a broken group is never reused)."""
        group, self._group = self._group, None
        del group
        self._store = None


def _pack(bucket: Bucket, tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The bucket's byte buffer on ``device``. A bucket of one contiguous tensor is sent as
    it is (a byte view, no copy)."""
    for slot, t in zip(bucket.slots, tensors):
        if tuple(t.shape) != slot.shape or str(t.dtype).removeprefix("torch.") != slot.dtype:
            raise ValueError(f"{slot.name}: {tuple(t.shape)} {t.dtype} does not match the plan's "
                             f"{slot.shape} {slot.dtype} (under ZeRO-3: gathered?)")
    if len(tensors) == 1 and tensors[0].device == device and tensors[0].is_contiguous():
        return tensors[0].detach().reshape(-1).view(torch.uint8)
    buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
    for slot, t in zip(bucket.slots, tensors):
        buffer[slot.offset:slot.offset + slot.nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return buffer


def receive(ticket: SyncTicket, *, rank: int, device: torch.device | str,
            stats: Optional["ReceiveStats"] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """An engine's end (rank >= 1): join the group, then yield (name, tensor) for every
    tensor of every bucket as it arrives. Each bucket is a new buffer, so tensors a loader
    keeps until its layer is complete stay valid. Raises GroupBroken if the group fails."""
    import torch.distributed as dist

    device = torch.device(device)
    stats = stats if stats is not None else ReceiveStats()
    store = dist.TCPStore(ticket.host, ticket.port, ticket.world_size, False,
                          timeout=datetime.timedelta(seconds=ticket.timeout_s))
    store.add(ARRIVED, 1)  # rank 0 waits for every engine's arrival before it joins (GroupSender.connect)
    _await_arrivals(store, ticket.world_size - 1, ticket.timeout_s)
    try:
        group = _group(dist.PrefixStore("sync/", store), rank, ticket.world_size, ticket.backend, ticket.timeout_s,
                       device)
    except RuntimeError as err:
        raise GroupBroken(_first_line(err)) from None
    try:
        for bucket in ticket.buckets:
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
            try:
                _broadcast(group, buffer)
            except RuntimeError as err:
                raise GroupBroken(_first_line(err)) from None
            stats.bytes += bucket.nbytes
            stats.largest_bucket = max(stats.largest_bucket, bucket.nbytes)
            for slot in bucket.slots:
                view = buffer[slot.offset:slot.offset + slot.nbytes].view(getattr(torch, slot.dtype))
                yield slot.name, view.view(slot.shape)
            del buffer
    finally:
        del group


@dataclass
class ReceiveStats:
    """What an engine received in one collective sync."""

    bytes: int = 0
    largest_bucket: int = 0


def drain(ticket: SyncTicket, *, rank: int, device: torch.device | str) -> ReceiveStats:
    """Take part in a sync without loading anything (an engine that refuses the weights must
    still receive every bucket, or the sender and the other engines wait for it)."""
    stats = ReceiveStats()
    for _ in receive(ticket, rank=rank, device=device, stats=stats):
        pass
    return stats


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
