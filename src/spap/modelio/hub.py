"""Upload a saved folder to the Hugging Face Hub, only when the user asks (`--push-to-hub`)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import SpapError

log = logging.getLogger(__name__)


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if the Hub accepts it as a repository name (checked before any long work)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise SpapError(f"--push-to-hub '{repo_id}' is not a Hub repository id ({e}); use "
                        "NAME or ORG/NAME") from None
    return repo_id


def push_folder(folder: str | Path, repo_id: str) -> str:
    """Create model repository `repo_id` if it does not exist and upload `folder` (weights,
    tokenizer, spap.json, README.md) to it; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="Upload a model pruned with spap")
    except Exception as e:  # no token, no network, no write access: all a user can fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SpapError(f"could not upload '{folder}' to the Hub repository '{repo_id}' "
                        f"({first}); log in with `hf auth login` (or set HF_TOKEN) and check "
                        "you may write there; the folder itself is saved") from None
    log.info("uploaded %s to %s", folder, repo_id)
    return str(getattr(info, "commit_url", info))
