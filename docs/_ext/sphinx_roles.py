"""Griffe extension: render the package's reST cross-reference roles as Markdown code.

The docstrings use Sphinx roles (``:func:`load_checkpoint```, ``:class:`~sphereconv.errors.ConfigError```);
Markdown has no such syntax, so each role becomes an inline code span of its target: the full dotted
name, or only its last part when the target starts with ``~`` (Sphinx's own rule), or the title of
``:role:`title <target>```.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc|const):`(?P<body>[^`]+)`")
TITLED = re.compile(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>")


def _code_span(match: re.Match[str]) -> str:
    body = match["body"].strip()
    titled = TITLED.fullmatch(body)
    if titled:
        text = titled["title"]
    elif body.startswith("~"):
        text = body[1:].rsplit(".", 1)[-1]
    else:
        text = body
    return f"``{text}``"


class SphinxRoles(Extension):
    """Rewrites every docstring's Sphinx roles when griffe creates the object."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code_span, obj.docstring.value)
