"""Judging a regular expression before it is searched with: no catastrophic backtracking.

A state file's name pattern (``monitor_pattern``) is hostile input (:mod:`zetaguard._state_checks`
checks it with :func:`check_pattern`), and Python's ``re`` cannot interrupt a search that
backtracks for ever, so the pattern's structure is judged instead.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

MAX_PATTERN = 1000  # characters
MAX_UNBOUNDED_REPEATS = 3  # polynomial backtracking: cost grows as len(name) ** (repeats + 1)


class UnsafePattern(ValueError):
    """A pattern refused by :func:`check_pattern`; the message names what to change."""


try:  # Python 3.11+; sre_parse before (both are the re module's own parser)
    _sre: Any = importlib.import_module("re._parser")
    _sre_c: Any = importlib.import_module("re._constants")
except ImportError:  # pragma: no cover - Python 3.10
    _sre = importlib.import_module("sre_parse")
    _sre_c = importlib.import_module("sre_constants")

_REPEATS = {_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT} | (
    {_sre_c.POSSESSIVE_REPEAT} if hasattr(_sre_c, "POSSESSIVE_REPEAT") else set()
)
_REFS = {_sre_c.GROUPREF, _sre_c.GROUPREF_EXISTS} | (
    {_sre_c.GROUPREF_IGNORE} if hasattr(_sre_c, "GROUPREF_IGNORE") else set()
)


def check_pattern(pattern: str) -> None:
    """Refuse a regular expression that can backtrack catastrophically on a parameter name.

    Python's ``re`` backtracks, and a search cannot be interrupted, so the pattern is judged
    by its structure before it is used: a repeat inside a repeat (``(a+)+``, the exponential
    case), an alternation inside a repeat (``(a|a)*``), backreferences, and more than
    ``MAX_UNBOUNDED_REPEATS`` unbounded repeats (``.*a.*b.*c.*d``: polynomial of that degree)
    are refused. Raises :class:`UnsafePattern` naming what to change.
    """
    if len(pattern) > MAX_PATTERN:
        raise UnsafePattern(f"the name pattern is {len(pattern)} characters, over {MAX_PATTERN}")
    try:
        tree = _sre.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise UnsafePattern(
            f"the name pattern {pattern!r} is not a valid regular expression: {e}"
        ) from e
    unbounded = _walk(tree, pattern, inside_repeat=False)
    if unbounded > MAX_UNBOUNDED_REPEATS:
        raise UnsafePattern(
            f"the name pattern {pattern!r} has {unbounded} unbounded repeats (* + {{n,}}); at "
            f"most {MAX_UNBOUNDED_REPEATS} keep matching fast. Simplify it"
        )


def _walk(items: Any, pattern: str, inside_repeat: bool) -> int:
    unbounded = 0
    for op, av in items:
        if op in _REFS:
            raise UnsafePattern(f"the name pattern {pattern!r} uses a backreference; remove it")
        if op in _REPEATS:
            _, hi, body = av
            repeats = hi > 1
            if repeats and inside_repeat:
                raise UnsafePattern(
                    f"the name pattern {pattern!r} nests a repeat inside a repeat (like "
                    "(a+)+), which can backtrack for ever; repeat a character class instead"
                )
            if hi == _sre_c.MAXREPEAT:
                unbounded += 1
            unbounded += _walk(body, pattern, inside_repeat or repeats)
        elif op == _sre_c.BRANCH:
            if inside_repeat:
                raise UnsafePattern(
                    f"the name pattern {pattern!r} repeats an alternation (like (a|b)+), which "
                    "can backtrack for ever; use a character class ([ab]+) or one alternation "
                    "outside the repeat"
                )
            for branch in av[1]:
                unbounded += _walk(branch, pattern, inside_repeat)
        elif op == _sre_c.SUBPATTERN:
            unbounded += _walk(av[-1], pattern, inside_repeat)
        elif op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
            unbounded += _walk(av[1], pattern, inside_repeat)
        elif hasattr(_sre_c, "ATOMIC_GROUP") and op == _sre_c.ATOMIC_GROUP:
            unbounded += _walk(av, pattern, inside_repeat)
    return unbounded
