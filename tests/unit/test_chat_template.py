"""model.chat_template: one resolver (file or inline Jinja) and the template in the export."""

import json

import pytest
from transformers import AutoTokenizer

from ray_dpo.data.chat_template import (
    ChatTemplateSourceError,
    export_tokenizer,
    is_inline_template,
    resolve_chat_template,
)
from ray_dpo.testing.assets import CHAT_TEMPLATE

OVERRIDE = CHAT_TEMPLATE.replace("{{ '\n' }}", "{{ '\n\n' }}")  # another turn separator


def test_resolve_inline_file_and_errors(tmp_path):
    assert resolve_chat_template(None) is None
    assert resolve_chat_template(OVERRIDE) == OVERRIDE and is_inline_template(OVERRIDE)
    path = tmp_path / "t.jinja"
    path.write_text(OVERRIDE)
    assert resolve_chat_template(str(path)) == OVERRIDE
    with pytest.raises(ChatTemplateSourceError, match=r"^model\.chat_template: 'nope\.jinja' is not a file nor"):
        resolve_chat_template("nope.jinja")
    with pytest.raises(ChatTemplateSourceError, match=r"^model\.chat_template: inline Jinja .* does not compile"):
        resolve_chat_template("{% if x %}")


def test_export_writes_the_trained_template_next_to_the_weights(tiny_assets, tmp_path):
    assert OVERRIDE != CHAT_TEMPLATE
    out = tmp_path / "hf_model"
    export_tokenizer(tiny_assets["tokenizer"], str(out), chat_template=OVERRIDE)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == OVERRIDE
    assert (out / "chat_template.jinja").read_text() == OVERRIDE
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == OVERRIDE  # transformers versions that ignore the .jinja file
    # A template file path works the same; no override keeps the tokenizer's own.
    path = tmp_path / "t.jinja"
    path.write_text(OVERRIDE)
    export_tokenizer(tiny_assets["tokenizer"], str(tmp_path / "from_file"), chat_template=str(path))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "from_file")).chat_template == OVERRIDE
    export_tokenizer(tiny_assets["tokenizer"], str(tmp_path / "plain"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "plain")).chat_template == CHAT_TEMPLATE
