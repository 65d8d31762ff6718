"""`atop.checkpoint_file.check_torch_file`: the outside of a torch file, checked without torch.

What it accepts must load (zip archives, with or without CRCs; legacy files of pickle protocol 2 or
3); what it refuses as a format torch's weights-only loader refuses too (legacy files of protocol 4);
a corrupt archive is refused in one line, even where `torch.load` would not notice (a bad CRC-32).
tests/test_refusal.py checks that the command lines refuse such files before importing torch.
"""
from __future__ import annotations

import io
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atop.checkpoint import load_checkpoint, save_checkpoint
from atop.checkpoint_file import CheckpointError, check_torch_file
from atop.config import Config
from atop.models import CLASSIFIERS

CFG = Config.from_dict({"classifier": "small_cnn"})


def _torch_bytes(obj: object = None, **save_options) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4.0), "n": 3} if obj is None else obj, buffer, **save_options)
    return buffer.getvalue()


def _torch_loads(data: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the weights-only unpickler warns about protocols above 2
            torch.load(io.BytesIO(data), weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means "does not load"
        return False
    return True


def _refusal(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "c.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as caught:
        check_torch_file(path, "checkpoint", "an atop checkpoint")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and message.endswith("expected an atop checkpoint")
    return message


@pytest.mark.parametrize("options", [{}, {"_use_new_zipfile_serialization": False},
                                     {"_use_new_zipfile_serialization": False, "pickle_protocol": 3}],
                         ids=["zip", "legacy protocol 2", "legacy protocol 3"])
def test_the_formats_torch_loads_safely_pass(options: dict) -> None:
    data = _torch_bytes(**options)
    check_torch_file(data, "checkpoint", "x")
    assert _torch_loads(data)


def test_a_legacy_atop_checkpoint_loads(tmp_path: Path) -> None:
    """The decision for legacy (non-zip) files: accepted wherever torch's weights-only loader reads them."""
    zipped = save_checkpoint(tmp_path / "c.pt", kind="classifier", cfg=CFG, classifier=CLASSIFIERS["small_cnn"](10))
    blob = torch.load(zipped, weights_only=True)
    torch.save(blob, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert load_checkpoint(tmp_path / "legacy.pt", kind="classifier")["kind"] == "classifier"


def test_an_archive_written_without_crcs_passes() -> None:
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        data = _torch_bytes()
    finally:
        torch.serialization.set_crc32_options(before)
    assert {m.CRC for m in zipfile.ZipFile(io.BytesIO(data)).infolist()} == {0}
    check_torch_file(data, "checkpoint", "x")
    assert _torch_loads(data)


def test_a_legacy_file_torch_cannot_load_safely_is_refused_as_torch_refuses_it(tmp_path: Path) -> None:
    data = _torch_bytes(_use_new_zipfile_serialization=False, pickle_protocol=4)
    assert "neither a zip archive nor a legacy torch file" in _refusal(data, tmp_path)
    assert not _torch_loads(data)


@pytest.mark.parametrize("damage, why", [
    (lambda d: d[: len(d) // 2], "broken zip archive"),
    (lambda d: b"PK\x03\x04" + d[4:64], "broken zip archive"),
    (lambda d: b"\x89PNG\r\n\x1a\n" + d, "neither a zip archive nor a legacy torch file"),
    (lambda d: _rezipped(d, drop="data.pkl"), "without one <name>/data.pkl"),
    (lambda d: _rezipped(d, drop="version"), "without archive/version"),
], ids=["truncated", "header only", "another format", "no data.pkl", "no version record"])
def test_a_file_that_cannot_be_a_torch_file_is_refused_in_one_line(damage, why: str, tmp_path: Path) -> None:
    data = damage(_torch_bytes())
    assert why in _refusal(data, tmp_path)
    assert not _torch_loads(data)


def test_a_bad_crc_is_refused_where_torch_load_would_not_notice(tmp_path: Path) -> None:
    """Stricter than torch.load, which reads data.pkl without checking its CRC-32: a flipped byte in a
    key name would load as another key."""
    data = bytearray(_torch_bytes())
    at = bytes(data).index(b"w", 30)  # the key "w" inside archive/data.pkl
    data[at] = ord("v")
    assert _torch_loads(bytes(data))
    assert "Bad CRC-32" in _refusal(bytes(data), tmp_path)


def _rezipped(data: bytes, drop: str) -> bytes:
    """The archive without its members whose name ends with `/<drop>`."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for member in source.infolist():
            if not member.filename.endswith(f"/{drop}"):
                target.writestr(member, source.read(member))
    return out.getvalue()


GOOD = _torch_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, len(GOOD)), flips=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)),
                                                    max_size=3))
def test_a_damaged_file_passes_or_is_refused_in_one_line_and_what_passes_torch_judges(cut: int, flips: list) -> None:
    """Any damage: a `CheckpointError`, never another exception; a refusal of an unreadable archive is
    shared by torch (only a CRC or header mismatch is refused where torch reads on)."""
    data = bytearray(GOOD)
    for at, mask in flips:
        data[at] ^= mask
    damaged = bytes(data[:cut])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.pt"
        path.write_bytes(damaged)
        try:
            check_torch_file(path, "checkpoint", "x")
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            if cut < len(GOOD):  # truncated: torch cannot read it either
                assert not _torch_loads(damaged)
