"""The Hugging Face Hub: download an exported cascade folder into the standard HF cache, upload one.

``huggingface_hub`` is an optional dependency (``pip install -e '.[hub]'``); it is imported only when a Hub name
is used, and its absence is one clear error. Everything else is the Hub's own conventions: the cache under
``HF_HOME`` (``HF_HUB_CACHE``), offline use with ``HF_HUB_OFFLINE=1``, the token from ``hf auth login`` or
``HF_TOKEN``; nothing here takes a token as an argument (it would end up in shell histories).
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

HUB_PREFIX = "hf://"
LIBRARY_NAME = "cascaded-diffusion"
INSTALL_HINT = "pip install -e '.[hub]' (or pip install huggingface_hub)"
# the Hub's repository names: OWNER/NAME, letters, digits, '-', '_', '.', at most 96 characters each
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def require_huggingface_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise UserError(f"the Hugging Face Hub needs the optional package huggingface_hub: {INSTALL_HINT}") from None
    return huggingface_hub


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UserError(f"{repo_id!r} is not a Hugging Face repository name; expected OWNER/NAME")
    return repo_id


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """``hf://OWNER/REPO[@REVISION]`` -> (``OWNER/REPO``, revision or None). A revision is a branch, a tag or a
    commit hash; a commit hash pins the files."""
    if not name.startswith(HUB_PREFIX):
        raise UserError(f"{name!r} is not a Hub name; expected {HUB_PREFIX}OWNER/REPO[@REVISION]")
    repo_id, at, revision = name[len(HUB_PREFIX):].partition("@")
    if at and not revision:
        raise UserError(f"{name}: empty revision after '@'")
    return check_repo_id(repo_id), revision or None


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(LIBRARY_NAME)
    except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        return "unknown"


def download_cascade(name: str) -> Path:
    """The local folder of ``hf://OWNER/REPO[@REVISION]``: ``snapshot_download`` into the standard HF cache, or
    the cached snapshot when offline. Not verified here (:func:`cascaded_diffusion.pretrained.find_cascade`
    checks the hashes before anything is loaded)."""
    hub = require_huggingface_hub()
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, revision = parse_hub_name(name)
    try:
        path = hub.snapshot_download(repo_id, revision=revision, library_name=LIBRARY_NAME,
                                     library_version=_library_version())
    except RevisionNotFoundError:
        raise UserError(f"{name}: the repository {repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise UserError(f"{name}: no model repository {repo_id} on the Hub (or it is private and this machine is "
                        "not logged in: hf auth login)") from None
    except LocalEntryNotFoundError as e:
        # offline (HF_HUB_OFFLINE=1) or the Hub unreachable, and no complete snapshot of this revision cached
        if hub.constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set"
        else:  # the Hub's own words say what failed (no route, a timeout, a refused token)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            why = f"the Hub could not be reached ({first[:200]})"
        raise UserError(f"{name} is not in the Hugging Face cache {hub.constants.HF_HUB_CACHE} (for revision "
                        f"{revision or 'main'}) and {why}: download it once with network access, or point HF_HOME at "
                        "the cache that holds it") from None
    return Path(path)


def check_logged_in() -> None:
    """Refuse before any export work when there is no token: the upload would fail only at the end."""
    hub = require_huggingface_hub()
    if hub.get_token() is None:
        raise UserError("not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN); the token "
                        "is read from there only")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, branch: str | None = None,
                commit_message: str = "Upload cascade") -> str:
    """Upload ``folder`` (an exported cascade) to the model repository ``repo_id`` and return the commit's URL.
    The repository is created if it does not exist (``private`` applies then only: an existing repository keeps
    its visibility); ``branch`` is created from main if it does not exist."""
    hub = require_huggingface_hub()
    check_repo_id(repo_id)
    check_logged_in()
    from huggingface_hub.utils import HfHubHTTPError

    api = hub.HfApi(library_name=LIBRARY_NAME, library_version=_library_version())
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if branch:
            api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=branch,
                                 commit_message=commit_message)
    except HfHubHTTPError as e:  # a refused token, no write access, a name taken: the Hub's own words
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the Hub refused the upload to {repo_id}: {first[:300]}") from None
    return str(getattr(info, "commit_url", None) or info)
