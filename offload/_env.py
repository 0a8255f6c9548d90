"""Every command-line option can also come from the environment: ``--metrics-port`` is
``OFFLOAD_METRICS_PORT``. Containers and systemd units are configured that way.

The mapping is mechanical (``OFFLOAD_`` + the option's destination in capitals), so an option
added later gets its variable without further code. A flag's variable holds the setting's
value as a boolean: ``OFFLOAD_REFLECTION=0`` is ``--no-reflection``, ``OFFLOAD_ANNOUNCE=1`` is
``--announce``. The command line wins over the environment.

A value that does not parse is refused in one line naming the variable; ``from_environment``
tells which options took their value from it, so that a later check of the value (a range, a
path) can name the variable too.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

PREFIX = "OFFLOAD_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: the usage of this many options is a
    screenful above the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def env_name(action: argparse.Action, prefix: str = PREFIX) -> str:
    return prefix + action.dest.upper()


_KINDS = {int: "an integer", float: "a number"}


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def option_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options that take their default from the environment (not --help, not positionals)."""
    return [
        a
        for a in parser._actions
        if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
    ]


def apply_env_defaults(
    parser: argparse.ArgumentParser,
    environ: Mapping[str, str] | None = None,
    skip: frozenset[str] = frozenset(),
    prefix: str = PREFIX,
) -> argparse.ArgumentParser:
    """Take each option's default from ``OFFLOAD_<DEST>`` when set; name the variable in --help.

    A value that does not parse is a usage error naming the variable, never silently ignored.
    ``skip`` names destinations that are actions rather than settings (``--print-fingerprint``).
    """
    environ = os.environ if environ is None else environ
    for action in option_actions(parser):
        if action.dest in skip:
            continue
        name = env_name(action, prefix)
        if action.help != argparse.SUPPRESS:
            action.help = f"{action.help or ''} [env {name}]".strip()
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        if _is_flag(action):
            value = raw.strip().lower()
            if value not in _TRUE | _FALSE:
                parser.error(f"{name}={raw!r}: use 1/true/yes/on or 0/false/no/off")
            # The variable holds the setting's value: OFFLOAD_REFLECTION=0 is --no-reflection.
            action.default = value in _TRUE
            continue
        if action.type is not None and callable(action.type):
            try:
                action.default = action.type(raw)
            except (TypeError, ValueError):
                kind = _KINDS.get(action.type, "a valid value")  # type: ignore[call-overload]
                parser.error(
                    f"{name}={raw!r} is not a valid value for {action.option_strings[0]}: "
                    f"set it to {kind}, or unset it"
                )
        else:
            action.default = raw
        if action.choices is not None and action.default not in action.choices:
            parser.error(f"{name}={raw!r}: choose from {', '.join(str(c) for c in action.choices)}")
    return parser


def from_environment(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    prefix: str = PREFIX,
) -> dict[str, str]:
    """The options whose parsed value is their variable's (the command line did not change it),
    as ``{"--window": "OFFLOAD_WINDOW"}``."""
    environ = os.environ if environ is None else environ
    return {
        action.option_strings[-1]: env_name(action, prefix)
        for action in option_actions(parser)
        if environ.get(env_name(action, prefix))
        and getattr(args, action.dest, None) == action.default
    }


def with_variables(message: str, origins: Mapping[str, str]) -> str:
    """Name the variable behind each option ``message`` names, if the value came from it
    (``origins`` as ``from_environment`` gives them)."""
    named = [
        variable
        for option, variable in origins.items()
        if re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", message)
    ]
    return f"{message} (from {', '.join(named)} in the environment)" if named else message


def invoked_as(module: str) -> str:
    """The name the user typed: a console script (``offload-client``), else ``python -m module``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name and not name.endswith(".py") and name != "-c" else f"python -m {module}"
