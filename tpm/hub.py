"""Policies on the Hugging Face Hub: a repo id resolves to a folder in the HF cache; a folder uploads.

An exported policy is a folder (``config.json`` + ``model.safetensors`` + ``README.md``, see
:mod:`tpm.io` and :mod:`tpm.model_card`), so a Hub repo holding one is read the way diffusers,
transformers and peft read theirs: huggingface_hub downloads it into its cache
(``$HF_HUB_CACHE/models--org--name/snapshots/<commit>/``) and answers from that cache when
``HF_HUB_OFFLINE=1`` or the Hub cannot be reached. We call :func:`huggingface_hub.hf_hub_download`
for ``config.json`` first (a repo that holds no policy fails before any weights are fetched), then
:func:`huggingface_hub.snapshot_download` for the policy's files; uploads are
``HfApi.create_repo`` + ``HfApi.upload_folder``. Nothing here parses the cache layout itself.

Why not ``huggingface_hub.ModelHubMixin``: it rebuilds a class from its ``__init__`` keyword
arguments stored in ``config.json``, whereas a policy folder names its class through the policy
registry (the ``"policy"`` key) and holds a config dataclass; the mixin's loader would bypass
the registry's checks and messages. We reuse its building blocks instead.

Every failure a user can cause (unknown or private repo, unknown revision, a repo that holds no
policy, not cached while offline) raises one :class:`HubError` that says what to do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

#: what a policy folder holds (the weights only when the policy has some)
POLICY_FILES = ["config.json", "model.safetensors", "README.md"]
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


class HubError(ValueError):
    """A Hub repo that cannot be used as a policy (missing, not cached offline, holds no policy)."""


def split_revision(spec: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; without ``@``, the revision is None."""
    repo, at, rev = str(spec).partition("@")
    return repo, (rev if at else None)


def is_repo_id(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` reads as a Hub repo id ``org/name`` (optionally ``@revision``) rather than a path."""
    repo, _ = split_revision(str(spec))
    return bool(_REPO_ID.fullmatch(repo)) and not repo.startswith(".") and ".." not in repo


def resolve(repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
            cache_dir: str | os.PathLike | None = None, files: Sequence[str] = POLICY_FILES,
            kind: str = "policy") -> str:
    """The local snapshot folder of Hub repo ``repo_id`` at ``revision`` (a branch, tag or commit;
    default ``main``), downloaded into the HF cache if needed; offline, read from the cache only.

    ``repo_id`` may carry the revision as ``org/name@rev``. ``files`` are the files fetched, the first
    of which must exist (a policy's ``config.json``; ``tpm.schedulers`` asks for
    ``scheduler_config.json``); ``kind`` names what the repo should hold in messages. Raises
    :class:`HubError`.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, at_rev = split_revision(repo_id)
    if revision is not None and at_rev is not None and revision != at_rev:
        raise HubError(f"two revisions for {repo_id!r}: {at_rev!r} (after @) and revision={revision!r}; give one")
    revision = revision or at_rev
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    kw: dict[str, Any] = {"revision": revision, "token": token, "cache_dir": cache_dir}
    try:
        try:
            hf_hub_download(repo_id, files[0], **kw)
        except LocalEntryNotFoundError:
            # Offline: a cached snapshot without the marker file holds no policy; no snapshot re-raises.
            snapshot_download(repo_id, local_files_only=True, **kw)
            raise EntryNotFoundError(files[0]) from None
        return snapshot_download(repo_id, allow_patterns=list(files), **kw)
    except RevisionNotFoundError:
        raise HubError(f"Hub repo {repo_id!r} has no revision {revision!r}; give a branch, tag or commit "
                       "it has (revision=... or org/name@rev)") from None
    except RepositoryNotFoundError:
        raise HubError(f"Hub repo {repo_id!r} was not found, or it is private or gated and no valid token was "
                       "given (log in with `hf auth login` or pass token=...); for a local folder give its "
                       "path (./name)") from None
    except LocalEntryNotFoundError:
        # Not in the cache, and the Hub was not asked (HF_HUB_OFFLINE=1) or could not be reached.
        raise HubError(f"{kind} {where} is not in the local HF cache ({cache_dir or _cache_dir()}) and the Hub "
                       "cannot be reached (offline); download it where the Hub is reachable "
                       f"(`hf download {repo_id}`), or give a local {kind} folder") from None
    except EntryNotFoundError:
        raise HubError(f"Hub repo {where} holds no {kind}: it has no {files[0]} (export one with "
                       "`save_pretrained(dir)` or `push_to_hub(repo_id)`)") from None
    except HfHubHTTPError as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise HubError(f"could not read Hub repo {where} ({first}); check the repo id and your connection") from None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def push_folder(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                token: str | bool | None = None, commit_message: str | None = None, create_pr: bool = False):
    """Upload an exported policy folder to Hub repo ``repo_id`` (created if missing) as one commit;
    returns huggingface_hub's ``CommitInfo``. ``revision``: the branch to commit to (default main)."""
    from huggingface_hub import HfApi

    if not is_repo_id(repo_id) or "@" in repo_id:
        raise HubError(f"{repo_id!r} is not a Hub repo id; use org/name (the revision goes in revision=...)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise HubError(f"{folder} has no config.json: it is not an exported policy")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, create_pr=create_pr,
                             commit_message=commit_message or "Upload tpm policy", allow_patterns=POLICY_FILES)
