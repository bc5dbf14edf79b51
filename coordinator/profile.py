"""Expert popularity: how often each routed expert was chosen while the model read a set of calibration prompts.

A profile is recorded once per checkpoint (`fiddler profile --model ...` runs prompts through a cluster and keeps
`DispatchStats.routed`) and then steers placement: the most used experts become hot, and the cold ones are spread
so that every worker expects the same work (see coordinator/placement.py).

    profile = ExpertProfile.from_counts(dispatcher.stats.routed, fingerprint=layout.fingerprint,
                                        model=str(layout.folder), tokens=prompt_tokens,
                                        experts_per_layer={l.layer: l.num_experts for l in layout.moe_layers})
    profile.save("mixtral.profile.json")
    profile = ExpertProfile.load("mixtral.profile.json", expected_fingerprint=layout.fingerprint)
    placement = plan(..., profile=profile)

On disk a profile is JSON a person can read: a header (format, version, model, fingerprint, tokens, created) and
`layers`, one line per MoE layer holding its experts' counts in expert order:

    {
      "format": "fiddler-moe expert profile",
      "version": 1,
      "model": "/models/Mixtral-8x7B",
      "fingerprint": "3f2a9c0d1b7e5a64",
      "tokens": 20480,
      "created": "2026-11-25T10:42:00Z",
      "layers": {
        "0": [5210, 4811, 6002, 3950, 5533, 4478, 6120, 4856],
        ...
      }
    }

The fingerprint is the checkpoint's (expert_worker.checkpoint.fingerprint: config plus tensor table), so a profile
recorded on another model or another checkpoint is refused instead of silently steering placement wrong.

Calibration prompts (`read_calibration_prompts`) come as a text file, one prompt per line, or as JSONL with one
object per line: {"prompt": "..."}, {"text": "..."} or a chat {"messages": [{"role": "user", "content": "..."}]}.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

FORMAT = "fiddler-moe expert profile"
VERSION = 1
JSONL_SUFFIXES = (".jsonl", ".ndjson")

Expert = tuple[int, int]  # (layer, expert), as in coordinator/placement.py


class ProfileError(ValueError):
    """A profile or calibration file that cannot be used; the message says what is wrong and how to fix it."""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ExpertProfile:
    """Token-expert routings counted per (layer, expert) over `tokens` prompt tokens of one checkpoint."""

    fingerprint: str  # the checkpoint's fingerprint (ModelLayout.fingerprint)
    model: str  # what was profiled, for people: the checkpoint folder or its name
    counts: dict[Expert, int]  # (layer, expert) -> times routed; experts never routed may be absent or 0
    tokens: int  # tokens the model read while counting
    created: str = field(default_factory=_now)  # ISO 8601, UTC

    @classmethod
    def from_counts(
        cls,
        counts: Mapping[Expert, int],
        *,
        fingerprint: str,
        model: str,
        tokens: int,
        experts_per_layer: Mapping[int, int] | None = None,
        created: str | None = None,
    ) -> ExpertProfile:
        """A profile from counts such as DispatchStats.routed. With experts_per_layer every expert of the model gets
        an entry (0 when never routed), so the saved file lists every expert of every layer."""
        clean: dict[Expert, int] = {}
        if experts_per_layer is not None:
            for layer, n in experts_per_layer.items():
                for e in range(n):
                    clean[(int(layer), e)] = 0
        for key, n in counts.items():
            layer, expert = _expert_key(key)
            if experts_per_layer is not None and (layer, expert) not in clean:
                raise ProfileError(f"counts name layer {layer} expert {expert}, which the model does not have")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ProfileError(f"count for layer {layer} expert {expert} must be a whole number >= 0, got {n!r}")
            clean[(layer, expert)] = clean.get((layer, expert), 0) + n
        if not isinstance(tokens, int) or tokens < 0:
            raise ProfileError(f"tokens must be a whole number >= 0, got {tokens!r}")
        return cls(fingerprint=fingerprint, model=model, counts=dict(sorted(clean.items())), tokens=tokens,
                   created=created or _now())

    # --- reading the counts ---

    @property
    def total(self) -> int:
        """All token-expert routings counted (tokens * top_k * MoE layers for a complete run)."""
        return sum(self.counts.values())

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.counts})

    def count(self, expert: Expert) -> int:
        return self.counts.get(expert, 0)

    def layer_counts(self, layer: int) -> list[int]:
        """Counts of one layer's experts in expert order (0 for experts without an entry)."""
        experts = [e for lay, e in self.counts if lay == layer]
        return [self.counts.get((layer, e), 0) for e in range(max(experts) + 1)] if experts else []

    def merge(self, *others: ExpertProfile) -> ExpertProfile:
        """Counts and tokens summed over profiles of the same checkpoint (e.g. one per prompt set)."""
        counts = dict(self.counts)
        tokens = self.tokens
        created = self.created
        for other in others:
            if other.fingerprint != self.fingerprint:
                raise ProfileError(
                    f"cannot merge profiles of different checkpoints ({self.model} {self.fingerprint} and "
                    f"{other.model} {other.fingerprint}); merge only profiles recorded on the same model"
                )
            for key, n in other.counts.items():
                counts[key] = counts.get(key, 0) + n
            tokens += other.tokens
            created = max(created, other.created)
        return ExpertProfile(self.fingerprint, self.model, dict(sorted(counts.items())), tokens, created)

    # --- on disk ---

    def to_json(self) -> str:
        """The file's text: a readable header, then one line of counts per layer."""
        header = {"format": FORMAT, "version": VERSION, "model": self.model, "fingerprint": self.fingerprint,
                  "tokens": self.tokens, "created": self.created}
        lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()]
        layers = self.layers
        if not layers:
            lines.append('  "layers": {}')
        else:
            lines.append('  "layers": {')
            for i, layer in enumerate(layers):
                comma = "," if i < len(layers) - 1 else ""
                lines.append(f'    "{layer}": {json.dumps(self.layer_counts(layer))}{comma}')
            lines.append("  }")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile (atomically: a crash never leaves half a file) and return its path."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: str | None = None) -> ExpertProfile:
        """Read a profile; refuse a malformed file, or one recorded on another checkpoint when
        expected_fingerprint (ModelLayout.fingerprint) is given."""
        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ProfileError(
                f"profile {path} does not exist; record one with `fiddler profile --model ...`"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"cannot read profile {path}: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(
                f"profile {path} is not valid JSON ({e}); re-run `fiddler profile --model ...`"
            ) from None
        profile = cls._from_data(data, path)
        if expected_fingerprint is not None:
            profile.check(expected_fingerprint, f"profile {path}")
        return profile

    def check(self, expected_fingerprint: str, name: str = "the profile") -> None:
        """Refuse this profile unless it was recorded on the checkpoint with this fingerprint."""
        if self.fingerprint != expected_fingerprint:
            raise ProfileError(
                f"{name} was recorded on another model/checkpoint ({self.model}, fingerprint "
                f"{self.fingerprint}; this one is {expected_fingerprint}): re-run `fiddler profile --model ...` "
                "on this checkpoint"
            )

    @classmethod
    def _from_data(cls, data: object, path: Path) -> ExpertProfile:
        def bad(what: str) -> ProfileError:
            return ProfileError(f"profile {path} is malformed: {what}; re-run `fiddler profile --model ...`")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad(f'it is not a fiddler-moe expert profile (no "format": "{FORMAT}")')
        if data.get("version") != VERSION:
            raise bad(f"version {data.get('version')!r}; this fiddler-moe reads version {VERSION}")
        for key, kind in (("fingerprint", str), ("model", str), ("created", str), ("tokens", int)):
            value = data.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise bad(f'"{key}" is missing or not a {kind.__name__}')
        if data["tokens"] < 0:
            raise bad('"tokens" is negative')
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise bad('"layers" is missing or not an object of layer -> list of counts')
        counts: dict[Expert, int] = {}
        for layer_text, values in layers.items():
            try:
                layer = int(layer_text)
            except ValueError:
                raise bad(f"layer key {layer_text!r} is not a layer number") from None
            if layer < 0:
                raise bad(f"layer key {layer_text!r} is negative")
            if not isinstance(values, list):
                raise bad(f"layer {layer} is not a list of counts")
            for e, n in enumerate(values):
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    raise bad(f"layer {layer} expert {e} has count {n!r}, not a whole number >= 0")
                counts[(layer, e)] = n
        return cls(data["fingerprint"], data["model"], dict(sorted(counts.items())), data["tokens"], data["created"])


