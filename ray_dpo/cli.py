"""ray-dpo command line: train | sweep | validate | compare | make-assets | import-gguf | merge-lora | k8s.

Exit codes: 0 success, 1 the run failed, 2 the config (or the command line) is wrong.
Heavy imports (ray, deepspeed, mlflow) happen inside the commands that need them, so
``ray-dpo validate`` answers in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ray_dpo.config import ConfigError, load_config, to_yaml
from ray_dpo.config.secrets import credentials, redact_config
from ray_dpo.config.trust import executes
from ray_dpo.console import LOG_FORMAT, RedactingStream, RedactRecords
from ray_dpo.dtypes import DTYPES

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML, e.g. configs/tiny-cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set loss.beta=0.2 (repeatable)")


def _add_grid_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep over a config key, e.g. --grid loss.beta=0.05,0.1,0.3 (repeatable; adds to or "
                        "replaces the config's sweep.grid)")


def _load(args: argparse.Namespace):
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        print("Fix the keys above (see configs/ for annotated examples) and run again.", file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return EXIT_BAD_CONFIG
    if _is_sweep(cfg) or args.grid:  # every trial's config is checked too, as `ray-dpo sweep` would
        trials = _sweep_trials(cfg, args)
        if trials is None:
            return EXIT_BAD_CONFIG
        print(f"# {args.config}: valid, and so are the {len(trials)} trial(s) of its sweep section:")
        for trial in trials:
            print(f"#   {trial.name}: {trial.label}")
    else:
        print(f"# {args.config}: valid. Resolved config:")
    for key, what in executes(cfg):
        print(f"# runs code: {key}: {what}")
    for key, what in credentials(cfg):
        print(f"# warning: {key} holds {what}: it is shown as *** here, in MLflow and on the console, "
              f"and `ray-dpo k8s` refuses it; put the credential in the environment instead (docs/deploy.md)")
    if warning := _storage_warning(cfg):
        print(f"# warning: {warning}")
    print(to_yaml(redact_config(cfg)), end="")
    return EXIT_OK


def _storage_warning(cfg):
    """run.storage_path on one node's disk while the config pins roles to node pools."""
    from ray_dpo import faults, topology

    pinned = list(dict.fromkeys(f"{role.key}.resources" for role in topology.roles(cfg, use_gpu=False)
                                if role.resources))
    path = cfg.run.storage_path
    return faults.storage_warning(path, spread=f"roles pinned to node pools ({', '.join(pinned)})" if pinned else None,
                                  fs_type=faults.mount_type(path))


def _is_sweep(cfg) -> bool:
    return bool(cfg.sweep.grid or cfg.sweep.sample)


