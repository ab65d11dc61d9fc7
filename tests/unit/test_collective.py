"""The collective weight sync's own parts (engines/collective.py), without Ray: the bucket plan
(pure), and real gloo groups between this process (the sender, policy rank 0's end) and
engine processes started here, with a peer that dies mid-sync."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from ray_dpo.engines.collective import ALIGN, GroupBroken, GroupSender, plan_buckets, receive


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 32, generator=g),  # 8 KiB: larger than the bucket, alone
        "layer.0.q": torch.randn(16, 32, generator=g).to(torch.bfloat16),
        "layer.0.k": torch.randn(3, 5, generator=g),  # odd byte size: the next offset is aligned
        "layer.0.norm": torch.randn(32, generator=g),
        "layer.1.q": torch.randn(16, 32, generator=g).to(torch.bfloat16),
        "step": torch.arange(7, dtype=torch.int64),
    }


def _entries(weights):
    return [(n, str(t.dtype), tuple(t.shape)) for n, t in weights.items()]


def test_plan_keeps_order_and_size_and_puts_a_large_tensor_alone():
    weights = _weights()
    buckets = plan_buckets(_entries(weights), bucket_bytes=2048)
    names = [n for b in buckets for n in b.names]
    assert names == list(weights)
    assert buckets[0].names == ["embed.weight"] and buckets[0].nbytes == 64 * 32 * 4
    for b in buckets[1:]:
        assert b.nbytes <= 2048
        for s in b.slots:
            assert s.offset % ALIGN == 0
            assert s.nbytes == weights[s.name].numel() * weights[s.name].element_size()
        ends = [s.offset + s.nbytes for s in b.slots]
        assert all(end <= nxt.offset for end, nxt in zip(ends, b.slots[1:]))  # no overlap
        assert b.nbytes == ends[-1]
    assert sum(b.nbytes for b in buckets) >= sum(t.numel() * t.element_size() for t in weights.values())
    # one bucket when everything fits
    assert len(plan_buckets(_entries(weights), bucket_bytes=1 << 20)) == 1
    with pytest.raises(ValueError, match="bucket size"):
        plan_buckets(_entries(weights), bucket_bytes=0)


def _engine(ticket, rank: int, die_after: int, out) -> None:
    """An engine's end, in its own process: receive, compare with the expected weights."""
    torch.set_num_threads(1)
    expected, got, buckets = _weights(), {}, 0
    try:
        last = None
        for name, tensor in receive(ticket, rank=rank, device="cpu"):
            if tensor.data_ptr() != last:
                last = tensor.data_ptr()
            got[name] = tensor.clone()
            buckets = sum(1 for b in ticket.buckets if set(b.names) <= set(got))
            if die_after and buckets >= die_after:
                os._exit(3)  # killed mid-sync
        same = all(torch.equal(got[n], expected[n]) and got[n].dtype == expected[n].dtype for n in expected)
        out.put((rank, "ok", same, sorted(got) == sorted(expected)))
    except GroupBroken as err:
        out.put((rank, "broken", str(err)[:80], None))


def _sync(die_after: dict[int, int], bucket_bytes: int = 2048):
    """One sync from this process to two engine processes; (sender error or None, their answers)."""
    ctx = mp.get_context("spawn")
    weights = _weights()
    buckets = plan_buckets(_entries(weights), bucket_bytes)
    sender = GroupSender(backend="gloo", device="cpu", world_size=3, timeout_s=60, host="127.0.0.1")
    ticket = sender.ticket(buckets)
    out = ctx.Queue()
    procs = [ctx.Process(target=_engine, args=(ticket, r, die_after.get(r, 0), out)) for r in (1, 2)]
    for p in procs:
        p.start()
    error = None
    try:
        sender.connect()
        for b in buckets:
            sender.send(b, [weights[n] for n in b.names])
    except GroupBroken as err:
        error = err
    finally:
        sender.close()
    for p in procs:
        p.join(60)
    answers = []
    while not out.empty():
        answers.append(out.get())
    return sender, error, sorted(answers), len(buckets)


def test_engines_receive_every_tensor_exactly_bucket_by_bucket():
    sender, error, answers, n_buckets = _sync({})
    assert error is None
    assert answers == [(1, "ok", True, True), (2, "ok", True, True)]
    assert n_buckets > 2
    total = sum(t.numel() * t.element_size() for t in _weights().values())
    assert sender.largest_bucket == 64 * 32 * 4  # the tensor that exceeds the bucket size
    assert total <= sender.sent_bytes < total + n_buckets * ALIGN * len(_weights())


def test_a_peer_dying_mid_sync_breaks_the_group_for_everyone_and_a_new_group_works():
    _, error, answers, _ = _sync({2: 2})
    assert isinstance(error, GroupBroken)
    # rank 2 never answers; the survivor got every bucket or was told (it depends on where in
    # gloo's broadcast the peer died): never a silent partial copy
    assert len(answers) == 1 and answers[0][0] == 1
    assert answers[0][1] == "broken" or answers[0][2:] == (True, True)
    # The sender's process is fine: the next sync, on a new group, completes.
    _, error, answers, _ = _sync({})
    assert error is None and [a[:3] for a in answers] == [(1, "ok", True), (2, "ok", True)]
