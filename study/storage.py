"""Where a study lives: `--storage-path` as a URI, read and written through `pyarrow.fs`.

`pyarrow.fs` is what Ray Tune itself uses for `RunConfig(storage_path=..., storage_filesystem=...)`,
so the study's own small files (study.json, confirm.json) and Tune's experiment state and trial
checkpoints go to one place through one parsed filesystem:

- `s3://BUCKET/PATH`, `gs://BUCKET/PATH`: an object store every node can reach. An S3-compatible
  server (MinIO, Ceph, moto) is named in the URI's query, `s3://b/p?endpoint_override=HOST:PORT&scheme=http`,
  or by `$AWS_ENDPOINT_URL`; pyarrow honours both, and Ray's trial actors receive the filesystem
  (endpoint included) pickled, so worker nodes need only the credentials (`$AWS_ACCESS_KEY_ID`, ...).
- `file:///PATH`, `/PATH`, `~/PATH`: a local folder, or on a cluster a file system every node mounts.
- a relative path: resolved against the current folder, for the embedded run only. Under `ray job
  submit` that folder is the job's temporary copy of the working dir on the head node, which other
  nodes and a later `--resume` cannot reach, so it is refused there.

On an object store a write is one PUT (an object appears whole or not at all); on a local file system
it is a temporary file renamed over the target (`atop.io.atomic_write_bytes`).
"""
from __future__ import annotations

import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.fs as pafs

from atop.cli import check_folder_to_create
from atop.io import atomic_write_bytes
from study.errors import StudyError

#: URI schemes `--storage-path` accepts besides a plain path (pyarrow's names; `gcs` is an alias of `gs`)
SCHEMES = ("s3", "gs", "gcs", "file")
#: set by `ray job submit` in the environment of a submitted job's driver
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
ACCEPTED = "s3://BUCKET/PATH, gs://BUCKET/PATH, file:///PATH or an absolute path"


@dataclass(frozen=True)
class Storage:
    """A folder on a filesystem: the storage root, or a study's folder in it (`at`).

    Attributes:
        fs: the `pyarrow.fs.FileSystem` (picklable: Ray ships it to every trial).
        base: the folder's path on `fs` (`BUCKET/PREFIX` on an object store, an absolute local path).
        scheme: "s3" or "gs" for an object store, "" for a local (or mounted) file system.
    """

    fs: Any
    base: str
    scheme: str = ""

    @property
    def remote(self) -> bool:
        """True for an object store: no sqlite, no local file APIs."""
        return bool(self.scheme)

    def at(self, *names: str) -> Storage:
        """The folder `names` below this one."""
        return Storage(self.fs, self.path(*names), self.scheme)

    def path(self, *names: str) -> str:
        """The path of `names` (relative, '/'-separated) on `fs`."""
        return posixpath.join(self.base, *names) if names else self.base

    def where(self, *names: str) -> str:
        """`names` as a user would write it: a URI on an object store, else a path."""
        return f"{self.scheme}://{self.path(*names)}" if self.remote else self.path(*names)

    def exists(self, *names: str) -> bool:
        """Whether the file or folder exists (an object-store folder: any object below it)."""
        return self.fs.get_file_info(self.path(*names)).type != pafs.FileType.NotFound

    def listdir(self, *names: str) -> list[str]:
        """The names directly inside folder `names`, sorted ([] when it does not exist)."""
        selector = pafs.FileSelector(self.path(*names), allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(info.path.rstrip("/")) for info in self.fs.get_file_info(selector))

    def make(self) -> None:
        """Create the folder (and its parents)."""
        self.fs.create_dir(self.base, recursive=True)

    def remove(self) -> None:
        """Delete the folder and everything below it, if it exists."""
        if self.exists():
            self.fs.delete_dir(self.base)

    def read_json(self, name: str) -> Any:
        """The JSON file `name` of this folder, parsed."""
        with self.fs.open_input_stream(self.path(name)) as f:
            return json.loads(f.read())

    def write_json(self, name: str, value: Any) -> None:
        """Write `value` as the JSON file `name`, whole or not at all."""
        data = json.dumps(value, indent=2).encode()
        if not self.remote:
            atomic_write_bytes(self.path(name), data)
            return
        with self.fs.open_output_stream(self.path(name)) as f:  # one PUT when closed
            f.write(data)

    def tune_location(self) -> dict[str, Any]:
        """`tune.RunConfig` keywords that put a Tune experiment in this folder."""
        if not self.remote:
            return {"storage_path": self.base}
        return {"storage_path": self.base, "storage_filesystem": self.fs}

    def check(self) -> None:
        """A one-line `StudyError` unless the storage can be reached (an object store: its bucket exists).

        Creates nothing; a local folder is created when the study starts.
        """
        if not self.remote:
            check_folder_to_create("--storage-path", self.base, "the study folders")
            return
        bucket = self.base.split("/", 1)[0]
        try:
            found = self.fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError as exc:
            hint = ("the endpoint and credentials ($AWS_ENDPOINT_URL or ?endpoint_override=, $AWS_ACCESS_KEY_ID)"
                    if self.scheme == "s3" else "the credentials")
            raise StudyError(f"--storage-path {self.where()!r} is unreachable ({_first_line(exc)}); check "
                             f"{hint}") from None
        if not found:
            raise StudyError(f"--storage-path {self.where()!r}: bucket {bucket!r} does not exist; create it "
                             "first (the study creates folders, never buckets)")


