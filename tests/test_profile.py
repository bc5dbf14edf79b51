"""Expert profiles: recorded, saved, read back, refused when they belong to another checkpoint; calibration prompts."""

from __future__ import annotations

import json

import pytest

from fiddler_moe.coordinator.profile import ExpertProfile, ProfileError, read_calibration_prompts


def make_profile(fingerprint: str = "abc123", **overrides) -> ExpertProfile:
    routed = {(0, 1): 7, (0, 3): 2, (1, 0): 5}  # what DispatchStats.routed holds after a run
    args = dict(fingerprint=fingerprint, model="tiny", tokens=7, experts_per_layer={0: 4, 1: 4})
    args.update(overrides)
    return ExpertProfile.from_counts(routed, **args)


def test_profile_round_trip_and_readable_file(tmp_path):
    profile = make_profile()
    assert profile.counts[(0, 0)] == 0 and profile.counts[(0, 1)] == 7  # every expert listed, zeros included
    assert profile.total == 14 and profile.layers == [0, 1]
    path = profile.save(tmp_path / "sub" / "tiny.profile.json")
    text = path.read_text()
    assert '"0": [0, 7, 0, 2]' in text and '"1": [5, 0, 0, 0]' in text  # one line of counts per layer
    data = json.loads(text)
    assert data["fingerprint"] == "abc123" and data["tokens"] == 7 and data["model"] == "tiny"
    loaded = ExpertProfile.load(path, expected_fingerprint="abc123")
    assert loaded == profile
    assert ExpertProfile.load(path) == profile  # no check asked for


def test_profile_of_another_checkpoint_is_refused(tmp_path):
    path = make_profile().save(tmp_path / "p.json")
    with pytest.raises(ProfileError, match="another model/checkpoint.*fiddler profile --model"):
        ExpertProfile.load(path, expected_fingerprint="ffff0000")
    assert issubclass(ProfileError, ValueError)


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not valid JSON"),
        ("[]", "not a fiddler-moe expert profile"),
        ('{"format": "fiddler-moe expert profile", "version": 9}', "version 9"),
        ('{"format": "fiddler-moe expert profile", "version": 1, "model": "m", "created": "c", "tokens": 1}',
         '"fingerprint"'),
        ('{"format": "fiddler-moe expert profile", "version": 1, "model": "m", "created": "c", "tokens": 1, '
         '"fingerprint": "f", "layers": {"0": [1, -2]}}', "layer 0 expert 1"),
        ('{"format": "fiddler-moe expert profile", "version": 1, "model": "m", "created": "c", "tokens": 1, '
         '"fingerprint": "f", "layers": {"x": [1]}}', "not a layer number"),
        ('{"format": "fiddler-moe expert profile", "version": 1, "model": "m", "created": "c", "tokens": 1, '
         '"fingerprint": "f", "layers": [1]}', '"layers"'),
    ],
)
def test_malformed_profile_is_refused(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message):
        ExpertProfile.load(path)


def test_missing_profile_names_the_fix(tmp_path):
    with pytest.raises(ProfileError, match="does not exist.*fiddler profile"):
        ExpertProfile.load(tmp_path / "nope.json")


def test_from_counts_checks_its_input():
    with pytest.raises(ProfileError, match="layer 2 expert 0"):
        ExpertProfile.from_counts({(2, 0): 1}, fingerprint="f", model="m", tokens=1, experts_per_layer={0: 4})
    with pytest.raises(ProfileError, match="whole number"):
        ExpertProfile.from_counts({(0, 0): -1}, fingerprint="f", model="m", tokens=1)
    with pytest.raises(ProfileError, match="pairs"):
        ExpertProfile.from_counts({0: 1}, fingerprint="f", model="m", tokens=1)
    sparse = ExpertProfile.from_counts({(0, 2): 3}, fingerprint="f", model="m", tokens=1)
    assert sparse.layer_counts(0) == [0, 0, 3]


def test_merge_sums_counts_and_tokens():
    a = make_profile(created="2026-11-01T00:00:00Z")
    b = ExpertProfile.from_counts({(0, 1): 1, (1, 3): 4}, fingerprint="abc123", model="tiny", tokens=3,
                                  created="2026-11-20T00:00:00Z")
    merged = a.merge(b)
    assert merged.count((0, 1)) == 8 and merged.count((1, 3)) == 4 and merged.count((1, 0)) == 5
    assert merged.tokens == 10 and merged.created == "2026-11-20T00:00:00Z"
    assert a.count((0, 1)) == 7  # the inputs are left alone
    with pytest.raises(ProfileError, match="different checkpoints"):
        a.merge(make_profile(fingerprint="other"))


# --- calibration prompts ---


def test_text_prompts_one_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("The capital of France is\n\n  \nExplain mixture-of-experts {briefly}\n")
    assert read_calibration_prompts(path) == ["The capital of France is", "Explain mixture-of-experts {briefly}"]


def test_jsonl_prompts_texts_and_chats(tmp_path):
    path = tmp_path / "prompts.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path.write_text("\n".join([json.dumps({"prompt": "one"}), "", json.dumps({"text": "two", "source": "wiki"}),
                               json.dumps({"messages": chat})]) + "\n")
    assert read_calibration_prompts(path) == ["one", "two", chat]
    # the same content under a .txt name is recognised by its first line
    renamed = tmp_path / "prompts.txt"
    renamed.write_text(path.read_text())
    assert read_calibration_prompts(renamed) == ["one", "two", chat]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "ok"}', '{"prompt": "unclosed'], "line 2: not valid JSON"),
        (['{"prompt": "ok"}', "", '["a list"]'], "line 3: a JSON list, not an object"),
        (['{"prompt": "ok"}', '{"question": "x"}'], "line 2: no prompt found"),
        (['{"prompt": "a", "text": "b"}'], "line 1: several prompts"),
        (['{"prompt": ""}'], 'line 1: "prompt" must be a non-empty string'),
        (['{"text": 5}'], 'line 1: "text" must be a non-empty string'),
        (['{"messages": []}'], 'line 1: "messages" must be a non-empty list'),
        (['{"messages": [{"role": "user"}]}'], 'line 1: message 0 must be an object with string "role" and "content"'),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, lines, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ProfileError, match=message) as info:
        read_calibration_prompts(path)
    assert str(path) in str(info.value) and '{"prompt": "..."}' in str(info.value)


def test_empty_or_missing_prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ProfileError, match="holds no prompts"):
        read_calibration_prompts(empty)
    with pytest.raises(ProfileError, match="does not exist"):
        read_calibration_prompts(tmp_path / "missing.jsonl")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ProfileError, match="not UTF-8"):
        read_calibration_prompts(binary)
