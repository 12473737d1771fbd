"""Pushing an export folder to the Hugging Face Hub. The token is never read here except to scrub it from error
messages: `huggingface_hub` finds it (`HF_TOKEN` or `hf auth login`)."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import create_branch, create_repo, get_token, upload_folder
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ttt_adapt._util import first_line
from ttt_adapt.export import ExportError, PushError
from ttt_adapt.recipe.sections import HUB_REPO_ID

BRANCH = re.compile(r"^(?!-)(?!.*\.\.)[\w.\-/]+(?<![./])$")


def check_hub_target(repo_id: str, revision: str | None = None) -> None:
    """`repo_id` must be ORG/NAME as the Hub accepts it; `revision` a plausible branch name."""
    if not isinstance(repo_id, str) or not HUB_REPO_ID.match(repo_id):
        raise ExportError(f"push_to_hub must be a Hub repo id ORG/NAME, got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ExportError(f"push_to_hub: {first_line(e)}") from None
    if revision is not None and not BRANCH.match(revision):
        raise ExportError(f"revision must be a branch name such as main or v1, got {revision!r}")


def push_folder(folder, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, allow_patterns: list[str] | None = None) -> str:
    """Upload `folder` (or its files matching `allow_patterns`) to the Hub model repo `repo_id` (created if
    missing, on branch `revision`, created from main if missing); return the commit URL. Raise `PushError` (one
    line, token scrubbed) on any failure."""
    check_hub_target(repo_id, revision)
    message = commit_message or f"Upload In-Place TTT model ({Path(folder).name})"
    try:
        create_repo(repo_id, private=private or None, exist_ok=True)  # None: the account's default visibility
        if revision not in (None, "main"):
            create_branch(repo_id, branch=revision, exist_ok=True)
        info = upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=message,
                             allow_patterns=allow_patterns)
    except Exception as e:  # network, auth, offline mode, quota ...: all mean "not pushed"; say why in one line
        raise PushError(f"push to {repo_id} failed ({_push_reason(e)}); the export is kept in {folder}") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def _push_reason(e: Exception) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        reason = f"HTTP {status}: no write access; log in with `hf auth login` or set HF_TOKEN to a write token"
    else:
        reason = f"{type(e).__name__}: {first_line(e)}"
    token = get_token()
    return reason.replace(token, "***") if token else reason


__all__ = ["push_folder", "check_hub_target"]
