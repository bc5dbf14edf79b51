"""The OpenAI-compatible HTTP API, as its users reach it: the official `openai` client and plain HTTP against a real
`fiddler-launch --http` on loopback (the session's `launched` service, tiny model, float32), plus the flags' refusals
before anything starts."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from fiddler_moe.cli import launch
from fiddler_moe.serving.server import HttpOptions

from conftest import error_line, runtime_leftovers

PROMPTS = [f"{word} is the best {thing}" for word, thing in zip(
    ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo", "Quito"],
    ["city", "river", "song", "meal", "book", "game", "idea", "road"])]


@pytest.fixture(scope="module")
def api(launched) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{launched.http_url}/v1", api_key=launched.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(api) -> str:
    return api.models.list().data[0].id


def metric(launched, name: str) -> float:
    """One sample of /metrics, summed over its labels."""
    text = httpx.get(f"{launched.http_url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and (line[len(name)] in " {"))


def test_models_lists_the_checkpoint_folder_by_name(api, launched):
    models = api.models.list().data
    assert [m.id for m in models] == [launched.model.name]


def test_chat_and_completion_answer_greedily_and_the_full_path_names_the_model_too(api, model, launched):
    chat = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}],
                                       max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert 1 <= chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 3
    again = api.chat.completions.create(model=str(launched.model), max_completion_tokens=8, temperature=0,
                                        messages=[{"role": "user", "content": "Hello there"}])
    assert again.choices[0].message.content == chat.choices[0].message.content  # greedy: the same answer

    done = api.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    assert done.choices[0].text


def test_streaming_pieces_add_up_to_the_whole_answer_and_end_with_the_usage(api, model):
    request = dict(model=model, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12,
                   temperature=0, extra_body={"ignore_eos": True})
    whole = api.chat.completions.create(**request)
    chunks = list(api.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_stop_string_cuts_the_text_before_it_and_ends_the_request(api, model):
    request = dict(model=model, prompt="Once upon a time", max_tokens=24, temperature=0,
                   extra_body={"ignore_eos": True})
    full = api.completions.create(**request).choices[0].text
    assert len(full) > 9
    stop, before = full[6:9], full[: full.find(full[6:9])]
    cut = api.completions.create(**request, stop=[stop, "never in the text \x00"])
    assert cut.choices[0].text == before and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 24  # the request ended there
    streamed = "".join(c.choices[0].text for c in api.completions.create(**request, stop=stop, stream=True))
    assert streamed == before


def test_n_choices_and_sampling_with_a_seed_repeat(api, model):
    request = dict(model=model, prompt="Hello", max_tokens=8, temperature=0.9, top_p=0.9, seed=7, n=2,
                   extra_body={"top_k": 20, "ignore_eos": True})
    first = api.completions.create(**request)
    second = api.completions.create(**request)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]  # the same seeds, the same text
    assert first.usage.completion_tokens == 16
    beams = api.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0,
                                   extra_body={"num_beams": 2, "ignore_eos": True})
    assert beams.usage.completion_tokens == 4 and beams.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="num_beams"):
        api.completions.create(model=model, prompt="Hello", stream=True, extra_body={"num_beams": 2})


def test_errors_come_in_openai_shape_with_their_status(api, model, launched):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{launched.http_url}/v1", api_key="wrong", max_retries=0).models.list()
    missing = httpx.post(f"{launched.http_url}/v1/completions", json={"model": model, "prompt": "hi"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"

    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert bad.value.body["param"] == "temperature" and "temperature" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        api.completions.create(model=model, prompt="hi", frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        api.completions.create(model=model, prompt=[10**7], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        api.completions.create(model=model, prompt="hi", max_tokens=10**6)
    with pytest.raises(openai.NotFoundError) as unknown:
        api.completions.create(model="gpt-4", prompt="hi")
    assert unknown.value.body["code"] == "model_not_found"

    headers = {"Authorization": f"Bearer {launched.api_key}"}
    not_json = httpx.post(f"{launched.http_url}/v1/chat/completions", content=b"{", headers=headers)
    assert not_json.status_code == 400
    assert set(not_json.json()["error"]) == {"message", "type", "param", "code"}


def test_health_and_metrics_over_plain_http(launched, api, model):
    health = httpx.get(f"{launched.http_url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    before = metric(launched, "fiddler_generation_tokens_total")
    api.completions.create(model=model, prompt="count", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    text = httpx.get(f"{launched.http_url}/metrics").text
    for name in ("fiddler_http_requests_total", "fiddler_prompt_tokens_total", "fiddler_prefill_tokens_per_second",
                 "fiddler_decode_tokens_per_second", "fiddler_requests_running", "fiddler_requests_waiting",
                 "fiddler_expert_hit_rate", 'fiddler_worker_busy_share{worker="worker-0"}'):
        assert name in text, name
    assert metric(launched, "fiddler_generation_tokens_total") >= before + 5
    unknown = httpx.get(f"{launched.http_url}/wp-admin/setup.php")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert 'fiddler_http_requests_total{route="other",status="404"}' in httpx.get(f"{launched.http_url}/metrics").text
    assert metric(launched, 'fiddler_worker_busy_seconds_total{worker="worker-0"}') > 0


def test_eight_concurrent_streams_give_what_each_gives_alone(api, model):
    request = dict(model=model, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    alone = [api.completions.create(prompt=p, **request).choices[0].text for p in PROMPTS]
    together: list[str | None] = [None] * len(PROMPTS)
    start = threading.Barrier(len(PROMPTS))

    def stream(i: int) -> None:
        start.wait()
        together[i] = "".join(c.choices[0].text for c in api.completions.create(prompt=PROMPTS[i], stream=True,
                                                                                 **request))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    assert len(set(alone)) > 1  # distinct prompts, distinct answers


def test_a_client_that_leaves_mid_stream_cancels_its_request_and_the_server_serves_on(api, model, launched):
    cancelled = metric(launched, 'fiddler_choices_finished_total{reason="cancelled"}')
    generated = metric(launched, "fiddler_generation_tokens_total")
    body = {"model": model, "prompt": "A long story:", "max_tokens": 3000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    headers = {"Authorization": f"Bearer {launched.api_key}"}
    with httpx.stream("POST", f"{launched.http_url}/v1/completions", json=body, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                assert json.loads(line[6:])["choices"]
                events += 1
            if events == 3:
                break  # and the connection closes
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and metric(launched, "fiddler_requests_running") > 0:
        time.sleep(0.1)
    assert metric(launched, "fiddler_requests_running") == 0
    assert metric(launched, 'fiddler_choices_finished_total{reason="cancelled"}') == cancelled + 1
    assert metric(launched, "fiddler_generation_tokens_total") - generated < 3000  # it stopped early
    after = api.completions.create(model=model, prompt="still there?", max_tokens=3, temperature=0)
    assert after.choices[0].text is not None


def test_listening_beyond_loopback_needs_a_key_and_is_refused_before_anything_starts(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("FIDDLER_API_KEY", raising=False)
    line = error_line(cli(launch.app, "--http", "0.0.0.0:8000", "--device", "cpu"))
    assert "without an API key" in line and "--api-key-file" in line
    line = error_line(cli(launch.app, "--http", "localhost:http", "--device", "cpu"))
    assert "HOST:PORT" in line
    empty = tmp_path / "key"
    empty.write_text("\n")
    assert "is empty" in error_line(cli(launch.app, "--http", "0.0.0.0:8000", "--api-key-file", empty))
    assert "--http" in error_line(cli(launch.app, "--api-key", "k"))
    with socket.socket() as taken:  # a port in use fails the launch before any process starts
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = error_line(cli(launch.app, "--http", f"127.0.0.1:{port}", "--device", "cpu", "--workers", "1"))
        assert "cannot listen there" in line and runtime_leftovers() == []
    # what the flags mean
    assert (HttpOptions.parse("8000").host, HttpOptions.parse(":9").port) == ("127.0.0.1", 9)
    assert HttpOptions.parse("[::1]:80").host == "::1"
    assert HttpOptions.parse("0.0.0.0:80", api_key="k").api_key == "k"
    monkeypatch.setenv("FIDDLER_API_KEY", "from-env")
    assert HttpOptions.parse("0.0.0.0:80").api_key == "from-env"


@pytest.mark.cluster("tiny", workers=2, threads_per_worker=1, transport="shm")
def test_a_degraded_or_stopping_cluster_answers_503_with_the_reason(cluster):
    from fastapi.testclient import TestClient

    from fiddler_moe.serving.app import Served, make_app

    reason = ["worker-1 (ipc://...) exited with code -9; 3 restarts used"]
    served = Served(cluster.engine, cluster.tokenizer, cluster.options.model, health=lambda: reason[0],
                    coordinator=cluster.coordinator)
    with TestClient(make_app(served)) as http:
        health = http.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "degraded", "reason": reason[0]}
        refused = http.post("/v1/completions", json={"model": served.name, "prompt": "hi"})
        assert refused.status_code == 503 and refused.json()["error"]["message"] == reason[0]
        assert "fiddler_degraded 1.0" in http.get("/metrics").text
        reason[0] = None
        served.shutting_down = "the server is shutting down"
        assert http.get("/health").json() == {"status": "shutting_down", "reason": "the server is shutting down"}
        served.shutting_down = None
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/completions", json={"model": served.name, "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
