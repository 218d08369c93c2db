"""MkDocs hook: render the reST roles of fastxai's docstrings in the API reference.

The docstrings are Google style with reST inline roles, which Markdown leaves as text:
``:math:`x``` becomes inline math for MathJax, ``.. math:: x`` a displayed formula, and
``:func:`~a.b``` (``class``, ``mod``, ``meth``, ``data``, ``attr``) plain code.
"""

from __future__ import annotations

import re
from typing import Any

_INLINE_MATH = re.compile(r":math:<code>(.*?)</code>", re.S)
_DISPLAY_MATH = re.compile(r"<p>\.\. math::\s*(.*?)</p>", re.S)
_CROSS_REFERENCE = re.compile(r":(?:func|class|mod|meth|data|attr|exc):<code>~?(.*?)</code>")


def on_page_content(html: str, **kwargs: Any) -> str:
    html = _DISPLAY_MATH.sub(r'<div class="arithmatex">\\[\1\\]</div>', html)
    html = _INLINE_MATH.sub(r'<span class="arithmatex">\\(\1\\)</span>', html)
    return _CROSS_REFERENCE.sub(r"<code>\1</code>", html)
