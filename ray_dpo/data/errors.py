"""DataError, and Ray Data task errors turned back into the errors the data code raised.

Ray Data 2.60 (measured): by default a UDF's exception reaches the driver as
RayTaskError(UserCodeException) with the original exception only as traceback text; with
``raise_original_map_exception`` it is RayTaskError(<original type>), whose message still
carries Ray's retry note (``unwrapped_errors`` cuts it off).

Pure: imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

from typing import Optional

from ray_dpo.data.formats import BadRowError
from ray_dpo.data.tokenize import ChatTemplateError

_RAY_RETRY_NOTE = "\nFailed to apply UDF transform"


class DataError(ValueError):
    """Unusable input data: the message names the file (and line) and how to fix it."""

    def __reduce__(self):  # picklable across Ray processes with its message intact
        return (DataError, (str(self),))


class unwrapped_errors:
    """Re-raise errors of Ray Data tasks as the original DataError / ChatTemplateError.

    Ray wraps a UDF's exception in RayTaskError (a subclass of the original type when
    ``raise_original_map_exception`` is on) and appends a retry note to its message.
    """

    def __enter__(self):
        from ray_dpo.console import HeldErrors

        # Ray Data logs a failed task's traceback (~150 lines, "please open an issue") before
        # the error reaches here; held back while it may be one this says in one line.
        self._held = HeldErrors().__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._held.__exit__()
        original = _find_original(exc) if isinstance(exc, Exception) else None
        if original is None:
            self._held.release()  # not a data error ray_dpo explains: Ray's own report stands
            return False
        message = str(original.args[0]) if original.args else str(original)
        message = message.split(_RAY_RETRY_NOTE, 1)[0]
        if isinstance(original, BadRowError):
            message = f"{original.source}:{original.line}: {original.problem}"
        cls = ChatTemplateError if isinstance(original, ChatTemplateError) else DataError
        raise cls(message) from None


def _find_original(exc: BaseException) -> Optional[BaseException]:
    wanted = (DataError, BadRowError, ChatTemplateError)
    todo, seen = [exc], set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # RayTaskError keeps the original here
        if isinstance(current, wanted) and not isinstance(cause, wanted):
            return current
        todo += [cause, current.__cause__, current.__context__]
    return None
