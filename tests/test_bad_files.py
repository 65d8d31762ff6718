"""Property tests: a file that is not what it claims, given where a checkpoint or an `.npz` data file
is expected, is refused with the one-line error class (`CheckpointError` / `DataError`), never another
exception, whatever its bytes: random, empty, truncated, bit-flipped, or a file of another format.

The checkpoint property runs through `python -m atop.evaluate`'s `main` as a user would call it: exit
status 2, one `error:` line naming the file, no `--out` left behind.
"""
from __future__ import annotations

import io
import json
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from atop.checkpoint import load_checkpoint, load_defense, save_checkpoint
from atop.checkpoint_file import CheckpointError
from atop.config import Config
from atop.data import DataError, load_npz
from atop.evaluate import main as evaluate_main
from atop.models import CLASSIFIERS, UNetPurifier

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _checkpoint_bytes() -> bytes:
    cfg = Config.from_dict({"purifier_width": 4, "n_eval": 2})
    with tempfile.TemporaryDirectory() as folder:
        return save_checkpoint(Path(folder) / "defense.pt", kind="defense", cfg=cfg,
                               classifier=CLASSIFIERS["small_cnn"](10), purifier=UNetPurifier(4)).read_bytes()


def _npz_bytes(compressed: bool) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    arrays = {"x": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), "y": np.arange(4, dtype=np.int64)}
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


GOOD_CHECKPOINT = _checkpoint_bytes()
GOOD_NPZ = {False: _npz_bytes(False), True: _npz_bytes(True)}

#: plain data a foreign torch file or pickle may hold, including the keys our format uses
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True),
                  st.text(max_size=12), st.sampled_from(["atop-checkpoint", "defense", "classifier", "unet"]),
                  st.builds(lambda n: torch.zeros(n), st.integers(0, 3)))
_keys = st.one_of(st.sampled_from(["format", "version", "kind", "config", "classifier", "purifier",
                                   "discriminator", "classifier_ref", "state_dict", "name", "width",
                                   "num_classes", "x", "y"]), st.text(max_size=6))
_plain = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(_keys, inner, max_size=6)), max_leaves=20)


def _flip(data: bytes, positions: list[int], value: int) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[p % len(out)] ^= value or 1
    return bytes(out)


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _npz_of(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _zip_of(name: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, payload)
    return buffer.getvalue()


#: bytes that are not a whole, good checkpoint (some survive as loadable: then they must build)
checkpoint_files = st.one_of(
    st.binary(max_size=4096),
    st.integers(0, len(GOOD_CHECKPOINT) - 1).map(lambda n: GOOD_CHECKPOINT[:n]),
    st.builds(_flip, st.just(GOOD_CHECKPOINT), st.lists(st.integers(0, len(GOOD_CHECKPOINT)), min_size=1, max_size=8),
              st.integers(0, 255)),
    _plain.map(_torch_bytes),
    _plain.map(lambda obj: {"format": "atop-checkpoint", "version": 1, "kind": "defense", "config": obj}
               ).map(_torch_bytes),
    _plain.map(lambda obj: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)),
    _plain.map(lambda obj: json.dumps(obj, default=str).encode()),
    st.sampled_from(list(GOOD_NPZ.values())),
    # member names without NUL: zipfile cuts a name at its first NUL, and an empty name crashes writestr
    st.builds(_zip_of, st.text(st.characters(blacklist_characters="\x00"), min_size=1, max_size=12),
              st.binary(max_size=256)),
)

_dtypes = st.sampled_from([np.uint8, np.int64, np.float32, np.bool_, np.int8, np.complex64])
_shapes = st.lists(st.integers(0, 4), max_size=5).map(tuple)
_arrays = st.builds(lambda dtype, shape: np.zeros(shape, dtype=dtype), _dtypes, _shapes)

#: bytes that are not a good `.npz` of x (N x H x W x C uint8) and y (N integers)
npz_files = st.one_of(
    st.binary(max_size=4096),
    st.tuples(st.booleans(), st.floats(0, 1, exclude_max=True)).map(
        lambda t: GOOD_NPZ[t[0]][: int(t[1] * len(GOOD_NPZ[t[0]]))]),
    st.builds(lambda c, positions, v: _flip(GOOD_NPZ[c], positions, v), st.booleans(),
              st.lists(st.integers(0, 10**6), min_size=1, max_size=8), st.integers(0, 255)),
    st.dictionaries(st.sampled_from(["x", "y", "z"]), _arrays, max_size=3).map(_npz_of),
    st.builds(lambda x: _npz_of({"x": x, "y": np.arange(4)}), _arrays),
    st.just(GOOD_CHECKPOINT[:4096]),
    st.builds(_zip_of, st.sampled_from(["x.npy", "y.npy", "a/x.npy"]), st.binary(max_size=256)),
    _plain.map(lambda obj: pickle.dumps(obj)),
)


@pytest.fixture(scope="module")
def junk_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder whose test split is unreadable: a checkpoint that loads still ends in exit 2."""
    folder = tmp_path_factory.mktemp("junk-data")
    (folder / "cifar10_test.npz").write_text("not an npz")
    return folder


def test_the_good_files_load(tmp_path: Path) -> None:
    """The files the strategies start from are good: the properties below test the damage only."""
    assert load_checkpoint(GOOD_CHECKPOINT, kind="defense")["kind"] == "defense"
    for compressed, data in GOOD_NPZ.items():
        (tmp_path / f"{compressed}.npz").write_bytes(data)
        assert len(load_npz(tmp_path / f"{compressed}.npz")) == 4


@PROPERTY
@given(data=checkpoint_files)
def test_a_bad_checkpoint_is_a_checkpoint_error(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "given.pt"
    path.write_bytes(data)
    try:
        load_defense(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and "given.pt" in str(exc) and "weights_only" not in str(exc), str(exc)


@PROPERTY
@given(data=checkpoint_files)
def test_the_evaluate_cli_refuses_a_bad_checkpoint_in_one_line(data: bytes, tmp_path: Path, junk_data: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    path, out = tmp_path / "given.pt", tmp_path / "eval"
    path.write_bytes(data)
    assert evaluate_main(["--checkpoint", str(path), "--out", str(out), "--data-dir", str(junk_data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert ("given.pt" in err or "cifar10_test.npz" in err) and "weights_only" not in err, err
    assert not out.exists()


# an empty file raises EOFError and a damaged compressed member zlib.error inside numpy: both examples
# below hit them
@PROPERTY
@example(data=b"")
@example(data=_flip(GOOD_NPZ[True], [28], 0xFF))
@given(data=npz_files)
def test_a_bad_npz_is_a_data_error(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "given.npz"
    path.write_bytes(data)
    try:
        split = load_npz(path)
    except DataError as exc:
        assert "\n" not in str(exc) and "given.npz" in str(exc), str(exc)
    else:  # damage that kept a valid file (e.g. a flipped pixel) must still be a valid split
        assert split.x.dtype == torch.uint8 and split.x.ndim == 4 and len(split.y) == len(split.x)