def _expert_key(key: object) -> Expert:
    if (not isinstance(key, tuple) or len(key) != 2
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in key)):
        raise ProfileError(f"expert keys are (layer, expert) pairs of whole numbers >= 0, got {key!r}")
    return int(key[0]), int(key[1])


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- calibration prompts ---

Prompt = str | list[dict]  # plain text, or a chat: [{"role": "user", "content": "..."}, ...]


def read_calibration_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Prompts to profile with, from a text file (one prompt per line, blank lines skipped) or a JSONL file (one
    object per line: {"prompt": str}, {"text": str} or {"messages": [{"role": str, "content": str}, ...]}).

    A file is read as JSONL when it ends in .jsonl/.ndjson, or when its first non-blank line is a JSON object
    (so a JSONL file named prompts.txt still works); then every line must be valid, and an error names the line."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"calibration prompt file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ProfileError(f"calibration prompt file {path} is not UTF-8 text") from None
    except OSError as e:
        raise ProfileError(f"cannot read calibration prompt file {path}: {e}") from None
    lines = text.splitlines()
    if path.suffix.lower() in JSONL_SUFFIXES or _looks_like_jsonl(lines):
        prompts = list(_read_jsonl(path, lines))
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ProfileError(f"calibration prompt file {path} holds no prompts; put one prompt per line")
    return prompts


def _looks_like_jsonl(lines: list[str]) -> bool:
    first = next((line.strip() for line in lines if line.strip()), "")
    if not first.startswith("{"):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _read_jsonl(path: Path, lines: Iterable[str]) -> Iterable[Prompt]:
    keys = '{"prompt": "..."}, {"text": "..."} or {"messages": [{"role": "user", "content": "..."}]}'
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue

        def bad(what: str) -> ProfileError:
            return ProfileError(f"{path} line {number}: {what}; each line must be one of {keys}")

        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise bad(f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(item, dict):
            raise bad(f"a JSON {type(item).__name__}, not an object")
        present = [k for k in ("prompt", "text", "messages") if k in item]
        if len(present) != 1:
            raise bad("no prompt found" if not present else f"several prompts in one line ({', '.join(present)})")
        key = present[0]
        value = item[key]
        if key == "messages":
            yield _check_messages(value, bad)
        elif not isinstance(value, str) or not value.strip():
            raise bad(f'"{key}" must be a non-empty string')
        else:
            yield value


def _check_messages(value: object, bad) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad('"messages" must be a non-empty list')
    for i, message in enumerate(value):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise bad(f'message {i} must be an object with string "role" and "content"')
    return value
