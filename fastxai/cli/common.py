"""What every ``fastxai`` sub-command shares: the one-line error, the parser that prints one
line, and loading a model and choosing its layer from the command line's arguments."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from torch import nn

    from fastxai.models import LoadedModel

PROG = "fastxai"
USAGE_ERROR = 2
ENVIRONMENT_ERROR = 1


class CliError(Exception):
    """A user-facing failure: printed as one line, exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = USAGE_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are a single ``prog: error: ...`` line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def check_model_arguments(name: str, weights: Path | None) -> None:
    from fastxai.models import EFFICIENTNET_LITE0, unknown_model_message

    if name != EFFICIENTNET_LITE0 and (message := unknown_model_message(name)):
        raise CliError(f"--model: {message}")
    if weights is not None and name == EFFICIENTNET_LITE0:
        raise CliError(f"--weights: {EFFICIENTNET_LITE0} loads its packaged weights")
    if weights is not None and not weights.is_file():
        raise CliError(f"--weights: no such file: {weights}")


def load_model_for_cli(name: str, weights: Path | None) -> LoadedModel:
    from fastxai.models import load_model

    check_model_arguments(name, weights)
    try:
        return load_model(name, weights)
    except ImportError as exc:
        raise CliError(str(exc), ENVIRONMENT_ERROR) from exc
    except Exception as exc:
        if weights is None:
            raise
        # An unreadable state dict or one that does not fit the model: torch's message is long.
        raise CliError(f"--weights: cannot load {weights} into {name}: {first_line(exc)}") from exc


def choose_layer(name: str, model: nn.Module, layer: str | None) -> str:
    from fastxai.capture import resolve_layer
    from fastxai.models import default_layer

    chosen = layer or default_layer(name, model)
    if chosen is None:
        raise CliError(f"--layer: no default layer for {name}; pass --layer DOTTED.NAME")
    try:
        return resolve_layer(model, chosen)
    except ValueError as exc:
        raise CliError(f"--layer: {exc}") from exc


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty):
    torch's messages run to many lines, a command prints one."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
