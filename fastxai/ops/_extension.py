"""Loading the compiled ops (``fastxai._C``), once, for every front door."""

from __future__ import annotations

import os

_EXTENSION_LOADED = False
_EXTENSION_ERROR: str | None = None

if os.environ.get("FASTXAI_DISABLE_EXT", "0") == "1":
    _EXTENSION_ERROR = "disabled by FASTXAI_DISABLE_EXT=1"
else:
    try:
        from fastxai import _C  # noqa: F401  (loading registers torch.ops.fastxai.*)
        from fastxai.ops import _registrations  # noqa: F401

        _EXTENSION_LOADED = True
    except ImportError as exc:  # the package still works on the pure-PyTorch path
        _EXTENSION_ERROR = str(exc)


def has_extension() -> bool:
    """Whether the compiled ``fastxai._C`` ops are loaded (else every op runs its reference)."""
    return _EXTENSION_LOADED


def extension_status() -> str:
    """A one-line description of the active kernel path, for logs and the CLI."""
    if _EXTENSION_LOADED:
        return "fastxai._C loaded (C++ CPU kernels)"
    return f"pure-PyTorch reference ops ({_EXTENSION_ERROR})"
