"""One resolver for every command that names a model: a checkpoint folder or a Hugging Face Hub id.

:func:`resolve_model` returns a local folder holding ``config.json``:

- an existing folder is checked (``config.json`` present: :func:`mast.models.check_checkpoint_dir`, the one
  model-folder check) and returned as an absolute path;
- anything that looks like a path (``./x``, ``/x``, ``~/x``) but is no folder is an error;
- anything else is a Hub id (``org/name``), resolved by ``huggingface_hub.snapshot_download``
  into the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``). With
  ``HF_HUB_OFFLINE=1`` (compute nodes without internet) only the cache is read
  (``local_files_only``): fill it beforehand with ``huggingface-cli download ORG/NAME``.

Every failure is one :class:`InputError` line that names the field and says what to do. The
environment is read at call time, so a test (or a launcher) may set ``HF_HOME`` after import.
"""

from __future__ import annotations

import os
from pathlib import Path

from mast.files import InputError
from mast.models import check_checkpoint_dir

# what a checkpoint needs for loading, tokenizing and chat templates; no *.bin / *.pt duplicates
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The Hub cache this process uses: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def looks_like_path(name: str) -> bool:
    """A name written as a path (./x, ../x, /x, ~/x, x/y/z, C:\\x), never a Hub id (org/name)."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or (len(name) > 1 and name[1] == ":")


def resolve_model(name_or_path: str | os.PathLike, field: str = "model") -> str:
    """A local checkpoint folder for a folder or a Hub id (see the module doc); `field` names it in errors."""
    name = str(name_or_path)
    if Path(name).expanduser().is_dir():
        return str(check_checkpoint_dir(name, field))
    if looks_like_path(name) or not name.strip():
        raise InputError(f"{field}: {name}: folder not found")
    folder = _snapshot(name, field)
    if not (Path(folder) / "config.json").is_file():
        raise InputError(f"{field}: {name}: the Hub snapshot {folder} has no config.json (not a transformers model)")
    return folder


def _snapshot(repo_id: str, field: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = hub_offline()
    cache = hub_cache_dir()
    try:
        return snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, cache_dir=str(cache),
                                 local_files_only=offline)
    except HFValidationError:
        raise InputError(f"{field}: {repo_id}: neither a folder nor a Hub id (org/name)") from None
    except GatedRepoError:
        raise InputError(f"{field}: {repo_id}: gated on the Hugging Face Hub: accept its terms and "
                         "`huggingface-cli login` (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise InputError(f"{field}: {repo_id}: no such model on the Hugging Face Hub (or it is private: "
                         "set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        if offline:
            raise InputError(f"{field}: {repo_id}: not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1: "
                             f"run `hf download {repo_id}` with the same HF_HOME where there is "
                             "internet, or pass a local folder") from None
        raise InputError(f"{field}: {repo_id}: cannot reach the Hugging Face Hub and it is not in the cache "
                         f"{cache}: download it where there is internet (same HF_HOME), or set "
                         "HF_HUB_OFFLINE=1 with a filled cache, or pass a local folder") from None
    except OSError as e:  # network errors, a read-only cache
        raise InputError(f"{field}: {repo_id}: cannot fetch it from the Hugging Face Hub "
                         f"({type(e).__name__}); pass a local folder or fill the cache {cache}") from None
