"""Fault tolerance: complete checkpoints, the ledger after a rollback, restart counts, and
the one line a user reads when a run does fail.

What survives what (docs/fault-tolerance.md has the table with measured results):

- A policy worker dies: Ray Train (FailureConfig(max_failures=policy.max_failures))
  restarts the whole worker group; the workers load the latest *complete* checkpoint and
  ask the feeder for the checkpoint's step, whose rows are a function of (seed, epoch,
  step). Steps after the checkpoint run again: the ledger drops their first run
  (``rollback_ledger``), MLflow gets a second point at those steps (the later one is the
  re-run) and ``faults/rolled_back_steps`` marks where it happened.
- The BatchFeeder dies: Ray restarts the actor (same constructor arguments: data, plan,
  reference group or cache) and retries the calls that were in flight; it holds no state
  a step needs beyond those arguments, so workers only wait.
- A reference actor dies: the ReferenceGroup resubmits its batches (reference/group.py).

Checkpoint integrity ("write, then mark complete"): every rank writes
``manifest/rank<r>.json`` next to its files, listing each file it wrote and its size. A
checkpoint is complete when the manifests of all its ranks are there and every listed
file has its listed size. Ray Train registers a checkpoint only after every rank has
uploaded it, so a half-written directory is never Ray's latest; a registered one that was
damaged later (a truncated file on a shared volume) fails the check and resume falls back
to the newest complete checkpoint before it, with a warning.

Pure except for ``gcs_restart_counts`` (Ray's actor table); the checkpoint helpers take a
pyarrow filesystem so they work on local paths and object stores alike.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Optional

from ray_dpo import compat

logger = logging.getLogger("ray_dpo.faults")

MANIFEST_DIR = "manifest"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d{6,})(?:_(\d+))?$")


# --------------------------------------------------------------------------- checkpoints


def storage_fs(path: str):
    """(pyarrow filesystem, path) of a local path or an object-store URI (s3://, gs://)."""
    from pyarrow import fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def write_manifest(local_dir: str, *, rank: int, world_size: int, step: int) -> str:
    """Write ``manifest/rank<r>.json`` into ``local_dir`` (this rank's checkpoint files,
    before Ray uploads them); returns its path. Call it after every other file is written."""
    files = {}
    for root, _, names in os.walk(local_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            if not rel.startswith(MANIFEST_DIR + "/"):
                files[rel] = os.path.getsize(path)
    out = os.path.join(local_dir, MANIFEST_DIR, f"rank{rank:05d}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "world_size": world_size, "step": step, "files": files}, f)
    return out


# Filesystem types that every node can mount at the same path (/proc/mounts' third field).
SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "wekafs",
             "fuse.")  # fuse.: gcsfuse, s3fs, juicefs, sshfs... mounts of remote storage


def mount_type(path: str, mounts: str = "/proc/mounts") -> Optional[str]:
    """The filesystem type of the mount that holds ``path`` (Linux), else None."""
    try:
        with open(mounts, encoding="utf-8") as f:
            entries = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    path = os.path.abspath(path)
    best = max((m for m in entries if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


def storage_warning(path: str, *, spread: Optional[str], fs_type: Optional[str]) -> Optional[str]:
    """Why run.storage_path ``path`` may not survive a lost node when the run is spread over
    nodes (``spread`` says how: "a 3-node cluster"; None: it is not), or None when it will
    (an object store, a shared mount)."""
    if not spread or "://" in path or (fs_type and fs_type.startswith(SHARED_FS)):
        return None
    return (f"run.storage_path={path} is a local path ({fs_type or 'filesystem unknown'}) with {spread}: "
            "each node writes its checkpoints to its own disk, so a worker on another node cannot resume "
            "from them and a lost node takes its checkpoints along (resume then falls back to the newest "
            "complete checkpoint the new worker sees, or step 0). Set run.storage_path to s3://..., gs://... "
            "or a volume mounted at the same path on every node")


def saved_world_size(fs: Any, path: str) -> int:
    """How many data-parallel ranks wrote the (complete) checkpoint at ``path``."""
    from pyarrow import fs as pafs

    selector = pafs.FileSelector(f"{path}/{MANIFEST_DIR}", allow_not_found=True)
    manifests = sorted(info.path for info in fs.get_file_info(selector) if info.path.endswith(".json"))
    with fs.open_input_stream(manifests[0]) as f:
        return int(json.loads(f.read().decode("utf-8"))["world_size"])


def checkpoint_problem(fs: Any, path: str) -> Optional[str]:
    """Why the checkpoint directory ``path`` on pyarrow filesystem ``fs`` is not complete,
    or None when every rank's manifest is there and every file it lists has its size."""
    from pyarrow import fs as pafs

    selector = pafs.FileSelector(f"{path}/{MANIFEST_DIR}", allow_not_found=True)
    manifests = [info.path for info in fs.get_file_info(selector) if info.path.endswith(".json")]
    if not manifests:
        return "no manifest/ (the write did not finish, or it predates manifests)"
    entries = []
    for manifest in manifests:
        try:
            with fs.open_input_stream(manifest) as f:
                entries.append(json.loads(f.read().decode("utf-8")))
        except (OSError, ValueError) as e:
            return f"unreadable manifest {os.path.basename(manifest)}: {e}"
    world = entries[0].get("world_size", 0)
    missing = sorted(set(range(world)) - {e.get("rank") for e in entries})
    if missing:
        return f"no manifest from rank(s) {missing} of {world}"
    for entry in entries:
        names = sorted(entry["files"])
        infos = fs.get_file_info([f"{path}/{name}" for name in names])
        for name, info in zip(names, infos):
            want = entry["files"][name]
            if info.type != pafs.FileType.File:
                return f"{name} is missing (rank {entry['rank']} wrote {want} bytes)"
            if info.size != want:
                return f"{name} has {info.size} bytes, rank {entry['rank']} wrote {want}"
    return None


def checkpoint_sort_key(name: str) -> Optional[tuple[int, int]]:
    """(step, rewrite) of a ``checkpoint_<step>[_<n>]`` directory name, else None."""
    match = _CHECKPOINT_NAME.match(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def pick_checkpoint(fs: Any, latest: str) -> tuple[Optional[str], list[str]]:
    """The newest complete checkpoint at or before Ray's ``latest`` (a path on ``fs``), and a
    warning per incomplete one skipped on the way. (None, warnings) when none is complete.

    Only checkpoints up to ``latest`` are candidates: a newer directory was never
    registered by Ray Train (its step's report never reached the ledger and MLflow)."""
    from pyarrow import fs as pafs

    parent, latest_name = os.path.dirname(latest.rstrip("/")), os.path.basename(latest.rstrip("/"))
    bound = checkpoint_sort_key(latest_name)
    names = [latest_name]
    if bound is not None:
        infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        others = [os.path.basename(i.path) for i in infos if i.type == pafs.FileType.Directory]
        keyed = [(checkpoint_sort_key(n), n) for n in others if n != latest_name]
        older = sorted((key, n) for key, n in keyed if key is not None and key < bound)
        names += [n for _, n in reversed(older)]
    warnings = []
    for name in names:
        problem = checkpoint_problem(fs, f"{parent}/{name}")
        if problem is None:
            return f"{parent}/{name}", warnings
        warnings.append(f"checkpoint {parent}/{name} is incomplete ({problem}); not resuming from it")
    return None, warnings


def fresh_checkpoint_name(fs: Any, run_dir: str, step: int) -> str:
    """``checkpoint_<step:06d>``, or ``checkpoint_<step:06d>_<n>`` when a directory of that
    name exists already (a run resumed from an earlier checkpoint re-reaches a step whose
    checkpoint is incomplete or still registered): never write into an old directory."""
    from pyarrow import fs as pafs

    base = f"checkpoint_{step:06d}"
    n = 0
    while True:
        name = base if n == 0 else f"{base}_{n}"
        if fs.get_file_info(f"{run_dir}/{name}").type == pafs.FileType.NotFound:
            return name
        n += 1


# --------------------------------------------------------------------------- ledger


def rollback_ledger(path: str, first_step: int) -> int:
    """Drop ledger entries of step >= ``first_step`` (they are about to run again), moving
    them to ``<ledger>.rolled_back.jsonl``; returns how many were dropped. Atomic rewrite."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    keep, dropped = [], []
    for line in lines:
        (dropped if json.loads(line)["step"] >= first_step else keep).append(line)
    if not dropped:
        return 0
    with open(path.removesuffix(".jsonl") + ".rolled_back.jsonl", "a", encoding="utf-8") as f:
        f.writelines(dropped)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(dropped)


def last_ledger_step(path: Optional[str]) -> int:
    """The highest step in the ledger file, 0 when there is none."""
    if not path or not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return max((json.loads(line)["step"] for line in f if line.strip()), default=0)


# --------------------------------------------------------------------------- restarts


def gcs_restart_counts(actor_ids: dict[str, list[str]]) -> dict[str, int]:
    """{role: restarts Ray made of that role's actors} from Ray's actor table (every process
    of the cluster sees it, so it survives the restarted actor's own state). A role whose
    count cannot be read (this time: the next poll tries again) is left out, and so is one
    whose actor ids could not be read."""
    out = {}
    for role, ids in actor_ids.items():
        counts = [compat.actor_restarts(actor_id) for actor_id in ids]
        if counts and None not in counts:
            out[role] = sum(counts)
    return out


# --------------------------------------------------------------------------- failure line


@dataclasses.dataclass
class Failure:
    """What the Ray Train callback saw when a policy worker failed."""

    rank: int
    node: str
    step: int  # the last step every rank reported
    reason: str  # one line
    checkpoint_step: Optional[int] = None  # the latest checkpoint Ray registered (resume point)
    lost_role: bool = False  # a role no worker restart brings back (LOST_FOR_GOOD): fail now
    capacity: Optional[str] = None  # the policy workers' node was lost and none came back in time

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: Optional[str]) -> Optional["Failure"]:
        try:
            return cls(**json.loads(text)) if text else None
        except (TypeError, ValueError):
            return None


class RunFailedError(RuntimeError):
    """A run that could not go on by itself; its message is one line for the console."""


def first_line(err: BaseException) -> str:
    """The most telling single line of a (possibly remote) error: a remote traceback's last
    "SomeError: ..." line, else the first line of the message."""
    cause = getattr(err, "health_check_failure", None) or err
    text = str(cause).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b", line)]
    line = errors[-1] if errors else (lines[0] if lines else repr(cause))
    name = type(cause).__name__
    line = line if line.startswith(name) or errors else f"{name}: {line}"
    return line[:300]


# Errors that say a role outside the worker group is gone for good (its Ray restarts are
# spent, or its node was lost and none with room came back within run.capacity_wait_s):
# restarting the policy workers cannot bring it back, so the run fails at once.
# Matched by name: they reach the controller wrapped in Ray's RayTaskError, maybe twice.
LOST_FOR_GOOD = ("EngineLostError", "ReferenceActorLostError", "CapacityLostError")


def is_lost_for_good(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return any(name in text for name in LOST_FOR_GOOD)


def describe_worker_errors(errors: dict[int, BaseException], nodes: dict[int, str], step: int,
                           checkpoint_step: Optional[int] = None) -> Failure:
    """The failure to report from Ray Train's {rank: error}: a rank that lost a role for
    good (LOST_FOR_GOOD), else the first rank whose process died (the others usually fail
    in a collective because of it), else the lowest rank."""
    def died(err: BaseException) -> bool:
        cause = getattr(err, "health_check_failure", err)
        return type(cause).__name__ in ("ActorDiedError", "RayActorError", "ActorUnavailableError")

    rank = min(errors, key=lambda r: (not is_lost_for_good(errors[r]), not died(errors[r]), r))
    err = errors[rank]
    reason = "the process died (killed, out of memory, or its node was lost)" if died(err) else first_line(err)
    return Failure(rank=rank, node=nodes.get(rank, "(unknown: it failed before its first step)"), step=step, reason=reason,
                   checkpoint_step=checkpoint_step, lost_role=is_lost_for_good(err))


def failure_line(failure: Optional[Failure], *, max_failures: int,
                 error: Optional[BaseException] = None) -> str:
    """One line: role, node, step, cause, restarts used, where a rerun resumes."""
    checkpoint_step = failure.checkpoint_step if failure is not None else None
    if failure is None:
        what = f"the policy workers failed: {first_line(error) if error else 'unknown error'}"
    else:
        what = (f"policy worker rank {failure.rank} on node {failure.node} failed after step "
                f"{failure.step}: {failure.reason}")
    if failure is not None and failure.capacity:
        budget = failure.capacity
    elif failure is not None and failure.lost_role:
        budget = "not restarted: a policy worker restart cannot bring that role back"
    else:
        budget = f"{max_failures} restart(s) of policy.max_failures={max_failures} used"
    if checkpoint_step:
        where = f"the same command resumes from the checkpoint at step {checkpoint_step}"
    elif failure is not None:
        where = "no checkpoint yet: the same command starts it again from step 0"
    else:
        where = "the same command resumes from the latest checkpoint, if any"
    return f"{what}; {budget}; {where}"


def step_of_checkpoint(path: Optional[str]) -> Optional[int]:
    key = checkpoint_sort_key(os.path.basename(path.rstrip("/"))) if path else None
    return key[0] if key else None


# --------------------------------------------------------------------------- SIGTERM grace

_TERM: dict[str, Any] = {"grace_s": 0.0, "at": None}


def install_sigterm_grace() -> bool:
    """In a Ray worker process, before Ray's task loop starts (worker_process_setup_hook):
    wrap the SIGTERM handler Ray installs next, so that a policy worker that armed it
    (``arm_sigterm_grace``) gets a grace period instead of exiting at once. Kubernetes sends
    SIGTERM before it evicts a pod (SIGKILL follows after terminationGracePeriodSeconds).
    Ray's handler still runs: when the worker is done (``sigterm_done``) or the grace is over.
    False if Ray's internals are not as expected (then SIGTERM is a plain kill, as before)."""
    return compat.wrap_sigterm_setter(_setting_graceful)


def _setting_graceful(set_sigterm_handler):
    """Ray's setter of the SIGTERM handler, setting that handler behind the grace (_graceful)."""

    def patched(handler):
        set_sigterm_handler(_graceful(handler))
    return patched


def _graceful(ray_handler):
    import signal
    import threading
    import time

    def handler(signum, frame):
        grace = _TERM["grace_s"]
        if grace <= 0 or _TERM["at"] is not None:
            return ray_handler(signum, frame)  # not armed, or the second signal: Ray's way
        _TERM["at"] = time.monotonic()
        logger.warning("SIGTERM: finishing this step and checkpointing, then exiting (at most %.0f s)", grace)
        timer = threading.Timer(grace, lambda: os.kill(os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()
    return handler


def arm_sigterm_grace(grace_s: float) -> None:
    """This process trains: a SIGTERM waits up to ``grace_s`` for a checkpoint (0: exit at once)."""
    _TERM["grace_s"] = float(grace_s)


def sigterm_received() -> bool:
    return _TERM["at"] is not None


def wait_reports_consumed(timeout_s: float) -> bool:
    """Block until Ray Train's controller has taken this rank's pending reports (the
    checkpoint just saved), at most ``timeout_s``. A rank that exits right after
    ``ray.train.report`` would otherwise take its queued report with it, and the controller
    would never register that checkpoint. Reads Ray Train's per-worker result queue
    (compat.train_result_queue); False if it is not there or the wait timed out."""
    import threading

    queue = compat.train_result_queue()
    if queue is None:
        return False
    done = threading.Event()
    threading.Thread(target=lambda: (queue.join(), done.set()), daemon=True).start()
    return done.wait(timeout_s)


def sigterm_done() -> None:
    """The checkpoint after a SIGTERM is saved: exit the way Ray would have."""
    import signal

    if _TERM["at"] is not None:
        os.kill(os.getpid(), signal.SIGTERM)
