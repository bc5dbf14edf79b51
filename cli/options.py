"""The cluster flags of every command that starts a cluster, made from ClusterOptions' fields, and the one-line
error that ends a command.

    @app.command()
    @cluster_options_command(exclude=("restart_workers", "max_restarts"))
    def run(prompt: PromptArg, options: ClusterOptions, max_new_tokens: MaxNewTokensOption = 128) -> None: ...

typer reads a command's flags from its signature, so the decorator puts one parameter per flagged field where
`options` stands, and calls the command with the ClusterOptions those flags make: the flags, their defaults and
their help are declared once, in launch/options.py.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, fields
from typing import Annotated

import typer

from fiddler_moe.launch.options import ClusterOptions, Flag


def run_then_exit(app: typer.Typer) -> typing.NoReturn:
    """A console command's entry point: run it, then end the process at once. Everything it started is stopped by
    then (a launcher's `with cluster:`); the interpreter's own shutdown with torch and transformers loaded would add
    over a second before the process is gone, which the user at the prompt, a relaunch or a script waits for
    (fiddler-worker ends the same way). An uncaught exception still ends the ordinary way, with its traceback."""
    try:
        app()
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fail(message: str) -> typer.Exit:
    """Print one line, `error: <what and how to fix it>`, and give the exit to raise (status 2)."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(2)


def cluster_flags(exclude: Iterable[str] = (), kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) -> list[inspect.Parameter]:
    """One typer parameter per flagged field of ClusterOptions, named as the field, with its default."""
    hints = typing.get_type_hints(ClusterOptions)
    params = []
    for f in fields(ClusterOptions):
        flag: Flag | None = f.metadata.get("flag")
        if flag is None or f.name in exclude:
            continue
        default = None if f.default is MISSING else f.default  # a list field: None on the command line, [] after
        option = typer.Option(*flag.names, help=flag.help)
        params.append(inspect.Parameter(f.name, kind, default=default,
                                        annotation=Annotated[flag.type or hints[f.name], option]))
    return params


def cluster_options_command(exclude: Iterable[str] = ()) -> Callable[[Callable], Callable]:
    """Give a command, in place of its `options` parameter, every cluster flag but those named in `exclude`; it is
    called with `options=ClusterOptions(...)`, or never, with one error line, when a flag's value is wrong."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        # The command's annotations are strings (postponed evaluation), resolved here in its own module: typer
        # would look their names up in this one.
        hints = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
        at = next(i for i, p in enumerate(own) if p.name == "options")
        flags = cluster_flags(exclude, own[at].kind)
        names = [p.name for p in flags]
        params = own[:at] + flags + own[at + 1:]

        @functools.wraps(command)
        def with_options(**kwargs):
            try:
                # More workers or threads than cores is allowed: the plan warns (host/numa.py, lay_out).
                options = ClusterOptions(**{name: kwargs.pop(name) for name in names})
            except ValueError as e:
                raise fail(str(e)) from None
            return command(options=options, **kwargs)

        with_options.__signature__ = signature.replace(parameters=params)
        with_options.__annotations__ = {p.name: p.annotation for p in params}
        return with_options

    return decorate
