"""Every flag the project's own text names (error messages, help, docstrings) is one that its commands define: an
error saying "run with --device cpu" must point at a flag the user can type."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import click
import typer

from fiddler_moe.cli import fiddler, launch, worker

ROOT = Path(__file__).resolve().parent.parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
# Flags of other tools that a message may tell the user to pass there, with the tool.
OTHER_TOOLS = {"--shm-size": "docker run", "--build": "cmake", "--target": "cmake",
               "--outtype": "llama.cpp's convert_hf_to_gguf.py", "--outfile": "llama.cpp's convert_hf_to_gguf.py"}


def defined_flags() -> set[str]:
    """The long flags of fiddler, fiddler-launch and fiddler-worker, every command's, as click sees them."""
    flags: set[str] = set()

    def visit(command: click.Command) -> None:
        flags.update(click.Context(command).help_option_names)
        for param in command.params:
            flags.update(name for name in [*param.opts, *param.secondary_opts] if name.startswith("--"))
        for sub in getattr(command, "commands", {}).values():
            visit(sub)

    for app in (fiddler.app, launch.app, worker.app):
        visit(typer.main.get_command(app))
    return flags


def source_files() -> list[Path]:
    """The Python files of every folder that installs under fiddler_moe (pyproject.toml's package-dir)."""
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def argparse_flags(tree: ast.AST) -> set[str]:
    """The flags a script defines for itself with argparse (benchmarks run as `python benchmarks/x.py --flag`)."""
    return {arg.value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            and arg.value.startswith("--")}


def unknown_flags(source: str, defined: set[str]) -> list[tuple[int, str]]:
    """(line, flag) for each flag in a string literal of `source` (f-strings' text included) that is not defined."""
    tree = ast.parse(source)
    known = defined | argparse_flags(tree) | set(OTHER_TOOLS)
    return [(node.lineno, flag) for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) for flag in FLAG.findall(node.value) if flag not in known]


def test_every_flag_named_in_the_sources_is_one_the_commands_define():
    defined = defined_flags()
    # the commands' flags were read: one of each command, a generated --no- form, and click's own --help
    assert {"--max-new-tokens", "--dry-run", "--listen", "--handshake-timeout", "--no-restart-workers",
            "--help"} <= defined
    wrong = [f"{path.relative_to(ROOT)}:{line}: {flag}" for path in source_files()
             for line, flag in unknown_flags(path.read_text(), defined)]
    assert not wrong, "flags that no command defines:\n" + "\n".join(wrong)


def test_a_misspelt_flag_in_a_message_is_found():
    source = '''
def check(workers):
    if workers < 0:
        raise ValueError(f"--wrokers must be 0 or more, got {workers}; or use " "--workers-per-sockets")
    raise ValueError("fine: --workers and --device, and --shm-size of docker")
'''
    assert unknown_flags(source, defined_flags()) == [(4, "--wrokers"), (4, "--workers-per-sockets")]
