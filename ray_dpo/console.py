"""What a run prints: ray_dpo's own lines on the console, everything else in Ray's log files.

Ray forwards every line that any worker process of the job writes to stdout/stderr to the
driver's console (``log_to_driver``). In a run that is mostly Ray's chatter: Ray Train's
``Reporting training result`` dict for every step on every worker (with the step's pair
ids), the PlacementGroupCleaner's ``Failed to query Ray Train Controller actor state`` once
a second whenever Ray's state API is unreachable (a local cluster without a dashboard),
Ray Data's progress bars, model-loading bars, library warnings. Ray already writes each
process's output to its session log folder, so nothing is lost by keeping it off the
console:

* forwarded lines: only those that start with ``[ray_dpo`` reach the console -- the progress
  lines the tracking callback prints in the Ray Train controller, and ray_dpo's log records
  in any actor or worker (``setup_worker_logging``, run in every worker process, formats
  them with that prefix);
* the driver's own Ray loggers (``ray``, ``ray.data``) print warnings and errors only; Ray
  Data keeps writing its INFO lines to ``logs/ray-data`` in the session folder;
* errors still reach the console: a failure in a worker or actor comes back to the driver
  as an exception, which the CLI prints;
* Ray's own error reports (``(raylet) A worker died or was killed ...``, ``Task X failed.
  There are infinite retries remaining ...``, out-of-memory kills) come from the cluster,
  not from a worker's output. ray_dpo survives most of them (a restarted actor), so the
  console gets their first sentence as one ``[ray_dpo] Ray reports:`` line, and the whole
  text goes to ``ray_dpo-ray-errors.log`` in the session's log folder.

``RAY_DPO_CONSOLE=all`` turns all of this off (Ray's default console) for debugging.

Whatever reaches the console or console.log has the credentials of its URLs masked (a
user:password@ or token@ user part, a token= or signature= query value: config/secrets.py),
filtered or not.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import sys
import tempfile

from ray_dpo import compat

OWN_PREFIX = "[ray_dpo"
LOG_FORMAT = "[%(name)s] %(message)s"
ENV_CONSOLE = "RAY_DPO_CONSOLE"
SETUP_HOOK = "ray_dpo.console.setup_worker_process"

# The driver-side handler Ray registers for forwarded worker output (ray._private.worker);
# ray.shutdown() removes it by this name, so the filtered one keeps it.
_RAY_PRINT_HANDLER = "ray_print_logs"


def filtering_enabled() -> bool:
    return os.environ.get(ENV_CONSOLE, "").lower() != "all"


# What Ray's C++ core worker logs at error level when an actor that Ray may restart gets
# constructor arguments through the object store (large ones always do). ray_dpo keeps
# them alive for the run (their owner is the driver), so the restart it warns about works:
# the run-long roles below are built this way on purpose, and the line read as a failure.
RESTART_ARGS_NOTICE = "has constructor arguments in the object store and max_restarts > 0"


@contextlib.contextmanager
def without_native_lines(*needles: str):
    """Run the block with this process's file descriptor 2 going to a temp file, then write
    back to it every line that contains none of ``needles``.

    For lines Ray's C++ core worker writes straight to fd 2 (no Python logger to filter),
    around the one call that emits them: they are printed in the calling thread, during the
    call. Nothing else is lost (the block's other stderr output follows at its end);
    RAY_DPO_CONSOLE=all keeps everything as is."""
    if not filtering_enabled():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True)
                    if not any(n.encode() in line for n in needles)]
            if kept:
                os.write(2, b"".join(kept))


def is_own_line(line: str) -> bool:
    """A line ray_dpo printed: progress, its report lines and its log records."""
    return line.lstrip().startswith(OWN_PREFIX)


def own_lines(batch: dict) -> list[str]:
    """The lines of one forwarded batch (Ray's ``{"lines": [...], "is_err", "pid", ...}``)
    that are ray_dpo's."""
    return [line for line in batch.get("lines") or () if is_own_line(line)]


class RedactRecords(logging.Filter):
    """A handler filter: log records with their URLs' credentials masked (secrets.redact)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ray_dpo.config.secrets import redact

        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def _print_own_lines(batch: dict) -> None:
    from ray_dpo.config.secrets import redact

    lines = [redact(line) for line in own_lines(batch)]
    if not lines:
        return
    sink = sys.stderr if batch.get("is_err") else sys.stdout
    # Without Ray's "(TrainController pid=...)" prefix: the line names its source already.
    sink.write("".join(line + "\n" for line in lines))
    sink.flush()


class Recording:
    """Keeps a copy of what this process prints to stdout and stderr while it is entered
    (the run's console, for its MLflow run), up to ``limit`` characters: past it the start
    and the last ``limit // 2`` characters are kept."""

    def __init__(self, limit: int = 4_000_000):
        self.limit, self._head, self._tail, self._dropped = limit, [], collections.deque(), 0
        self._head_size = self._tail_size = 0
        self._saved: tuple = ()

    def __enter__(self) -> "Recording":
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = RedactingStream(sys.stdout, self._keep), RedactingStream(sys.stderr, self._keep)
        # ray_dpo's log records: their handler writes to the stream it was given at start-up.
        self._handler = logging.Handler()
        self._handler.setFormatter(logging.Formatter(LOG_FORMAT))
        self._handler.addFilter(RedactRecords())
        self._handler.emit = lambda record: self._keep(self._handler.format(record) + "\n")
        logging.getLogger("ray_dpo").addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self._saved
        logging.getLogger("ray_dpo").removeHandler(self._handler)

    def _keep(self, text: str) -> None:
        if self._head_size + len(text) <= self.limit // 2 and not self._tail:
            self._head.append(text)
            self._head_size += len(text)
            return
        self._tail.append(text)
        self._tail_size += len(text)
        while self._tail and self._tail_size > self.limit // 2:  # sizes kept, not summed per write
            dropped = len(self._tail.popleft())
            self._tail_size -= dropped
            self._dropped += dropped

    def text(self) -> str:
        cut = f"\n[... {self._dropped} characters left out ...]\n" if self._dropped else ""
        return "".join(self._head) + cut + "".join(self._tail)


class RedactingStream:
    """A stream that masks the credentials of the URLs written to it (the CLI's stdout and
    stderr: config errors and tracebacks may quote a URL), and with ``keep`` hands what it
    writes to it too (Recording's copy of the console)."""

    def __init__(self, sink, keep=None):
        self._sink, self._keep = sink, keep

    def write(self, text: str) -> int:
        from ray_dpo.config.secrets import redact

        text = redact(text)
        if self._keep is not None:
            self._keep(text)
        self._sink.write(text)
        return len(text)

    def flush(self) -> None:
        self._sink.flush()

    def __getattr__(self, name: str):
        return getattr(self._sink, name)


class OwnLinesOnly:
    """A stdout that passes ray_dpo's lines and drops the rest: what a library driving the
    console from this process (Ray Tune's experiment banners and trial tables) prints goes
    nowhere, as the other processes' output already does (``own_lines``)."""

    def __init__(self, sink):
        self._sink, self._partial = sink, ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        kept = [line + "\n" for line in lines if is_own_line(line)]
        if kept:
            self._sink.write("".join(kept))
        return len(text)

    def flush(self) -> None:
        self._sink.flush()

    def __getattr__(self, name: str):
        return getattr(self._sink, name)


def install_console_filter() -> bool:
    """Replace Ray's printer of forwarded worker output (in this driver, after ray.init) by
    one that prints ray_dpo's lines only, and shorten Ray's cluster error reports. False if
    Ray's internals are not as expected, in which case the console stays as Ray makes it."""
    dispatcher = compat.worker_output_dispatcher()
    if dispatcher is None:
        return False
    names = [name for name, _ in getattr(dispatcher, "handlers", ())]
    if _RAY_PRINT_HANDLER not in names:
        return False  # log_to_driver=False, or Ray renamed it
    dispatcher.remove_handler(_RAY_PRINT_HANDLER)
    dispatcher.add_handler(_RAY_PRINT_HANDLER, _print_own_lines)
    compat.wrap_cluster_error_printer(_shortening_cluster_errors)
    return True


# Ray 2.60's driver thread that prints the cluster's error reports (listen_error_messages)
# calls its printer of worker output with pid "raylet"; install_console_filter wraps that
# function (compat.wrap_cluster_error_printer).
_CLUSTER_PIDS = ("raylet", "autoscaler")
ERRORS_FILE = "ray_dpo-ray-errors.log"


def _shortening_cluster_errors(original):
    """Ray's printer of worker output, but cluster error reports as short_cluster_errors."""

    def print_to_stdstream(data, ignore_prefix: bool):
        if data.get("pid") not in _CLUSTER_PIDS:
            return original(data, ignore_prefix)
        for line in short_cluster_errors(data.get("lines") or (), save_to=_errors_file()):
            print(line, file=sys.stderr, flush=True)

    return print_to_stdstream


def short_cluster_errors(messages, save_to: str | None) -> list[str]:
    """One ``[ray_dpo] Ray reports: <first sentence>`` line per message of Ray's; the whole
    messages are appended to ``save_to`` (if given)."""
    messages = [m for m in messages if m and m.strip()]
    if save_to and messages:
        try:
            with open(save_to, "a", encoding="utf-8") as f:
                f.write("".join(m.rstrip() + "\n" for m in messages))
        except OSError:
            save_to = None
    where = f" (full text: {save_to})" if save_to else ""
    return [f"{OWN_PREFIX}] Ray reports: {_summary(m)}{where}" for m in messages if _RETRIED not in m]


# A call Ray sends again by itself (an actor with max_task_retries restarting) is not a
# failure: kept in the errors file, not said on the console.
_RETRIED = "so the task will be retried"
_NODE_DEAD = re.compile(r"The node with node id: (\w+) and address: (\S+) .*?has been marked dead because (.+?)\.")


def _summary(message: str) -> str:
    """A Ray report's first sentence; a dead node's report as which node and why."""
    dead = _NODE_DEAD.search(" ".join(message.split()))
    if dead:
        node, address, why = dead.groups()
        return f"node {address} (id {node[:8]}) is dead: {why}."
    return _first_sentence(message)


def _first_sentence(message: str, limit: int = 200) -> str:
    text = " ".join(message.split())
    for stop in (". ", ": "):
        if stop in text[:limit]:
            return text[:text.index(stop) + 1]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _errors_file() -> str | None:
    where = ray_log_dir()
    return os.path.join(where, ERRORS_FILE) if where else None


def ray_console_handlers(names=("ray", "ray.data")) -> list[logging.Handler]:
    """The handlers of Ray's loggers in this process that print to the console (not files)."""
    return [handler for name in names for handler in logging.getLogger(name).handlers
            if type(handler) is logging.StreamHandler or type(handler).__name__ == "PlainRayHandler"]


class HeldErrors:
    """Holds back the error records of Ray's console handlers while ray_dpo runs work whose
    errors it reports itself in one line (a bad data row: file and line); ``release()`` prints
    them after all when the error was not one of those. Files keep every record anyway."""

    def __init__(self) -> None:
        self.held: list[tuple[logging.Handler, logging.LogRecord]] = []
        self._filters = [(handler, _Hold(handler, self.held)) for handler in ray_console_handlers()]

    def __enter__(self) -> "HeldErrors":
        for handler, hold in self._filters:
            handler.addFilter(hold)
        return self

    def __exit__(self, *exc) -> None:
        for handler, hold in self._filters:
            handler.removeFilter(hold)

    def release(self) -> None:
        held, self.held[:] = list(self.held), []
        for handler, record in held:
            if record.levelno >= handler.level:
                handler.handle(record)


class _Hold(logging.Filter):
    """One handler's part of HeldErrors: its error records go to ``sink`` instead."""

    def __init__(self, handler: logging.Handler, sink: list) -> None:
        super().__init__()
        self.handler, self.sink = handler, sink

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.sink.append((self.handler, record))
        return False


def quiet_driver_loggers() -> None:
    """Ray's loggers in this process print warnings and errors only; their files (Ray Data's
    ``ray-data.log``) keep everything."""
    for handler in ray_console_handlers():
        handler.setLevel(max(handler.level, logging.WARNING))
    # "Token authentication is enabled for this Ray cluster..." on every local start: Ray's
    # secure default for the cluster ray_dpo starts itself, nothing for the user to do.
    compat.ray_auth_logger().setLevel(logging.ERROR)
    # MLflow's "Creating initial MLflow database tables..." on a new SQLite store: MLflow sets
    # its logger's level from this variable when imported, and the driver imports it later.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if "mlflow" in sys.modules:
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())


def setup_worker_process() -> None:
    """worker_process_setup_hook of ray_dpo's jobs: ray_dpo's log format (unless
    RAY_DPO_CONSOLE=all) and the SIGTERM grace of policy workers (ray_dpo/faults.py)."""
    from ray_dpo import faults

    if filtering_enabled():
        setup_worker_logging()
    faults.install_sigterm_grace()


def setup_worker_logging() -> None:
    """worker_process_setup_hook: in each Ray worker process, ray_dpo's log records go to
    stderr as ``[ray_dpo.<part>] message`` -- the prefix the driver's filter lets through
    (Ray's default worker logging prints bare messages). Not propagated, so Ray Train's
    root handler does not print them a second time."""
    log = logging.getLogger("ray_dpo")
    if any(getattr(h, "_ray_dpo", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RedactRecords())
    handler._ray_dpo = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def ray_log_dir() -> str | None:
    """This node's folder of Ray session logs (every worker's output, Ray Train, Ray Data):
    ``logs`` in the session folder, ``<temp dir>/<session name>`` as Ray lays it out."""
    try:
        import ray

        context = ray.get_runtime_context()
        return os.path.join(context.get_temp_dir(), context.get_session_name(), "logs")
    except Exception:  # noqa: BLE001 -- only for a hint to the user
        return None
