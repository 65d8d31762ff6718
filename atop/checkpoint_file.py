"""The outside of a checkpoint file, checked without torch: a bad file given on a command line is
refused in well under a second, before torch is imported (tests/test_refusal.py).

`torch.save` writes a zip archive (PyTorch >= 1.6): `<prefix>/data.pkl` (the pickled object), a
`<prefix>/version` record (also `<prefix>/.data/version` since PyTorch 2.x) and one `<prefix>/data/<n>`
member per tensor storage, all stored uncompressed. `check_torch_file` refuses a file that cannot be
one: not a zip archive, a broken or truncated archive, no `data.pkl` or version record, or a small
member whose CRC-32 does not match. The tensor storages are left to `torch.load` (they can be
gigabytes; this check reads kilobytes).

A legacy (non-zip) torch file, `torch.save(..., _use_new_zipfile_serialization=False)`, is accepted
when `torch.load(weights_only=True)` can read it: its pickle protocol 2 or 3 (protocol 2 is
`torch.save`'s default) and PyTorch's magic number open it. With protocol 4 or 5 (framed pickles) or
in the older tar format, the weights-only loader refuses the file, so it is refused here already.
`atop.checkpoint.read_torch_file` runs this check before every `torch.load`, so a file is judged the
same way wherever it is given.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import IO

from atop.config import Config
from atop.names import NUM_CLASSES

FORMAT, VERSION = "atop-checkpoint", 1
#: what a checkpoint argument accepts, for error messages
ACCEPTED = f"an atop checkpoint file (format={FORMAT!r}, version {VERSION}; see docs/CHECKPOINTS.md)"

#: how torch.save's zip archive begins (PyTorch itself tells a zip file by these four bytes)
ZIP_MAGIC = b"PK\x03\x04"
#: how a legacy torch file begins: pickle PROTO 2 or 3, then PyTorch's magic number as a 10-byte long
LEGACY_MAGIC = tuple(b"\x80" + bytes([protocol]) + b"\x8a\x0a" + 0x1950A86A20F9469CFC6C.to_bytes(10, "little")
                     for protocol in (2, 3))


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, of another kind or of another model; one-line message."""


def check_torch_file(source: Path | bytes, what: str, accepted: str) -> None:
    """Refuse, without torch, a file that cannot be a `torch.save` file (see the module's docstring).

    Args:
        source: the file, or its bytes.
        what: what the file was given as, for the message (e.g. "checkpoint", "--pretrained classifier").
        accepted: what the argument accepts, for the message ("expected <accepted>").

    Raises:
        CheckpointError: one line naming the file, why it is refused and what was expected.
    """
    if isinstance(source, bytes):
        label, size = f"{what} <bytes>", len(source)
    else:
        label = f"{what} {str(source)!r}"
        if source.is_dir():
            raise CheckpointError(f"{label} is a folder; expected {accepted}")
        if not source.is_file():
            raise CheckpointError(f"{label} does not exist; expected {accepted}")
        size = source.stat().st_size
    if size == 0:
        raise CheckpointError(f"{label} is an empty file; expected {accepted}")
    try:
        with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as f:
            why = _why_not_torch(f)
    except PermissionError as exc:
        raise CheckpointError(f"{label} cannot be read ({exc.strerror}); expected {accepted}") from None
    if why:
        raise CheckpointError(f"{label} does not load: it is corrupt, truncated or not a torch file ({why}); "
                              f"expected {accepted}")


def _why_not_torch(f: IO[bytes]) -> str | None:
    """Why the open file `f` cannot be a torch file, or None where it can."""
    head = f.read(max(len(m) for m in LEGACY_MAGIC))
    if head.startswith(LEGACY_MAGIC):
        return None
    if not head.startswith(ZIP_MAGIC):
        return "neither a zip archive nor a legacy torch file"
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as archive:
            members = archive.infolist()
            pickles = [m.filename for m in members if m.filename.count("/") == 1 and m.filename.endswith("/data.pkl")]
            if len(pickles) != 1:
                return "a zip archive without one <name>/data.pkl" if not pickles else "a zip archive with several data.pkl"
            prefix = pickles[0].removesuffix("data.pkl")
            names = {m.filename for m in members}
            if not {f"{prefix}version", f"{prefix}.data/version"} & names:
                return f"a zip archive without {prefix}version"
            for member in members:
                # CRC 0: torch.save wrote none (torch.serialization.set_crc32_options(False))
                if not member.filename.startswith(f"{prefix}data/") and member.CRC != 0:
                    archive.read(member)  # checks the member's CRC-32 and length
    except Exception as exc:  # noqa: BLE001 - zipfile on arbitrary bytes raises many types; all mean "broken"
        return f"a broken zip archive: {str(exc)[:80] or type(exc).__name__}"
    return None


def classifier_expected(cfg: Config) -> str:
    """What a classifier file given for `cfg` must hold (`atop.pretrained_cache.check_classifier_file`)."""
    return (f"an atop classifier checkpoint or a state dict of {cfg.classifier} for {cfg.dataset} "
            f"({NUM_CLASSES[cfg.dataset]} classes)")


def purifier_expected(cfg: Config) -> str:
    """What a purifier file given for `cfg` must hold (`atop.pretrained_cache.check_purifier_file`)."""
    return (f"an atop purifier or defense checkpoint of {cfg.purifier} (width {cfg.purifier_width}) for "
            f"{cfg.dataset}, with its discriminator")


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
