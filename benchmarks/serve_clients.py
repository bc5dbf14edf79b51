"""The clients of `fiddler bench serve`, in a process of their own, as real clients are.

    python -m fiddler_moe.benchmarks.serve_clients URL MODEL     # then one JSON line per round on stdin

Each line read is a round, `{"prompts": [[token ids], ...], "new_tokens": N}`: one streamed completion per prompt
(greedy, EOS ignored), all sent at once from one asyncio loop, each on a connection of its own opened beforehand.
The answer is one line per round: `{"streams": [{"sent", "first", "end", "tokens"}, ...], "cpu_seconds": ...}`
(times from time.perf_counter, CLOCK_MONOTONIC on Linux) or `{"error": "..."}`. In the server's process, client
threads would take the interpreter's lock from the cluster's own threads, which no real client does.
Imports nothing heavier than httpx, so that it starts at once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass

import httpx


@dataclass
class Stream:
    """One client's request, as the client saw it."""

    sent: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return (self.first or self.end) - self.sent

    @property
    def decode_tokens_per_second(self) -> float:
        span = (self.end or 0) - (self.first or 0)
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


async def stream_completion(client: httpx.AsyncClient, model: str, prompt: list[int], new_tokens: int) -> Stream:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    stream = Stream(sent=time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']['message']}")
            if chunk["choices"] and chunk["choices"][0]["text"] and stream.first is None:
                stream.first = time.perf_counter()
            if chunk.get("usage"):
                stream.tokens = chunk["usage"]["completion_tokens"]
    stream.end = time.perf_counter()
    return stream


async def concurrent_round(url: str, model: str, prompts: list[list[int]], new_tokens: int) -> list[Stream]:
    """One completion per prompt, all at once, each client on its own connection (opened before the round)."""
    clients = [httpx.AsyncClient(base_url=url, timeout=600) for _ in prompts]
    try:
        await asyncio.gather(*(client.get("/health") for client in clients))
        return await asyncio.gather(*(stream_completion(client, model, prompt, new_tokens)
                                      for client, prompt in zip(clients, prompts)))
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


def main() -> None:
    url, model = sys.argv[1], sys.argv[2]
    for line in sys.stdin:
        order = json.loads(line)
        cpu = time.process_time()
        try:
            streams = asyncio.run(concurrent_round(url, model, order["prompts"], order["new_tokens"]))
            answer = {"streams": [asdict(s) for s in streams], "cpu_seconds": time.process_time() - cpu}
        except Exception as e:
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