def _sweep_trials(cfg, args: argparse.Namespace):
    """The sweep's trials, every config checked; None (errors printed) if any is wrong."""
    from ray_dpo.sweep.trials import expand, grid_args

    try:
        return expand(cfg, grid=grid_args(getattr(args, "grid", None) or []), source=args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        print("Fix the sweep's values above (they are applied to the config like --set) and run again.",
              file=sys.stderr)
        return None


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return EXIT_BAD_CONFIG
    trials = _sweep_trials(cfg, args)
    if trials is None:
        return EXIT_BAD_CONFIG
    from ray_dpo.sweep.runner import print_summary, run_sweep

    try:
        summary = run_sweep(cfg, trials)
    except KeyboardInterrupt:
        print("[ray_dpo] interrupted; run the same command again: finished trials are skipped, the others "
              "resume from their checkpoints", file=sys.stderr)
        return EXIT_FAILED
    print_summary(summary, cfg.sweep.metric)
    if summary.failed:
        print(f"[ray_dpo] {len(summary.failed)} trial(s) failed; run the same command again to retry them: "
              f"{_this_command()}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return EXIT_BAD_CONFIG
    if _is_sweep(cfg):
        print("[ray_dpo] note: train runs the config as it is; its sweep section is read by `ray-dpo sweep`",
              flush=True)
    from ray_dpo.driver import run_dpo
    from ray_dpo.faults import RunFailedError

    try:
        summary = run_dpo(cfg)
    except KeyboardInterrupt:
        print("[ray_dpo] interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return EXIT_FAILED
    except RunFailedError as e:  # one line that says what to do; the traceback is in Ray's logs
        print(f"[ray_dpo] run failed: {e}: {_this_command()}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # the MLflow run is already marked FAILED by the driver
        print(f"[ray_dpo] run failed: {type(e).__name__}: {e}", file=sys.stderr)
        from ray_dpo.console import ray_log_dir

        if where := ray_log_dir():
            print(f"[ray_dpo] every process's full output: {where}", file=sys.stderr)
        return EXIT_FAILED
    _print_summary(summary)
    return EXIT_OK


def _this_command() -> str:
    """The command line that started this process, as a user would type it again."""
    import shlex

    return " ".join(shlex.quote(a) for a in ["ray-dpo", *sys.argv[1:]])


def _print_summary(s) -> None:
    print(f"[ray_dpo] done: {s.steps} steps in {s.seconds:.0f}s")
    for key in ("train/loss", "train/rewards/accuracies", "eval/loss", "eval/rewards/accuracies"):
        if key in s.final_metrics:
            print(f"[ray_dpo]   {key} = {s.final_metrics[key]:.4f}")
    for key, ((first_step, first), (last_step, last)) in s.heldout.items():
        unit = " nats/sequence" if key == "eval/kl" else ""
        print(f"[ray_dpo]   held-out {key} = {first:.4f} at step {first_step} -> {last:.4f} at step "
              f"{last_step} ({last - first:+.4f}){unit}")
    if s.adapter_path:
        print(f"[ray_dpo] final LoRA adapter (peft; PeftModel.from_pretrained or vLLM LoRA): {s.adapter_path}")
    if s.hf_model_path:
        merged = " with the LoRA adapter merged in" if s.adapter_path else ""
        print(f"[ray_dpo] final model (Hugging Face format{merged}): {s.hf_model_path}")
    print(f"[ray_dpo] MLflow run id: {s.run_id} (experiment {s.experiment!r})")
    print(f"[ray_dpo] look at it: mlflow ui --backend-store-uri {s.tracking_uri}")


def cmd_compare(args: argparse.Namespace) -> int:
    import os

    from ray_dpo.tracking.compare import ExperimentNotFound, PairedError, compare
    from ray_dpo.tracking.mlflow_sink import default_tracking_uri

    # The same default as a run whose run.storage_path is the default ./ray_dpo_runs.
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri("./ray_dpo_runs")
    out = args.out or f"compare-{args.experiment}"
    try:
        report = compare(tracking_uri=uri, experiment=args.experiment, out_dir=out,
                         paired=[tuple(pair) for pair in args.paired], step=args.step)
    except ExperimentNotFound as e:
        print(f"[ray_dpo] {e} (tracking URI {uri}; pass --tracking-uri)", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except PairedError as e:
        print(f"[ray_dpo] {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(f"# experiment {args.experiment!r} in {uri}")
    if report.table:
        print(report.table)
    if report.paired:
        print(report.paired)
    for note in report.notes:
        print(f"[ray_dpo] note: {note}")
    for path in report.files:
        print(f"[ray_dpo] wrote {path}")
    print(f"[ray_dpo] browse the runs: mlflow ui --backend-store-uri {uri}")
    return EXIT_OK


def cmd_make_assets(args: argparse.Namespace) -> int:
    from ray_dpo.testing.assets import make_tiny_assets

    paths = make_tiny_assets(args.out, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return EXIT_OK


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from ray_dpo.gguf_import import GGUFImportError, import_gguf

    try:
        import_gguf(args.gguf_file, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except GGUFImportError as e:
        print(f"[ray_dpo] {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return EXIT_OK


def cmd_merge_lora(args: argparse.Namespace) -> int:
    """A trained adapter merged into its base model: a plain Hugging Face directory."""
    import json
    import os

    from ray_dpo.config import ModelConfig
    from ray_dpo.lora import merge_adapter

    config = os.path.join(args.adapter, "adapter_config.json")
    if not os.path.exists(config):
        print(f"[ray_dpo] {args.adapter} holds no adapter_config.json: pass the adapter/ directory of a LoRA "
              "run's final checkpoint", file=sys.stderr)
        return EXIT_BAD_CONFIG
    with open(config, encoding="utf-8") as f:
        base = args.base or json.load(f).get("base_model_name_or_path")
    if not base or not os.path.exists(base):
        print(f"[ray_dpo] base model {base!r} not found: pass --base, the model.name_or_path the adapter was "
              "trained on", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if os.path.exists(args.out):
        print(f"[ray_dpo] {args.out} exists: pass another --out", file=sys.stderr)
        return EXIT_BAD_CONFIG
    merge_adapter(ModelConfig(name_or_path=base, dtype=args.dtype), args.adapter, args.out)
    from ray_dpo.data.chat_template import export_tokenizer

    export_tokenizer(args.adapter, args.out)  # the adapter's tokenizer carries the run's chat template
    print(f"[ray_dpo] merged model (Hugging Face format): {args.out}")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    """Any model on a config's yardstick: its held-out eval and pair metrics as a run's at step 0."""
    cfg = _load(args)
    if cfg is None:
        return EXIT_BAD_CONFIG
    from ray_dpo.evaluate import command

    return command(cfg, model=args.model, name=args.name, chat_mode=args.chat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-dpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_config_commands(sub)
    _add_tool_commands(sub)
    return parser


def _add_config_commands(sub) -> None:
    """The commands that take a run config: train, validate, sweep, eval, k8s."""
    p = sub.add_parser("train", help="run DPO on Ray (RAY_ADDRESS or a local cluster)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a config; print it resolved (exit 0) or its errors (exit 2)")
    _add_config_args(p)
    _add_grid_arg(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("sweep", help="run a grid of configs (sweep: section, --grid) as Ray Tune trials that "
                                     "share one reference pass; rerun to resume")
    _add_config_args(p)
    _add_grid_arg(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("eval", help="evaluate any model (HF directory, merged model or LoRA adapter) with a "
                                    "config's held-out eval and eval pairs, logged beside its runs; --chat to talk")
    _add_config_args(p)
    p.add_argument("--model", required=True, help="the model: a Hugging Face directory or a LoRA adapter/ directory")
    p.add_argument("--name", default=None, help="MLflow run name (default: eval-<model directory name>)")
    p.add_argument("--chat", action="store_true", help="talk to the model instead: stdin lines -> replies "
                                                       "(its chat template, transformers on CPU, no Ray)")
    p.set_defaults(func=cmd_eval)

    from ray_dpo import k8s  # pure (yaml + config): keeps `ray-dpo validate` fast

    p = sub.add_parser("k8s", help="print a KubeRay RayJob (or RayCluster) + ConfigMap for a config")
    _add_config_args(p)
    k8s.add_arguments(p)
    p.set_defaults(func=k8s.main)


def _add_tool_commands(sub) -> None:
    """The commands on runs, models and assets: compare, make-assets, import-gguf, merge-lora."""
    p = sub.add_parser("compare", help="table + PNG plots of an MLflow experiment's runs (offline vs online)")
    p.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.mlflow.experiment)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///./ray_dpo_runs/mlflow.db)")
    p.add_argument("--out", default=None, help="directory for the plots and summary.csv "
                                               "(default: ./compare-<experiment>)")
    p.add_argument("--paired", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="paired t-test of run A against run B (names or run-id prefixes) on their held-out "
                        "records, prompt by prompt: is A-B more than the noise? (repeatable; writes paired.csv)")
    p.add_argument("--step", type=int, default=None,
                   help="the held-out step --paired compares (default: each run's last)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("make-assets", help="build the tiny offline model, tokenizer and synthetic data")
    p.add_argument("--out", default=".tiny", help="output directory (default: .tiny)")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-eval", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_assets)

    p = sub.add_parser("import-gguf", help="convert a local GGUF file (llama.cpp) into a Hugging Face "
                                           "model directory that ray_dpo can train")
    p.add_argument("gguf_file", help="path of the .gguf file (quantized files are dequantized)")
    p.add_argument("--out", required=True, help="output directory (model + tokenizer + chat template)")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=cmd_import_gguf)

    p = sub.add_parser("merge-lora", help="merge a LoRA run's adapter/ into its base model: a plain Hugging "
                                          "Face directory (what policy.lora.merge_on_export writes)")
    p.add_argument("adapter", help="the adapter/ directory of a LoRA run's final checkpoint")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--base", default=None, help="base model directory (default: the one the adapter names)")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.set_defaults(func=cmd_merge_lora)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # the prefix the console keeps
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactRecords())  # no URL's credential in a log line
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)  # nor in a print
    try:
        return args.func(args)
    finally:
        sys.stdout, sys.stderr = saved


if __name__ == "__main__":
    sys.exit(main())
