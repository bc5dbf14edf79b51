"""What a user gets wrong: bad checkpoints and flags (issue 6 item 4), bad requests (item 5), and who may connect
(item 7). Each mistake gets one line saying what is wrong and how to fix it, a non-zero exit or an Error reply,
and leaves nothing behind: no process in /proc, no file in /dev/shm, no folder or socket in the runtime folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, JetMoeConfig, MistralConfig

from conftest import children_of, error_line, process_gone, runtime_leftovers, shm_files
from fiddler_moe.cli import fiddler, launch
from fiddler_moe.cli import worker as worker_cli
from fiddler_moe.experts.checkpoint import CheckpointError
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.protocol import messages as m
from fiddler_moe.protocol.transport import Client

BIN = Path(sys.executable).parent


def run_all(commands: list[tuple[list, dict]]) -> list[subprocess.CompletedProcess]:
    """Run commands as real processes, two at a time (each spends its first seconds importing torch). Each one's
    environment is ours with the given changes (None: unset)."""

    def run(item):
        command, changes = item
        env = {**os.environ, **changes}
        return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=180,
                              env={k: v for k, v in env.items() if v is not None})

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(run, commands))


# --- item 4: bad checkpoints and flags, caught before any worker starts ---


def save_tiny(config, folder: Path, tokenizer_from: Path) -> Path:
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


def rewrite_tensor(folder: Path, key: str, shape: tuple[int, ...]) -> None:
    tensors = load_file(folder / "model.safetensors")
    assert key in tensors, key
    tensors[key] = torch.zeros(shape)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def bad_checkpoints(checkpoints, sharded_checkpoint, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Broken copies of a good checkpoint: case -> (folder, what the error line must say)."""
    root = tmp_path_factory.mktemp("bad")
    good = checkpoints["tiny"]

    def copy(name: str, source: Path = good) -> Path:
        shutil.copytree(source, root / name)
        return root / name

    cases: dict[str, tuple[Path, str]] = {"missing folder": (root / "not-there", "does not exist")}

    folder = copy("no-config")
    (folder / "config.json").unlink()
    cases["no config.json"] = (folder, "has no config.json")

    folder = copy("config-not-json")
    (folder / "config.json").write_text('{"model_type": "mixtral",')
    cases["config.json not JSON"] = (folder, "is not valid JSON")

    small = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    cases["dense model"] = (save_tiny(MistralConfig(**small), root / "dense", good), "dense mistral model")

    folder = copy("unknown-architecture")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="flibbertigibbet", architectures=["FlibbertigibbetForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    cases["unknown architecture"] = (folder, "does not know the architecture 'flibbertigibbet'")

    # JetMoe's experts are its own ParallelExperts code, not decorated with @use_experts_implementation
    jetmoe = JetMoeConfig(**small, num_local_experts=4, num_experts_per_tok=2, kv_channels=16)
    cases["MoE outside the experts interface"] = (save_tiny(jetmoe, root / "jetmoe", good),
                                                  "experts interface")

    folder = copy("truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated shard"] = (folder, "is truncated")

    folder = copy("missing-shard", sharded_checkpoint)
    shard = sorted(folder.glob("model-*.safetensors"))[3]
    shard.unlink()
    cases["index names a missing file"] = (folder, f"missing file(s), e.g. {shard.name}")

    folder = copy("wrong-shape")
    rewrite_tensor(folder, "model.layers.1.self_attn.q_proj.weight", (32, 64))
    cases["non-expert tensor of the wrong shape"] = (folder, "has shape [32, 64], but the config expects [64, 64]")

    folder = copy("wrong-expert-shape")
    rewrite_tensor(folder, "model.layers.3.block_sparse_moe.experts.5.w2.weight", (64, 100))
    cases["expert tensor of the wrong shape"] = (folder, "layer 3 expert 5")

    folder = copy("no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    cases["no tokenizer"] = (folder, "has no tokenizer")
    return cases


def bad_flags() -> dict[str, tuple[list[str], str]]:
    """case -> (flags, what the error line must say)."""
    return {
        "unparseable size": (["--device-memory", "lots"], "cannot read size 'lots'"),
        "budget larger than the device": (["--device", "cpu", "--device-memory", "100TiB"],
                                          "more than this machine has"),
    }


def test_bad_checkpoints_and_flags_fail_before_any_worker_starts(bad_checkpoints, checkpoints, cli, tmp_path):
    """`fiddler run` and `fiddler-launch`: one line, exit != 0, and no worker, socket, folder or shm file."""
    good = checkpoints["tiny"]
    cases = []  # (name, app, arguments, expected)
    for name, (folder, expected) in bad_checkpoints.items():
        cases.append((name, fiddler.app, ["run", "--model", folder, "-w", "1", "--device", "cpu", "hi"], expected))
    for name, (flags, expected) in bad_flags().items():
        cases.append((name, fiddler.app, ["run", "--model", good, *flags, "hi"], expected))
    folder, expected = bad_checkpoints["MoE outside the experts interface"]
    cases.append(("launch: MoE outside the experts interface", launch.app, ["--model", folder, "--device", "cpu"],
                  expected))
    shm_before = shm_files()
    children = set(children_of(os.getpid()))
    problems = []
    for i, (name, app, arguments, expected) in enumerate(cases):
        # Each command gets its own runtime folder, which must never even be created: no cluster was started.
        runtime = tmp_path / f"runtime-{i}"
        out = cli(app, *arguments, env={"FIDDLER_RUNTIME_DIR": str(runtime)})
        try:
            line = error_line(out)
            assert expected in line, line
            assert not runtime.exists(), "a cluster folder was created"
            assert set(children_of(os.getpid())) == children, "a process was started"
        except AssertionError as e:
            problems.append(f"{name}: {e}")
    assert not problems, "\n".join(problems)
    assert shm_files() == shm_before


def test_each_console_command_refuses_a_bad_flag_in_one_line(checkpoints, tmp_path):
    """The real executables, entry points and process start-up included: `fiddler` and `fiddler-worker` turn a
    mistake into one line on stderr (nothing else printed on the way) and a non-zero exit, and create no runtime
    folder. (A GPU can only be hidden from a process that has not looked for one yet, so that case needs a process
    of its own anyway. The real `fiddler-launch` runs in test_cli.py and test_reliability.py.)"""
    good = checkpoints["tiny"]
    cases = [
        ("--device cuda without a GPU", [BIN / "fiddler", "run", "--model", good, "--device", "cuda", "hi"],
         {"CUDA_VISIBLE_DEVICES": ""}, "no CUDA GPU"),
        ("beyond loopback without a token", [BIN / "fiddler-worker", "--listen", f"tcp://0.0.0.0:{free_port()}"],
         {"FIDDLER_TOKEN": None}, "token"),
    ]
    runtimes = [tmp_path / f"runtime-{i}" for i in range(len(cases))]
    shm_before = shm_files()
    results = run_all([(command, {**env, "FIDDLER_RUNTIME_DIR": str(runtime)})
                       for (_, command, env, _), runtime in zip(cases, runtimes)])
    problems = []
    for (name, _, _, expected), runtime, out in zip(cases, runtimes, results):
        try:
            line = error_line(out)
            assert expected in line, line
            assert not runtime.exists(), "a cluster folder was created"
        except AssertionError as e:
            problems.append(f"{name}: {e}")
    assert not problems, "\n".join(problems)
    assert shm_files() == shm_before


def test_bad_checkpoints_and_flags_through_the_python_api(bad_checkpoints, checkpoints):
    """Cluster(...) (for a bad flag) or its start() (for a bad checkpoint) raises the same one-line message and starts
    nothing."""
    good = checkpoints["tiny"]
    attempts = [(name, dict(model=folder), expected) for name, (folder, expected) in bad_checkpoints.items()]
    attempts += [
        ("unknown device", dict(model=good, device="tpu"), "unknown device 'tpu'"),
        ("unparseable size", dict(model=good, device_memory="20 parsecs"), "cannot read size '20 parsecs'"),
        ("budget larger than the device", dict(model=good, device_memory="100TiB"), "more than this machine has"),
        ("unknown dtype", dict(model=good, dtype="int8"), "unknown dtype 'int8'"),
        ("negative hot experts", dict(model=good, hot_experts=-1), "--hot-experts must be 0 or more"),
    ]
    children = set(children_of(os.getpid()))
    for name, kwargs, expected in attempts:
        cluster = None
        with pytest.raises((CheckpointError, ValueError)) as info:
            cluster = Cluster(**{"workers": 1, "device": "cpu", "quiet": True, **kwargs})
            cluster.start()
        assert expected in str(info.value) and "\n" not in str(info.value), name
        assert cluster is None or (cluster.processes == [] and cluster.run_dir is None), name
    assert set(children_of(os.getpid())) == children
    assert runtime_leftovers() == []


# --- a running cluster, for items 5 and 7 ---


# (`launched`, in conftest.py: fiddler-launch serving the tiny model, shared with test_fuzz.py)


def generate_over_protocol(address: str, request, timeout_s: float = 60) -> list[m.Message]:
    """Send one request (a message or raw frames) and collect the replies up to Done or Error."""
    client = Client(address)
    try:
        if isinstance(request, m.Message):
            client.send(request)
        else:
            client.send_frames(request)
        replies = []
        while True:
            reply = client.receive(timeout_s=timeout_s)
            assert reply is not None, f"no reply within {timeout_s}s to {request}"
            replies.append(reply)
            if isinstance(reply, m.GenerateDone | m.Error | m.Pong):
                return replies
    finally:
        client.close()


def test_bad_requests_get_a_clear_error_and_the_service_keeps_serving(launched, cli):
    """Item 5, through `fiddler generate` and through raw protocol clients."""
    launcher, address = launched.process, launched.address
    long_prompt = "the mixture of experts " * 1500  # far beyond the tiny model's 4096-token context
    cli_cases = [
        ([""], "the prompt is empty"),
        ([long_prompt], "context"),
        (["hi", "-n", "100000000"], "exceeds the model's context"),
        (["hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ]
    for args, expected in cli_cases:
        out = cli(fiddler.app, "generate", "--address", address, *args)
        assert expected in error_line(out), (args[1:], out.stderr)
    unknown = cli(fiddler.app, "generate", "--address", address, "--bogus", "hi")
    assert unknown.exit_code != 0 and "No such option: --bogus" in unknown.stderr
    assert isinstance(unknown.exception, SystemExit) and "Traceback" not in unknown.stderr

    # Past the CLI's own checks: what another client could send.
    def request(**fields):
        return m.GenerateRequest(**{"prompt": "hello", "max_new_tokens": 2, **fields})

    def frames(**body):
        header = {"v": m.PROTOCOL_VERSION, "kind": "generate", "body": body, "tensors": []}
        return [msgpack.packb(header)]

    raw_cases = [
        (request(prompt=""), "bad_request", "empty"),
        (request(prompt=long_prompt), "bad_request", "context"),
        (request(max_new_tokens=0), "bad_request", "--max-new-tokens"),
        (request(max_new_tokens=-5), "bad_request", "--max-new-tokens"),
        (request(max_new_tokens=2**62), "bad_request", "context"),
        (request(temperature=-0.5), "bad_request", "--temperature"),
        (request(temperature=float("nan")), "bad_request", "--temperature"),
        (request(temperature=float("inf")), "bad_request", "--temperature"),
        (request(top_p=0.0), "bad_request", "--top-p"),
        (request(top_p=1.01), "bad_request", "--top-p"),
        (request(top_p=float("nan")), "bad_request", "--top-p"),
        (request(top_k=-1), "bad_request", "--top-k"),
        (request(seed=-1), "bad_request", "--seed"),
        (frames(prompt="hi", max_new_tokens=2, flag=True), "bad_field", "unknown fields 'flag'"),
        (frames(prompt="hi", max_new_tokens="ten"), "bad_field", "expected int"),
        (frames(prompt=["hi"]), "bad_field", "expected str"),
        (frames(max_new_tokens=2), "missing_field", "'prompt'"),
        ([b"\xc1 not msgpack"], "bad_header", "msgpack"),
        (m.Hello(m.PROTOCOL_VERSION), "unexpected", "does not accept"),
    ]
    for message, code, expected in raw_cases:
        replies = generate_over_protocol(address, message)
        assert len(replies) == 1 and isinstance(replies[0], m.Error), (message, replies)
        assert replies[0].code == code and expected in replies[0].message, (message, replies[0])
        assert "\n" not in replies[0].message

    # A bad client and a good one at the same time: the good one is served.
    bad, good = Client(address), Client(address)
    try:
        bad.send(request(top_p=7.0))
        good.send(request(prompt="The mixture of experts", max_new_tokens=3))
        assert isinstance(bad.receive(timeout_s=60), m.Error)
        replies = []
        while not replies or not isinstance(replies[-1], m.GenerateDone | m.Error):
            replies.append(good.receive(timeout_s=60))
        assert isinstance(replies[-1], m.GenerateDone) and 1 <= len(replies[-1].token_ids) <= 3
    finally:
        bad.close()
        good.close()

    out = cli(fiddler.app, "generate", "--address", address, "-n", "4", "--json", "Hello there")
    assert out.exit_code == 0, out.stderr
    assert 1 <= len(json.loads(out.stdout)["token_ids"]) <= 4
    assert launcher.poll() is None


# --- item 7: local only by default ---


def listening_sockets(pid: int) -> tuple[list[str], list[str]]:
    """(paths of the unix sockets this process listens on, the local addresses of its listening tcp sockets as
    /proc writes them: 0100007F:1F40 is 127.0.0.1:8000)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    unix = []
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]; flag 0x10000 is __SO_ACCEPTCON, a listening socket
        if fields[6] in inodes and int(fields[3], 16) & 0x10000:
            unix.append(fields[7] if len(fields) > 7 else "")
    tcp = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                tcp.append(fields[1])
    return unix, tcp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_only_by_default(launched, cli, monkeypatch, tmp_path):
    """The launcher's and its workers' sockets are ipc files in a 0700 folder of ours; the only tcp port is the
    launcher's --http API on 127.0.0.1; a worker that listens beyond loopback needs a token, refuses a wrong one,
    and never logs it."""
    launcher, address, workers = launched.process, launched.address, launched.workers
    assert address.startswith("ipc://")
    run_dir = Path(address[len("ipc://") :]).parent
    info = run_dir.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert run_dir.parent == launched.runtime  # its FIDDLER_RUNTIME_DIR
    http_port = int(launched.http_url.rsplit(":", 1)[1])
    for pid in [launcher.pid, *workers]:
        unix, tcp = listening_sockets(pid)
        assert tcp == ([f"0100007F:{http_port:04X}"] if pid == launcher.pid else []), f"pid {pid} listens on {tcp}"
        assert unix and all(Path(path).parent == run_dir for path in unix), unix
        for path in unix:
            assert stat.S_ISSOCK(os.stat(path).st_mode)

    # Beyond loopback without a token: refused before listening (the real `fiddler-worker` does the same:
    # test_each_console_command_refuses_a_bad_flag_in_one_line).
    monkeypatch.delenv("FIDDLER_TOKEN", raising=False)  # for the worker started below too
    for listen in (f"tcp://0.0.0.0:{free_port()}", f"tcp://*:{free_port()}"):
        assert "token" in error_line(cli(worker_cli.app, "--listen", listen))
    worker_cli._check_listen(f"tcp://0.0.0.0:{free_port()}", token="a-token")  # with a token it is allowed

    # A worker with a token: a wrong or missing token is refused, the right one accepted, none of it logged.
    token = "k7Qx-cluster-token-9f2"
    (tmp_path / "token").write_text(token + "\n")
    listen = f"tcp://127.0.0.1:{free_port()}"
    worker = subprocess.Popen([sys.executable, "-m", "fiddler_moe.cli.worker", "--listen", listen, "--token-file",
                               str(tmp_path / "token")], stderr=subprocess.PIPE, text=True)
    client = Client(listen)
    try:
        client.send(m.Ping())
        reply = client.receive(timeout_s=60)
        assert isinstance(reply, m.Error) and reply.code == "unauthorized"
        client.send(m.Hello(m.PROTOCOL_VERSION, token="k7Qx-cluster-token-9f3"))
        reply = client.receive(timeout_s=10)
        assert isinstance(reply, m.Error) and reply.code == "unauthorized" and token not in reply.message
        client.send(m.Ping())
        assert isinstance(client.receive(timeout_s=10), m.Error)  # still not let in
        client.send(m.Hello(m.PROTOCOL_VERSION, token=token))
        assert isinstance(client.receive(timeout_s=10), m.HelloReply)
        client.send(m.Ping())
        assert isinstance(client.receive(timeout_s=10), m.Pong)
    finally:
        client.close()
        worker.terminate()
        log = worker.communicate(timeout=30)[1]
    assert worker.returncode == 0 and process_gone(worker.pid)
    assert "refused a request" in log and token not in log and "k7Qx" not in log

    # The comparison takes the same time however much of the token matches.
    import inspect

    from fiddler_moe.expert_worker.server import Worker

    assert "hmac.compare_digest" in inspect.getsource(Worker.on_hello)
