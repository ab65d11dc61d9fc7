"""The console filter (ray_dpo.console) on batches shaped like the ones Ray forwards."""

import io
import logging

from ray_dpo import console

PG_CLEANER = ("Failed to query Ray Train Controller actor state. State API may be temporarily "
              "unavailable. Continuing to monitor.")
REPORT = ("Reporting training result 1: TrainingReport(checkpoint=None, metrics={'train/loss': 0.69, "
          "'pair_ids': ['p1', 'p2']}) from rank 0")


def batch(lines, is_err=False, actor="TrainController"):
    return {"lines": lines, "is_err": is_err, "pid": 4242, "actor_name": actor, "ip": "10.0.0.1"}


def test_only_ray_dpo_lines_of_a_batch_are_kept():
    lines = [PG_CLEANER, REPORT, "[ray_dpo] step 1/6 (17%) | loss 0.6931 | ETA ?",
             "[ray_dpo.reference] reference actor 0 failed on batch 3: boom",
             "Loading weights: 100%|##########| 20/20", "", "ray_dpo without brackets"]
    assert console.own_lines(batch(lines)) == lines[2:4]
    assert console.own_lines(batch([])) == []
    assert console.own_lines({"lines": None}) == []


def test_printer_writes_own_lines_to_the_stream_the_worker_used(capsys):
    console._print_own_lines(batch([PG_CLEANER, "[ray_dpo] step 2/6"]))
    console._print_own_lines(batch([REPORT, "[ray_dpo.feeder] reference scoring failed: x"], is_err=True))
    console._print_own_lines(batch([PG_CLEANER] * 3))
    out, err = capsys.readouterr()
    assert out == "[ray_dpo] step 2/6\n"
    assert err == "[ray_dpo.feeder] reference scoring failed: x\n"


def test_installed_filter_replaces_rays_printer_under_its_name(monkeypatch):
    from ray._private import ray_logging

    dispatcher = ray_logging.WorkerStandardStreamDispatcher()
    monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", dispatcher)
    assert console.install_console_filter() is False  # nothing to replace: log_to_driver off
    seen = []
    dispatcher.add_handler("ray_print_logs", seen.append)
    assert console.install_console_filter() is True
    assert [name for name, _ in dispatcher.handlers] == ["ray_print_logs"]
    dispatcher.emit(batch([PG_CLEANER]))
    assert seen == []


def test_worker_logging_prefixes_ray_dpo_records_once(capsys):
    log = logging.getLogger("ray_dpo")
    saved = (list(log.handlers), log.level, log.propagate)
    try:
        console.setup_worker_logging()
        console.setup_worker_logging()  # a second hook call adds no second handler
        logging.getLogger("ray_dpo.reference").warning("actor %d restarted", 1)
        err = capsys.readouterr().err
        assert err == "[ray_dpo.reference] actor 1 restarted\n"
        assert console.is_own_line(err)
    finally:
        log.handlers[:] = saved[0]
        log.setLevel(saved[1])
        log.propagate = saved[2]


WORKER_DIED = ("A worker died or was killed while executing a task by an unexpected system error. To "
               "troubleshoot the problem, check the logs for the dead worker. Worker PID: 4646")
RETRY = ("Task _CoordinatorActor.advance failed. There are infinite retries remaining, so the task "
         "will be retried. Error: The actor is temporarily unavailable")


NODE_DEAD = ("The node with node id: 8cd9799c59fcd1835f0cacdef9abdba56e9d668bf364529111cb6b19 and address: "
             "192.0.2.2 and node name: 192.0.2.2 has been marked dead because the detector has missed too many "
             "heartbeats from it. This can happen when a \t(1) raylet crashes unexpectedly (OOM, etc.)")


def test_cluster_errors_become_one_line_each_and_are_kept_whole(tmp_path):
    saved = tmp_path / "errors.log"
    lines = console.short_cluster_errors([WORKER_DIED, "", RETRY, NODE_DEAD], save_to=str(saved))
    assert lines == [  # a call Ray sends again by itself is no failure: only in the file
        f"[ray_dpo] Ray reports: A worker died or was killed while executing a task by an unexpected "
        f"system error. (full text: {saved})",
        f"[ray_dpo] Ray reports: node 192.0.2.2 (id 8cd9799c) is dead: the detector has missed too many "
        f"heartbeats from it. (full text: {saved})"]
    assert saved.read_text() == WORKER_DIED + "\n" + RETRY + "\n" + NODE_DEAD + "\n"
    long = "x" * 500
    assert console.short_cluster_errors([long], save_to=None) == [f"[ray_dpo] Ray reports: {'x' * 197}..."]


