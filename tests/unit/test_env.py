"""Both command lines: every option has its OFFLOAD_ variable, a bad value is one line naming it,
and the options' defaults are the dataclasses' own."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

import pytest

from offload import client, server
from offload._config import ClientConfig, ServerConfig
from offload._env import env_name, from_environment, option_actions, with_variables
from offload.exceptions import ConfigError

Build = Callable[[Mapping[str, str]], argparse.ArgumentParser]
PARSERS: dict[str, tuple[Build, frozenset[str]]] = {
    "client": (lambda environ: client.build_parser(environ, prog="offload-client"), frozenset()),
    "server": (server.build_parser, server.ACTIONS),
}


def settings(name: str) -> list[argparse.Action]:
    build, actions = PARSERS[name]
    return [a for a in option_actions(build({})) if a.dest not in actions]


def _flag(action: argparse.Action) -> bool:
    return action.nargs == 0


def a_value(action: argparse.Action) -> str:
    """A value the option parses to something other than its default."""
    if _flag(action):
        return "0" if action.default else "1"
    if action.choices is not None:
        return next(str(c) for c in action.choices if c != action.default)
    if action.type in (int, float):
        return "7"
    return "from-the-environment"


def a_bad_value(action: argparse.Action) -> str | None:
    """A value the parser itself refuses (None: any text parses; the dataclasses check it)."""
    if _flag(action):
        return "maybe"
    if action.choices is not None:
        return "no-such-choice"
    if action.type in (int, float):
        return "abc"
    return None


@pytest.mark.parametrize("name", PARSERS)
def test_every_option_is_settable_from_its_offload_variable(name: str) -> None:
    build, _ = PARSERS[name]
    for action in settings(name):
        variable = env_name(action)
        assert variable == "OFFLOAD_" + action.option_strings[-1].lstrip("-").replace(
            "-", "_"
        ).upper().removeprefix("NO_"), variable
        assert f"[env {variable}]" in (action.help or ""), variable
        raw = a_value(action)
        args = build({variable: raw}).parse_args([])
        assert getattr(args, action.dest) != action.default, variable


@pytest.mark.parametrize(
    ("name", "dest"),
    [(name, a.dest) for name in PARSERS for a in settings(name) if a_bad_value(a) is not None],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    name: str, dest: str, capsys: pytest.CaptureFixture[str]
) -> None:
    build, _ = PARSERS[name]
    action = next(a for a in settings(name) if a.dest == dest)
    bad = a_bad_value(action)
    assert bad is not None
    variable = env_name(action)
    with pytest.raises(SystemExit) as exited:
        build({variable: bad})
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert f"{variable}={bad!r}" in lines[0]


def test_a_value_the_server_config_refuses_names_its_variable() -> None:
    environ = {"OFFLOAD_WORKERS": "0"}
    parser = server.build_parser(environ)
    args = parser.parse_args([])
    with pytest.raises(ConfigError) as refused:
        server._config(args)
    line = with_variables(str(refused.value), from_environment(parser, args, environ))
    assert line.startswith("--workers 0: at least 1 device stream must fit")
    assert line.endswith("(from OFFLOAD_WORKERS in the environment)")


def test_an_option_given_on_the_command_line_names_no_variable() -> None:
    environ = {"OFFLOAD_WORKERS": "3"}
    parser = server.build_parser(environ)
    args = parser.parse_args(["--workers", "0"])
    assert from_environment(parser, args, environ) == {}


def test_the_command_lines_defaults_are_the_dataclasses() -> None:
    assert client._config(client.build_parser({}).parse_args([])) == ClientConfig()
    assert server._config(server.build_parser({}).parse_args([])) == ServerConfig()
