"""The Hugging Face Hub itself, behind `digit.hub`'s model folders: repository ids, offline mode, download
(configs and weights only) and upload, each failure one line saying what to do. `huggingface_hub` is imported only
inside these functions."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digit.errors import DigitError

if TYPE_CHECKING:
    from digit.pipeline import Pipeline

# what a download fetches: configs, weights, centroids, the card (never pickles or anything executable)
HUB_FILES = ["*.json", "*.safetensors", "*.npy", "*.md"]
_TRUE = {"1", "on", "yes", "true"}


def looks_like_repo_id(name: str) -> bool:
    # "owner/name" or a bare "name", hub characters only; a path-like string (./x, /x, ~/x, a/b/c) is a missing folder
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None and ".." not in name


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set now, or when huggingface_hub was imported."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().lower() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """``snapshot_download`` of a model repository's configs and weights -> the local snapshot folder. Offline
    (HF_HUB_OFFLINE, ``local_files_only``) only the cache is read; a miss is a one-line DigitError saying what to
    download and how."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - a dependency; only a broken install lacks it
        raise DigitError(f"loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub ({e})") from e
    from digit import __version__

    why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set" if hub_offline() else None
    rev = f" --revision {revision}" if revision else ""
    local_name = repo_id.replace("/", "--")
    fetch = (
        f"download it where there is network with `hf download {repo_id}{rev} --local-dir {local_name}` "
        f'and load that folder: Pipeline.from_pretrained("{local_name}")'
    )
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=why is not None,
            allow_patterns=HUB_FILES,
            library_name="digit",
            library_version=__version__,
        )
    except GatedRepoError as e:
        raise DigitError(
            f"{repo_id} is a gated repository: accept its terms on the Hub, then log in (`hf auth login`) or pass token="
        ) from e
    except RepositoryNotFoundError as e:
        raise DigitError(
            f"{repo_id}: no such model repository on the Hugging Face Hub (or it is private: log in with `hf auth login` or pass token=)"
        ) from e
    except RevisionNotFoundError as e:
        raise DigitError(f"{repo_id} has no revision {revision!r}") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        if why is not None:
            raise DigitError(
                f"{repo_id} is not a local folder nor in the Hugging Face cache, and the Hub is offline ({why}): {fetch}"
            ) from e
        raise DigitError(
            f"{repo_id} is not a local folder nor in the Hugging Face cache, and the Hub could not be reached: {fetch}"
        ) from e
    except HfHubHTTPError as e:
        raise DigitError(f"the Hugging Face Hub refused {repo_id}: {first_line(e)}") from e
    return Path(path)


def push_to_hub(
    pipe: Pipeline,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload digit pipeline",
    create_pr: bool = False,
    license: str | None = None,
) -> Any:
    """``save_pretrained`` into a temporary folder, ``HfApi.create_repo(exist_ok=True)``, ``upload_folder``."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from digit.hub import save_pretrained
    from digit.utils.outputs import MARKER

    if not isinstance(repo_id, str) or not looks_like_repo_id(repo_id):
        raise DigitError(f"push_to_hub needs a repository id such as 'owner/name', got {repo_id!r}")
    with tempfile.TemporaryDirectory(prefix="digit-push-") as tmp:
        folder = save_pretrained(pipe, Path(tmp) / "model", license=license, repo_id=repo_id)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
                ignore_patterns=[MARKER],
            )
        except HfHubHTTPError as e:  # 401 / 403 / 404 ...: one line, not the HTTP client's traceback
            raise DigitError(f"the Hugging Face Hub refused the upload to {repo_id}: {first_line(e)}") from e


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