def test_installed_filter_shortens_the_clusters_reports_and_passes_worker_output(monkeypatch, capsys):
    from ray._private import ray_logging, worker

    passed = []
    monkeypatch.setattr(worker, "print_to_stdstream", lambda data, ignore_prefix: passed.append(data))
    monkeypatch.setattr(console, "ray_log_dir", lambda: None)
    dispatcher = ray_logging.WorkerStandardStreamDispatcher()
    dispatcher.add_handler("ray_print_logs", lambda batch: None)
    monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", dispatcher)
    assert console.install_console_filter() is True
    worker.print_to_stdstream({"lines": [WORKER_DIED], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    worker.print_to_stdstream(batch(["[ray_dpo] step 1/6"]), ignore_prefix=False)
    err = capsys.readouterr().err
    assert err == ("[ray_dpo] Ray reports: A worker died or was killed while executing a task by an "
                   "unexpected system error.\n")
    assert passed == [batch(["[ray_dpo] step 1/6"])]


def test_a_recording_keeps_prints_and_log_records_and_cuts_the_middle(capsys):
    with console.Recording(limit=200) as recording:
        print("[ray_dpo] first line")
        logging.getLogger("ray_dpo.test").warning("a warning %d", 7)
        for i in range(50):
            print(f"line {i:02d}")
    text = recording.text()
    assert text.startswith("[ray_dpo] first line\n[ray_dpo.test] a warning 7\n")
    assert text.endswith("line 49\n") and "line 20\n" not in text and "characters left out" in text
    assert "line 49" in capsys.readouterr().out  # the console still gets everything
    print("after")
    assert "after" not in recording.text()


def test_the_console_check_the_run_tests_use_names_what_is_missing_and_what_is_noise():
    from console_checks import console_problems

    clean = ("[ray_dpo] step 1/2 (50%) | loss 0.69\n[ray_dpo] step 2/2 (100%) | loss 0.68\n"
             "[ray_dpo] done: 2 steps in 9s\n")
    assert console_problems(clean, steps=2) == []
    noisy = clean.replace("[ray_dpo] step 2/2", "Reporting training result {'pair_ids': []}\n[ray_dpo] step 9/9")
    problems = console_problems(noisy, steps=2)
    assert any("noise 'Reporting training result'" in p for p in problems)
    assert "no progress line for step 2/2" in problems


def test_held_errors_stay_off_the_console_unless_released():
    log = logging.getLogger("ray.data.test_held")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    parent = logging.getLogger("ray.data")
    parent.addHandler(handler)
    try:
        with console.HeldErrors() as held:
            log.error("Exception occurred in Ray Data internal code")
            log.warning("a warning still prints")
        assert stream.getvalue() == "a warning still prints\n"
        held.release()  # the error was not one ray_dpo said in its own line
        assert stream.getvalue() == "a warning still prints\nException occurred in Ray Data internal code\n"
        log.error("after the block")
        assert stream.getvalue().endswith("after the block\n")
    finally:
        parent.removeHandler(handler)


def test_native_lines_around_a_call_are_dropped_and_the_rest_of_its_stderr_kept(capfd):
    import os

    from ray_dpo.console import RESTART_ARGS_NOTICE, without_native_lines

    with without_native_lines(RESTART_ARGS_NOTICE):
        # What Ray's core worker writes to fd 2 itself, then another line of the same call.
        os.write(2, f"[2026-12-07 E 1 1] core_worker.cc:2465: Actor with class name: 'X' {RESTART_ARGS_NOTICE}."
                    f" If the arguments go out of scope...\n".encode())
        os.write(2, b"something else on stderr\n")
    os.write(2, b"after the block\n")
    err = capfd.readouterr().err
    assert RESTART_ARGS_NOTICE not in err
    assert err == "something else on stderr\nafter the block\n"
