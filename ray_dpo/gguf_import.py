"""Import a local GGUF file (llama.cpp's format) as a plain Hugging Face model directory.

Training needs full-precision weights and a directory that ``from_pretrained``, DeepSpeed,
the reference actors and vLLM all read. GGUF files are usually quantized (Q4_1, Q8_0, ...):
transformers can read them (through the ``gguf`` package) and dequantizes every tensor on
load, but the model it returns still carries a GGUF ``quantization_config`` that would
follow it into ``save_pretrained``. So: load dequantized in the requested dtype, copy the
weights into a plain model built from the same config minus that entry, and save model and
tokenizer (with the chat template the GGUF file carries) side by side.

    ray-dpo import-gguf path/to/model.Q4_1.gguf --out models/smollm2-135m

The directory is written under a temporary name and renamed at the end, and it records
where it came from (``ray_dpo_import.json``): an existing complete import of the same file
is reused, a half-written one is never mistaken for a model.

Dequantizing does not bring back the precision the quantization removed: the imported model
behaves like the quantized one, in full precision. That is the right starting point for
fine-tuning it.

Pure of ray / deepspeed / vllm; torch and transformers are imported inside the function.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

from ray_dpo.dtypes import DTYPES, torch_dtype

MARKER = "ray_dpo_import.json"


class GGUFImportError(ValueError):
    """The file cannot be imported; the message says why and how to fix it."""


def import_gguf(gguf_file: str, out_dir: str, *, dtype: str = "fp32", overwrite: bool = False,
                log=print) -> str:
    """Write ``gguf_file`` as a Hugging Face model + tokenizer directory at ``out_dir``.

    Returns ``out_dir``. A complete earlier import of the same file (same name and SHA-256)
    is kept as is unless ``overwrite``. Raises GGUFImportError on a missing file, a missing
    ``gguf`` package or an architecture transformers cannot read from GGUF.
    """
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype={dtype!r}: valid values are {', '.join(DTYPES)}")
    gguf_file = os.path.abspath(os.path.expanduser(gguf_file))
    if not os.path.isfile(gguf_file):
        raise GGUFImportError(f"{gguf_file}: no such file (give the path of a .gguf file)")
    source = {"gguf_file": os.path.basename(gguf_file), "sha256": _sha256(gguf_file), "dtype": dtype}
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if not overwrite and _same_import(out_dir, source):
        log(f"[ray_dpo] {out_dir} already holds this import of {os.path.basename(gguf_file)}; "
            "reusing it (--overwrite to redo)")
        return out_dir
    if os.path.exists(out_dir) and not overwrite:
        raise GGUFImportError(f"{out_dir} exists and is not an import of {gguf_file}; "
                              "choose another --out or pass --overwrite")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise GGUFImportError("reading GGUF files needs the `gguf` package: "
                              "pip install gguf (ray_dpo[real] installs it)") from err

    t0 = time.monotonic()
    log(f"[ray_dpo] reading {os.path.basename(gguf_file)} (dequantizing every tensor to {dtype}) ...")
    model, tokenizer = _load_plain(gguf_file, dtype)
    _write_atomically(out_dir, model, tokenizer, source)
    params = sum(p.numel() for p in model.parameters())
    log(f"[ray_dpo] wrote {out_dir}: {model.config.model_type}, {params / 1e6:.0f}M parameters, {dtype}, "
        f"vocab {len(tokenizer)}, chat template: {'yes' if tokenizer.chat_template else 'no'} "
        f"({time.monotonic() - t0:.0f}s)")
    return out_dir


def _load_plain(gguf_file: str, dtype: str):
    """(model without the GGUF quantization_config, tokenizer) read from ``gguf_file``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_file)
    target = torch_dtype(dtype)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=target)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError) as err:  # e.g. "GGUF model with architecture X is not supported"
        raise GGUFImportError(f"{gguf_file}: transformers cannot import it: {err}") from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = target
    plain = type(loaded)(config).to(target)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings are not separate tensors in the state dict: allowed to be missing.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise GGUFImportError(f"{gguf_file}: weights do not match the architecture "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return plain, tokenizer


def _write_atomically(out_dir: str, model, tokenizer, source: dict) -> None:
    """Model, tokenizer and the import marker under a temporary name, then renamed."""
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
        json.dump(source, f, indent=1)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _same_import(out_dir: str, source: dict) -> bool:
    try:
        with open(os.path.join(out_dir, MARKER), encoding="utf-8") as f:
            return json.load(f) == source
    except (OSError, ValueError):
        return False