def submitted() -> bool:
    """Whether this process is the driver of a `ray job submit` job."""
    return JOB_ENV in os.environ


def job_submission_id() -> str | None:
    """The submission id of the `ray job submit` job this process drives, or None."""
    return json.loads(os.environ.get(JOB_ENV, "{}")).get("metadata", {}).get("job_submission_id")


def parse(value: str, *, job: bool | None = None) -> Storage:
    """`--storage-path VALUE` as a `Storage`; creates nothing (pyarrow may look up an S3 bucket's
    region, or cloud credentials, unless the URI or environment names them; `Storage.check` contacts).

    Args:
        value: a URI (`s3://`, `gs://`, `file://`, with pyarrow's query options), an absolute path,
            `~/...`, or a relative path (the embedded run only).
        job: whether the driver runs under `ray job submit` (None: read `JOB_ENV`).

    Raises:
        StudyError: an unknown scheme, a bad URI option, a bucket-less object-store URI, or a
            relative path under a submitted job (one line: why and what to give instead).
    """
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if not scheme:
        path = Path(value).expanduser()
        if not path.is_absolute() and (submitted() if job is None else job):
            raise StudyError(f"--storage-path {value!r} is relative: under `ray job submit` it would land in the "
                             "job's temporary working dir on the head node, which other nodes and --resume cannot "
                             f"reach; give {ACCEPTED} on a file system every node mounts")
        return Storage(pafs.LocalFileSystem(), str(path.resolve()))
    if scheme not in SCHEMES:
        raise StudyError(f"--storage-path {value!r} has scheme {scheme!r}; accepted: {ACCEPTED}")
    try:
        fs, path = pafs.FileSystem.from_uri(value)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as exc:
        raise StudyError(f"--storage-path {value!r} is not usable ({_first_line(exc)}); accepted: {ACCEPTED}, "
                         "an S3-compatible server as ?endpoint_override=HOST:PORT&scheme=http") from None
    if isinstance(fs, pafs.LocalFileSystem):
        return Storage(fs, path)
    if not path.strip("/"):
        raise StudyError(f"--storage-path {value!r} names no bucket; accepted: {ACCEPTED}")
    return Storage(fs, path.rstrip("/"), "gs" if scheme == "gcs" else scheme)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def local_folder(store: Storage) -> Path:
    """The driver's own folder for a study in `store`: the study folder itself on a local file system;
    for an object store, `~/.cache/atop/studies/<name>` (MLflow spools, files made before upload)."""
    if not store.remote:
        return Path(store.base)
    return Path.home() / ".cache" / "atop" / "studies" / posixpath.basename(store.base)


def refuse_local_stores(storage: Storage, optuna_storage: str | None, mlflow_uri: str | None) -> None:
    """On an object store, a one-line `StudyError` unless Optuna's and MLflow's stores are given: their
    defaults are sqlite files in the study folder, and sqlite cannot live on an object store."""
    if not storage.remote:
        return
    if not optuna_storage:
        raise StudyError(f"--storage-path {storage.where()!r} is an object store, where the default sqlite "
                         "optuna.db cannot live; pass --optuna-storage URL (a database every driver reaches, "
                         "e.g. postgresql://user@db:5432/optuna)")
    if not mlflow_uri:
        raise StudyError(f"--storage-path {storage.where()!r} is an object store, where the default sqlite "
                         "mlflow.db cannot live; pass --mlflow-uri (a tracking server, e.g. http://mlflow:5000)")


def leave_job_working_dir() -> None:
    """Under `ray job submit`, move the driver out of the job's working dir (into the temp folder).

    Ray's runtime-env agent deletes a job's unpacked working dir once no worker process references
    it, which can happen while the driver still runs in it (Ray 2.60: "Unused uris ... working_dir"
    in runtime_env_agent.log after the trials ended); Tune then fails on an object-store path, whose
    `os.path.relpath` calls `os.getcwd()`. Call it once the command line's paths are resolved.
    """
    if submitted():
        os.chdir(tempfile.gettempdir())


def default_cache(storage: Storage) -> Path:
    """The pre-trained weights' default cache: `<storage>/.pretrained-cache` on a local (or mounted)
    storage; on an object store `atop.checkpoint.default_cache_dir()` on the driver's node (the
    weights reach trials through Ray's object store, and an object store cannot hold a file cache)."""
    from atop.checkpoint import STUDY_CACHE_DIR, default_cache_dir

    return default_cache_dir() if storage.remote else Path(storage.path(STUDY_CACHE_DIR))
