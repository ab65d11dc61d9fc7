"""``model.chat_template``: where the template comes from, and where it goes.

The value is either the path of a Jinja template file or the template itself, inline
(``--set "model.chat_template={% for m in messages %}..."`` or a YAML block scalar). A
value containing ``{%`` or ``{{`` is inline; anything else must be an existing file. One
function, ``resolve_chat_template``, turns the value into template text for everything
that renders chats: config validation, the data pipeline, the online coordinator and the
Hugging Face export (so the exported model carries the template it was trained with).

This module is pure: it imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

KEY = "model.chat_template"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""File name transformers (>= 4.43) reads the default chat template from; it takes
priority over ``chat_template`` in tokenizer_config.json."""
TOKENIZER_CONFIG = "tokenizer_config.json"
# Tokenizer files copied next to exported weights (whatever the tokenizer type).
TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges",
                           "chat_template", "spiece", "sentencepiece")


class ChatTemplateSourceError(ValueError):
    """``model.chat_template`` is neither a readable template file nor inline Jinja."""


def is_inline_template(value: str) -> bool:
    """Whether ``value`` is the template itself rather than a path (it has Jinja markup)."""
    return "{%" in value or "{{" in value


def template_problem(value: Optional[str], *, check_files: bool = True) -> Optional[str]:
    """Why ``value`` is not a usable ``model.chat_template`` (None: it is usable).

    Inline templates are compiled (a syntax error names its line); paths must exist
    unless ``check_files`` is off (e.g. a path that only exists inside a pod).
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        return ("is empty; give a Jinja template file or an inline template, or remove the key "
                "to use the tokenizer's own template")
    if is_inline_template(value):
        import jinja2

        try:
            jinja2.Environment().parse(value)
        except jinja2.TemplateSyntaxError as err:
            return (f"inline Jinja template does not compile: {err.message} (template line "
                    f"{err.lineno}); fix the template or give the path of a template file")
        return None
    if check_files and not os.path.isfile(os.path.expanduser(value)):
        return (f"{value!r} is not a file nor an inline Jinja template (no '{{%' or '{{{{' in it); "
                "give the path of a Jinja chat template file or the template text itself")
    return None


def resolve_chat_template(value: Optional[str]) -> Optional[str]:
    """The template text of a ``model.chat_template`` value (None stays None).

    Raises ChatTemplateSourceError (message starts with "model.chat_template: ") when the
    value is neither inline Jinja nor an existing file, or the file cannot be read.
    """
    if value is None:
        return None
    problem = template_problem(value)
    if problem is not None:
        raise ChatTemplateSourceError(f"{KEY}: {problem}")
    if is_inline_template(value):
        return value
    path = os.path.expanduser(value)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ChatTemplateSourceError(f"{KEY}: cannot read {value!r}: {err}") from err


def export_tokenizer(source: str, out_dir: str, *, chat_template: Optional[str] = None,
                     trust_remote_code: bool = False) -> None:
    """Tokenizer files of ``source`` into ``out_dir`` (next to exported weights), with the
    chat template the model was trained with.

    ``source``: a tokenizer directory (its tokenizer files are copied as they are) or a hub
    id (loaded and saved with transformers). ``chat_template``: a ``model.chat_template``
    value (path or inline); when given it replaces the source's template in
    chat_template.jinja and tokenizer_config.json (and a processor's chat_template.json),
    so old and new transformers (and vLLM) load the same template.
    """
    os.makedirs(out_dir, exist_ok=True)
    template = resolve_chat_template(chat_template)
    if os.path.isdir(source):
        for name in sorted(os.listdir(source)):
            path = os.path.join(source, name)
            wanted = name.startswith(TOKENIZER_FILE_PREFIXES) or name.endswith((".model", ".tiktoken"))
            if wanted and os.path.isfile(path):
                shutil.copy2(path, os.path.join(out_dir, name))
    else:  # a hub id: let transformers fetch and re-save it
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code).save_pretrained(out_dir)
    if template is None:
        return
    with open(os.path.join(out_dir, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
        f.write(template)
    # chat_template.json: the processor-style file some multimodal repos ship.
    for name in (TOKENIZER_CONFIG, "chat_template.json"):
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config["chat_template"] = template
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
