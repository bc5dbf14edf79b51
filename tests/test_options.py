"""The cluster flags, declared once in ClusterOptions: every command that starts a cluster lists them with their
help, refuses a bad value in one line naming the flag, and with no flag given builds the default options.
Everything here runs in this process and starts no cluster."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer
from conftest import runtime_leftovers
from typer.testing import CliRunner

from fiddler_moe.cli import fiddler, launch
from fiddler_moe.cli.options import cluster_options_command
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.launch.options import ClusterOptions

FLAGS = {f.name: f.metadata["flag"] for f in dataclasses.fields(ClusterOptions) if "flag" in f.metadata}
SERVING_ONLY = {"restart_workers", "max_restarts"}  # a one-shot command ends on a dead worker anyway

# command -> (app, the words before the flags, the cluster flags it has no use for)
COMMANDS = {
    "fiddler-launch": (launch.app, [], set()),
    "fiddler run": (fiddler.app, ["run"], SERVING_ONLY),
    "fiddler profile": (fiddler.app, ["profile"], SERVING_ONLY | {"profile"}),
}


def names_of(flag) -> list[str]:
    """"--restart-workers/--no-restart-workers" is two flags."""
    return [name for names in flag.names for name in names.split("/")]


def squeezed(text: str) -> str:
    """Text without whitespace: the help is wrapped to the terminal's width."""
    return "".join(text.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_cluster_flag_with_its_help(command):
    app, words, unused = COMMANDS[command]
    out = CliRunner().invoke(app, [*words, "--help"])
    assert out.exit_code == 0, out.output
    for name, flag in FLAGS.items():
        for flag_name in names_of(flag):
            assert (flag_name in out.output) == (name not in unused), f"{command} --help and {flag_name}"
        if name not in unused:
            assert squeezed(flag.help) in squeezed(out.output), f"{command} --help lacks the help of {name}"


def bad_values(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """field -> (a bad value on the command line, what the error line must say)."""
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    return {
        "workers": (["--workers", "-1"], "--workers must be 0 or more"),
        "workers_per_socket": (["--workers-per-socket", "-1"], "--workers-per-socket must be 0 or more"),
        "threads_per_worker": (["-t", "0"], "--threads-per-worker must be 1 or more"),
        "numa": (["--numa", "maybe"], "--numa must be on or off, got 'maybe'"),
        "device_memory": (["--device-memory", "lots"], "--device-memory: cannot read size 'lots'"),
        "hot_experts": (["--hot-experts", "-1"], "--hot-experts must be 0 or more"),
        "quantize": (["--quantize", "q4"], "--quantize must be one of none, int8, int4, got 'q4'"),
        "coordinator_threads": (["--coordinator-threads", "0"], "--coordinator-threads must be 1 or more"),
        "transport": (["--transport", "udp"], "--transport must be shm or zmq, got 'udp'"),
        "token_file": (["--token-file", str(tmp_path / "no-such-token")], "cannot read --token-file"),
        "token_file (empty)": (["--token-file", str(empty)], f"--token-file {empty} is empty"),
        "max_restarts": (["--max-restarts", "-1"], "--max-restarts must be 0 or more"),
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_value_ends_the_command_with_one_line_naming_the_flag(command, tmp_path):
    app, words, unused = COMMANDS[command]
    # A model folder that does not exist: should a bad value slip through, the command fails at once on the model
    # instead of starting a cluster, and the expected line is missing.
    nowhere = tmp_path / "no-model"
    before = {"fiddler-launch": ["--dry-run"], "fiddler run": [], "fiddler profile": ["--prompts", str(nowhere)]}
    after = {"fiddler run": ["hi"]}.get(command, [])
    for case, (flags, expected) in bad_values(tmp_path).items():
        if case.split(" ")[0] in unused:
            continue
        out = CliRunner().invoke(app, [*words, *before[command], "--model", str(nowhere), *flags, *after])
        lines = out.stderr.splitlines()
        assert out.exit_code == 2, (case, out.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (case, out.stderr)
        assert out.stdout == "", case
    assert runtime_leftovers() == []


def given_no_cluster_flag(command: str) -> dict:
    """The values the command line hands the command when the user gives no cluster flag."""
    app, words, _ = COMMANDS[command]
    cli = typer.main.get_command(app)
    required = {"fiddler run": ["hi"], "fiddler profile": ["--prompts", "prompts.txt"]}.get(command, [])
    if words:
        cli = cli.commands[words[0]]
    return cli.make_context(command, required).params


@pytest.mark.parametrize("command", COMMANDS)
def test_no_cluster_flag_gives_the_default_options(command):
    _, _, unused = COMMANDS[command]
    params = given_no_cluster_flag(command)
    assert {name for name in FLAGS if name in params} == set(FLAGS) - unused
    assert ClusterOptions(**{name: params[name] for name in FLAGS if name in params}) == ClusterOptions()


def test_a_command_with_the_cluster_flags_receives_one_options_object():
    app = typer.Typer()
    received = []

    @app.command()
    @cluster_options_command()
    def serve(options: ClusterOptions, verbose: bool = False) -> None:
        received.append((options, verbose))

    assert CliRunner().invoke(app, []).exit_code == 0
    assert CliRunner().invoke(app, ["-w", "2", "--device-memory", "1GiB", "--remote-worker", "tcp://a:1",
                                    "--remote-worker", "tcp://b:2", "--numa", "off", "--verbose"]).exit_code == 0
    assert received[0] == (ClusterOptions(), False)
    options, verbose = received[1]
    assert verbose and options == ClusterOptions(workers=2, device_memory="1GiB", numa="off",
                                                 remote_workers=["tcp://a:1", "tcp://b:2"])
    assert options.device_budget == 2**30  # read once, here


def test_python_callers_name_the_same_options():
    assert Cluster("some/model", workers=2, numa=False).options == ClusterOptions(model=Path("some/model"), workers=2,
                                                                                   numa="off")
    options = ClusterOptions(device_memory="all", hot_experts=3)
    assert Cluster(options).options is options and options.device_budget == "all"
    with pytest.raises(ValueError, match="--hot-experts must be 0 or more, got -1"):
        Cluster(hot_experts=-1)
    with pytest.raises(TypeError, match="not both"):
        Cluster(options, workers=2)
