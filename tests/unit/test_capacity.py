"""The wait for a lost node's capacity (ray_dpo/capacity.py), on a fake node table and clock."""

from __future__ import annotations

import pytest

from ray_dpo import faults
from ray_dpo.capacity import CapacityLostError, CapacityWait, describe, lost_nodes, request_of, room, slots


def node(alive=True, **resources):
    return {"NodeID": "abcdef0123456789", "NodeManagerAddress": "10.0.0.7", "Alive": alive,
            "Resources": resources if alive else {}, "DeathReason": 0 if alive else 2,
            "DeathReasonMessage": "" if alive else "health check failed"}


def test_room_counts_what_each_live_node_can_hold_of_one_request():
    request = {"CPU": 1.0, "policy_node": 1.0}
    assert slots(request, {"CPU": 4.0, "policy_node": 2.0}) == 2
    assert slots(request, {"CPU": 4.0}) == 0
    nodes = [node(CPU=4.0, policy_node=2.0), node(CPU=3.0, policy_node=1.0), node(alive=False)]
    assert room(request, nodes) == 3
    assert room({"CPU": 0.5}, [node(CPU=1.0)]) == 2


def test_request_of_actor_options_leaves_out_what_it_does_not_ask_for():
    options = {"num_cpus": 1, "num_gpus": 0.0, "resources": {"reference_node": 0.5}}
    assert request_of(options) == {"CPU": 1.0, "reference_node": 0.5}
    assert describe(request_of(options)) == "{CPU: 1, reference_node: 0.5}"


def test_lost_nodes_are_the_ones_ray_saw_die_not_the_idle_scaled_down():
    dead, idle = node(alive=False), {**node(alive=False), "DeathReason": 4}
    assert lost_nodes([node(CPU=1.0), dead, idle]) == ["10.0.0.7 (id abcdef01): health check failed"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_wait_says_one_line_then_gives_up_after_its_limit_naming_role_node_and_needs():
    table = [node(CPU=4.0), node(alive=False)]
    clock, lines = Clock(), []
    wait = CapacityWait("reference actor 0 (ray_dpo-ref-0)", {"CPU": 1.0, "reference_node": 1.0}, limit_s=30,
                        nodes=lambda: table, clock=clock, say=lines.append)
    assert wait.check() == 30
    clock.now = 12
    assert wait.check() == 18
    assert len(lines) == 1
    for part in ("waiting up to 30s (run.capacity_wait_s)", "reference actor 0", "{CPU: 1, reference_node: 1}",
                 "10.0.0.7 (id abcdef01)"):
        assert part in lines[0], lines[0]
    clock.now = 30.5
    with pytest.raises(CapacityLostError) as err:
        wait.check()
    for part in ("reference actor 0 (ray_dpo-ref-0) lost", "10.0.0.7", "run.capacity_wait_s=30s",
                 "{CPU: 1, reference_node: 1}"):
        assert part in str(err.value), err.value
    assert faults.is_lost_for_good(err.value)


def test_room_coming_back_ends_the_wait_and_a_later_loss_starts_a_new_one():
    table = [node(CPU=4.0)]
    clock, lines = Clock(), []
    wait = CapacityWait("2 policy workers", {"CPU": 1.0, "policy_node": 1.0}, count=2, limit_s=10,
                        nodes=lambda: table, clock=clock, say=lines.append)
    assert wait.check() == 10
    table.append(node(CPU=3.0, policy_node=1.0))
    assert wait.check() == 10  # one slot is not room for two workers
    table.append(node(CPU=3.0, policy_node=1.0))
    clock.now = 9
    assert wait.check() is None
    clock.now = 100
    table.pop()
    assert wait.check() == 10  # a new wait, with its own limit and line
    assert len(lines) == 2 and "each" in lines[0]


def test_an_unreadable_node_table_is_no_reason_to_wait():
    wait = CapacityWait("engine 0", {"CPU": 1.0}, limit_s=0, nodes=lambda: [], say=pytest.fail)
    assert wait.check() is None


def test_the_failure_line_of_workers_that_found_no_room_says_why_and_how_to_resume():
    failure = faults.Failure(rank=0, node="10.0.0.7", step=7, reason="the process died", checkpoint_step=4,
                             capacity="2 policy workers lost: ..., within run.capacity_wait_s=20s")
    line = faults.failure_line(failure, max_failures=3)
    assert "run.capacity_wait_s=20s" in line and "resumes from the checkpoint at step 4" in line
    assert "policy.max_failures" not in line
    assert faults.Failure.from_json(failure.to_json()) == failure


def test_nodes_lost_before_the_role_started_are_not_named():
    old, new = {**node(alive=False), "NodeID": "0ld0000000"}, node(alive=False)
    clock, lines = Clock(), []
    wait = CapacityWait("engine 0", {"CPU": 1.0, "engine_node": 1.0}, limit_s=5, before=frozenset({"0ld0000000"}),
                        nodes=lambda: [node(CPU=1.0), old, new], clock=clock, say=lines.append)
    wait.check()
    assert "abcdef01" in lines[0] and "0ld00000" not in lines[0]


def test_local_storage_on_a_spread_run_is_a_warning_naming_the_key(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nserver:/export /mnt/shared nfs4 rw 0 0\n", encoding="utf-8")
    assert faults.mount_type("/mnt/shared/runs", str(mounts)) == "nfs4"
    assert faults.mount_type("/home/me/runs", str(mounts)) == "ext4"
    warning = faults.storage_warning("/home/me/runs", spread="a 3-node cluster", fs_type="ext4")
    assert warning.startswith("run.storage_path=/home/me/runs is a local path (ext4) with a 3-node cluster")
    assert "s3://" in warning
    assert faults.storage_warning("/mnt/shared/runs", spread="a 3-node cluster", fs_type="nfs4") is None
    assert faults.storage_warning("s3://bucket/runs", spread="a 3-node cluster", fs_type=None) is None
    assert faults.storage_warning("/home/me/runs", spread=None, fs_type="ext4") is None


def test_a_checkpoint_on_a_lost_nodes_disk_is_never_the_resume_point(tmp_path):
    """Ray's latest checkpoint was written on a node that is gone: its directory is not on
    this node's disk, so resume takes the newest complete checkpoint this node has."""
    from pyarrow import fs as pafs

    older = tmp_path / "checkpoint_000004"
    (older / "model").mkdir(parents=True)
    (older / "model" / "weights.bin").write_bytes(b"x" * 10)
    faults.write_manifest(str(older), rank=0, world_size=1, step=4)
    chosen, warnings = faults.pick_checkpoint(pafs.LocalFileSystem(), str(tmp_path / "checkpoint_000008"))
    assert chosen == str(older)
    assert "checkpoint_000008 is incomplete" in warnings[0]
