"""Tiny offline assets: a synthetic preference task, a word-level tokenizer, a random Llama.

Everything is built locally (no hub downloads), deterministically for a seed, in seconds:
tests, CI and the README demo run on it.

The task has a known, learnable preference. The vocabulary is split into GOOD_WORDS,
BAD_WORDS and neutral words; prompts are short instructions made of neutral words;
chosen responses use mostly good words and rejected ones mostly bad words (3-12 words,
with noise). ``judge_score`` (fraction of good words) is the matching function judge for
online DPO, and a trained policy should raise it.

Layout written by ``make_tiny_assets(out_dir)``:

    out_dir/tokenizer/                 tokenizer files
    out_dir/model/                     config, model.safetensors, tokenizer files
    out_dir/data/train-0000K.jsonl     training shards
    out_dir/data/eval.jsonl            held-out pairs
    out_dir/assets.json                manifest, written last (marks a complete build)

This module is pure (no ray / deepspeed / vllm). torch, tokenizers and transformers are
imported inside the builders only, so a judge that imports ``judge_score`` stays light.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Union

GOOD_WORDS = (
    "bright", "calm", "clear", "kind", "warm", "gentle", "honest", "brave", "clever",
    "cheerful", "generous", "patient", "helpful", "careful", "graceful", "joyful", "lively",
    "loyal", "polite", "proud", "sincere", "steady", "sunny", "tidy", "wise", "fresh",
    "golden", "hopeful", "lovely", "merry", "neat", "noble", "peaceful", "pleasant",
    "radiant", "smooth", "sweet", "thoughtful", "vivid", "witty",
)
BAD_WORDS = (
    "angry", "bitter", "broken", "cruel", "dull", "filthy", "gloomy", "greedy", "grim",
    "harsh", "hostile", "lazy", "messy", "nasty", "noisy", "rotten", "rude", "rusty",
    "selfish", "sloppy", "smelly", "sour", "stale", "stingy", "sulky", "tense", "ugly",
    "vague", "weary", "wicked", "awful", "bleak", "clumsy", "dreary", "foul", "grumpy",
    "moldy", "murky", "shabby", "toxic",
)
NEUTRAL_WORDS = (
    "river", "mountain", "garden", "village", "window", "table", "letter", "morning",
    "evening", "market", "bridge", "forest", "harbor", "kitchen", "library", "meadow",
    "station", "street", "tower", "valley", "cloud", "stone", "paper", "lamp", "boat",
    "road", "field", "house", "door", "chair", "the", "a", "of", "about", "near", "with",
    "and", "for", "in", "on",
)
INSTRUCTION_WORDS = ("describe", "write", "tell", "explain", "imagine", "list", "sketch", "summarize")
VOCABULARY = tuple(sorted(set(GOOD_WORDS + BAD_WORDS + NEUTRAL_WORDS + INSTRUCTION_WORDS)))

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "[UNK]"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK) + ROLE_TOKENS  # ids 0..6, in this order

# Prefix-stable by construction: the generation prompt is exactly the assistant header,
# and every turn renders the same whatever follows it. The end-of-turn marker is EOS, so
# a response's tokens end with EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('the tiny chat template supports system, user and assistant roles') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_P_MAIN, _P_NEUTRAL = 0.8, 0.15  # response word mix: main class / neutral / opposite (5%)
_GOOD_SET = frozenset(GOOD_WORDS)
_MANIFEST = "assets.json"
_ASSETS_VERSION = 2  # 2: head_dim 32 (was 16); older builds are rebuilt
_HIDDEN_SIZE, _NUM_LAYERS = 64, 2  # the tiny model of make_tiny_assets
# vLLM's CPU attention kernels support head_dim 32..512 only, so the tiny model's heads
# are 32 wide: the vLLM engine tests run on the same model as everything else.
_HEAD_DIM = 32

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- task


def judge_score(prompt: Any, completion: str) -> float:
    """Fraction of the completion's words that are GOOD_WORDS, in [0, 1]; 0 if empty.

    ``prompt`` is ignored (the preference does not depend on it); it is in the signature
    so this works as a function judge ``(prompt, completion) -> score``.
    """
    words = [w.strip(".,;:!?").lower() for w in completion.split()]
    words = [w for w in words if w]
    return sum(w in _GOOD_SET for w in words) / len(words) if words else 0.0


def _response(rng: random.Random, main: tuple[str, ...], opposite: tuple[str, ...]) -> str:
    words = []
    for _ in range(rng.randint(3, 12)):
        r = rng.random()
        pool = main if r < _P_MAIN else NEUTRAL_WORDS if r < _P_MAIN + _P_NEUTRAL else opposite
        words.append(rng.choice(pool))
    return " ".join(words)


def _rows(n: int, rng: random.Random, fmt: str) -> list[dict]:
    if fmt not in ("standard", "conversational"):
        raise ValueError(f"fmt must be 'standard' or 'conversational', got {fmt!r}")
    rows = []
    while len(rows) < n:
        prompt = " ".join(
            [rng.choice(INSTRUCTION_WORDS)] + rng.choices(NEUTRAL_WORDS, k=rng.randint(2, 6))
        )
        chosen = _response(rng, GOOD_WORDS, BAD_WORDS)
        rejected = _response(rng, BAD_WORDS, GOOD_WORDS)
        if chosen == rejected:  # astronomically rare, but a pair must differ
            continue
        if fmt == "standard":
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            rows.append({
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            })
    return rows


def make_preference_rows(n: int, *, seed: int, fmt: str = "standard") -> list[dict]:
    """``n`` synthetic preference rows, deterministic for ``seed``.

    fmt: "standard" (prompt/chosen/rejected strings) or "conversational" (one user
    message; one assistant message per response).
    """
    return _rows(n, random.Random(seed), fmt)


def unpaired_rows(pairs: list[dict], fmt: str = "unpaired") -> list[dict]:
    """Standard preference rows -> KTO examples, two per pair (chosen desirable, rejected
    undesirable), in that order. fmt: "unpaired" (TRL: prompt, completion, label) or
    "sharegpt_kto" (LLaMA-Factory: conversations of {from, value} + kto_tag)."""
    if fmt not in ("unpaired", "sharegpt_kto"):
        raise ValueError(f"fmt must be 'unpaired' or 'sharegpt_kto', got {fmt!r}")
    out = []
    for pair in pairs:
        for completion, label in ((pair["chosen"], True), (pair["rejected"], False)):
            if fmt == "unpaired":
                out.append({"prompt": pair["prompt"], "completion": completion, "label": label})
            else:
                out.append({"conversations": [{"from": "human", "value": pair["prompt"]},
                                              {"from": "gpt", "value": completion}], "kto_tag": label})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_dataset(
    out_dir: PathLike, *, n_train: int, n_eval: int, seed: int, shards: int = 2,
    fmt: str = "standard",
) -> dict:
    """Write ``train-00000.jsonl`` ... (``shards`` contiguous shards) and ``eval.jsonl``.

    Train and eval come from separate seeded streams, so eval does not change with
    n_train. Returns ``{"train_files": [paths], "eval_file": path}``.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # String seeds hash with SHA-512 in random.seed: stable across processes and runs.
    train = _rows(n_train, random.Random(f"ray_dpo.tiny.train.{seed}"), fmt)
    evals = _rows(n_eval, random.Random(f"ray_dpo.tiny.eval.{seed}"), fmt)
    train_files = []
    for k in range(shards):
        path = out / f"train-{k:05d}.jsonl"
        _write_jsonl(path, train[k * n_train // shards:(k + 1) * n_train // shards])
        train_files.append(str(path))
    eval_file = out / "eval.jsonl"
    _write_jsonl(eval_file, evals)
    return {"train_files": train_files, "eval_file": str(eval_file)}


# --------------------------------------------------------------------------- tokenizer / model


def build_tiny_tokenizer(out_dir: PathLike):
    """Word-level tokenizer over VOCABULARY, saved to ``out_dir``; returns it.

    Ids: SPECIAL_TOKENS first (pad 0, bos 1, eos 2, unk 3, roles 4-6), then VOCABULARY
    in sorted order. The vocabulary is given, not learned from a corpus, so ids do not
    depend on word frequencies. Plain text gets BOS prepended (like Llama); chat text
    uses CHAT_TEMPLATE. Loads back with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + VOCABULARY)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    bos_id = vocab[BOS]
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_tiny_model(
    out_dir: PathLike, tokenizer: Any, *, seed: int = 0, hidden_size: int = _HIDDEN_SIZE,
    num_layers: int = _NUM_LAYERS,
) -> str:
    """Random ``LlamaForCausalLM`` (tied embeddings, fp32) saved as safetensors; returns the dir.

    Attention heads are 32 wide (``hidden_size // 32`` heads, at least one), the smallest
    head_dim vLLM's CPU attention supports: hidden 64 gives 2 heads of 32.

    Written with safetensors + config directly rather than ``model.save_pretrained``:
    the latter goes through accelerate's unwrap, which imports deepspeed (seconds, and
    this module promises not to). Loads with ``AutoModelForCausalLM.from_pretrained``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    heads = _num_heads(hidden_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    with torch.random.fork_rng(devices=[]):  # seed the init without touching global RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"  # tied to model.embed_tokens.weight
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes it owner-only
    config.save_pretrained(str(out))
    GenerationConfig.from_model_config(config).save_pretrained(str(out))
    return str(out)


def build_tiny_reward_model(out_dir: PathLike, tokenizer: Any, *, num_labels: int = 1, seed: int = 0) -> str:
    """Random ``LlamaForSequenceClassification`` (``num_labels`` outputs; 1 for a reward model,
    online.judge.reward_model) on ``tokenizer``, saved with it to ``out_dir``; returns the dir.
    Its scores are arbitrary but fixed for a seed: enough to run the reward-model judge."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.architectures = ["LlamaForSequenceClassification"]
    with torch.random.fork_rng(devices=[]):  # seed the init without touching global RNG
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


def _num_heads(hidden_size: int) -> int:
    return max(1, hidden_size // _HEAD_DIM)


# --------------------------------------------------------------------------- all at once


def _paths(root: Path, shards: int) -> dict:
    data = root / "data"
    return {
        "root": str(root),
        "tokenizer": str(root / "tokenizer"),
        "model": str(root / "model"),
        "data": str(data),
        "train_files": [str(data / f"train-{k:05d}.jsonl") for k in range(shards)],
        "train_glob": str(data / "train-*.jsonl"),
        "eval_file": str(data / "eval.jsonl"),
    }


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def make_tiny_assets(
    out_dir: PathLike, *, n_train: int = 512, n_eval: int = 128, seed: int = 0,
    fmt: str = "standard", shards: int = 2,
) -> dict:
    """Build tokenizer, model and data under ``out_dir``; returns their paths.

    Idempotent: a complete build with the same parameters is reused as is. The build
    goes to a temporary sibling directory that is renamed into place, so concurrent
    callers (several test processes, a demo) never see a half-written directory.
    ``out_dir`` must be new, empty, or an earlier build (rebuilt if parameters differ).

    Returns ``{"root", "tokenizer", "model", "data", "train_files", "train_glob",
    "eval_file"}`` (strings; train_files a list). The model dir holds the tokenizer too,
    so ``model.name_or_path`` alone is enough.
    """
    root = Path(out_dir).resolve()
    params = {"version": _ASSETS_VERSION, "n_train": n_train, "n_eval": n_eval, "seed": seed,
              "fmt": fmt, "shards": shards, "hidden_size": _HIDDEN_SIZE, "num_layers": _NUM_LAYERS,
              "num_attention_heads": _num_heads(_HIDDEN_SIZE)}
    if (_read_manifest(root) or {}).get("params") == params:
        return _paths(root, shards)
    if root.exists() and any(root.iterdir()) and _read_manifest(root) is None:
        raise ValueError(
            f"{root} exists and is not a tiny-assets directory; pass a new or empty directory"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        tokenizer = build_tiny_tokenizer(tmp / "tokenizer")
        build_tiny_model(tmp / "model", tokenizer, seed=seed, hidden_size=_HIDDEN_SIZE, num_layers=_NUM_LAYERS)
        tokenizer.save_pretrained(str(tmp / "model"))
        write_dataset(tmp / "data", n_train=n_train, n_eval=n_eval, seed=seed, shards=shards, fmt=fmt)
        (tmp / _MANIFEST).write_text(json.dumps({"params": params}, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the result is a normal directory
        _move_into_place(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root, shards)


def _move_into_place(tmp: Path, root: Path, params: dict) -> None:
    if _read_manifest(root) is not None and _read_manifest(root).get("params") != params:
        shutil.rmtree(root)  # an earlier build with other parameters (we wrote it)
    try:
        os.rename(tmp, root)  # atomic; also replaces an empty directory
    except OSError:
        # Someone else finished first: fine if their build matches ours.
        if (_read_manifest(root) or {}).get("params") != params:
            raise
