"""Reading and writing the plain files stages exchange (JSON, JSONL, checkpoint folders).

Every reader raises :class:`InputError` naming the file (and line or field) at fault, so the
CLI can exit 2 with one line. Every writer is atomic: it writes a temporary sibling and
renames it, so a crash or a retry never leaves a half-written result behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class InputError(Exception):
    """Bad user input. The CLI prints the message (one line) and exits with status 2."""


def now() -> str:
    """The local time as the manifests record it (sweep.json, prepared.json, a trial's error.json)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def log(msg: str) -> None:
    """One progress line of a sweep on stderr (flushed: Ray workers and the driver interleave)."""
    print(f"[mast sweep] {msg}", file=sys.stderr, flush=True)


def read_text(path: str | os.PathLike) -> str:
    """The whole file as UTF-8 text; InputError naming the file when it is missing or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {'is a directory, not a file' if path.is_dir() else 'file not found'}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, row) of each non-blank line of a JSONL file; InputError naming the file and line
    when a line is not JSON or not an object."""
    path = Path(path)
    # split on "\n" only: splitlines() would also split at a U+2028 inside a JSON string
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict]:
    """Rows of a JSONL file; blank lines are skipped, each row must be an object with `required`."""
    required = tuple(required)
    rows = []
    for lineno, row in iter_jsonl(path):
        missing = [k for k in required if k not in row]
        if missing:
            raise InputError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    return rows


def read_json(path: str | os.PathLike, expect: type | None = None) -> Any:
    """A JSON file's value; with `expect` (e.g. dict) anything else is an InputError naming the file."""
    path = Path(path)
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if expect is not None and not isinstance(value, expect):
        want = {dict: "a JSON object", list: "a JSON array"}.get(expect, expect.__name__)
        raise InputError(f"{path}: expected {want}, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type (for messages)."""
    for t, name in ((dict, "an object"), (list, "an array"), (str, "a string"), (bool, "a boolean"),
                    (int, "a number"), (float, "a number")):
        if isinstance(value, t):
            return name
    return "null"


def check_output_path(path: str | os.PathLike, flag: str = "--out", kind: str = "file") -> Path:
    """`path` as a Path, refused up front when it cannot be written as a `kind` ("file" or "dir").

    Checked before any work starts: an existing path of the other kind, or a parent that is a
    file, would otherwise fail only when the result is written (after the work) or, for a
    folder, silently replace a file.
    """
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise InputError(f"{flag} {path}: is a directory (expected a file path)")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: exists and is not a folder")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is not a folder")
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    _atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    _atomic_write_text(Path(path), "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final` in one rename.

    On an exception the temporary folder is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise InputError(f"{final}: already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stable_hash(obj: Any) -> str:
    """Content hash of a JSON-serialisable object (key order independent); 16 hex chars."""
    text = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def fingerprint_model(model_dir: str | os.PathLike) -> str:
    """Content fingerprint of a checkpoint folder: weights (*.safetensors, *.bin), config, tokenizer.

    A Hub id (a path that does not exist locally) is fingerprinted by its name; resolve it
    to a local snapshot first for a content hash. The result is memoised per (path, mtimes).
    """
    d = Path(model_dir)
    if not d.is_dir():
        return "hub:" + str(model_dir)
    files = sorted(
        p for p in d.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in _MODEL_FILES)
    )
    if not files:
        raise InputError(f"{d}: not a checkpoint folder (no *.safetensors or config.json)")
    key = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    cached = _FINGERPRINTS.get((str(d.resolve()), key))
    if cached:
        return cached
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    fp = h.hexdigest()[:16]
    _FINGERPRINTS[(str(d.resolve()), key)] = fp
    return fp


_FINGERPRINTS: dict = {}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where content-addressed caches live: `cache_dir`, else $MAST_CACHE, else ~/.cache/mast."""
    root = check_output_path(cache_dir or os.environ.get("MAST_CACHE") or Path.home() / ".cache" / "mast",
                             "cache folder", "dir")
    root.mkdir(parents=True, exist_ok=True)
    return root
