"""Models by Hugging Face Hub id: `org/name` or `org/name@revision` wherever a model location is accepted.

Why: a user arriving from TRL, LLaMA-Factory or lmms-eval names `llava-hf/llava-1.5-7b-hf`, not a folder.
An id resolves through `huggingface_hub` as a user's own scripts would: its cache (`HF_HUB_CACHE` /
`HF_HOME`), its token variables, and `HF_HUB_OFFLINE` when the user sets it (we never set it). What the
rest of the project receives is the local snapshot folder, so vLLM, Serve and `from_pretrained` load local
files, and the snapshot's commit hash is the model's identity: a branch that moves is a changed input.

Only safetensors weights are fetched (`ALLOW`): a repository that has pickle weights only is refused by the
loaders (`checkpoint.UnsafeCheckpoint`, `use_safetensors=True`), and downloading them would be waste.

What is an id: a string of exactly two `/`-separated names (optionally `@revision`) that is not a URI and
not an existing local path. An existing local folder always wins, so `runs/tiny` stays the folder when it
exists; a missing relative folder of two components is then looked up on the Hub, and the error says both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")

ALLOW = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py", "*.md"]
"""What a snapshot fetches: configs, safetensors weights, tokenizer and processor files, model card."""


class HubError(FileNotFoundError):
    """A Hub id that cannot be resolved here; the message says which case (not found, gated, revision,
    offline and not cached, unreachable)."""


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def hub_ref(location: str) -> HubRef | None:
    """The Hub id `location` names, or None (a local path, a URI, anything else)."""
    if not location or "://" in location or location.startswith(("/", ".", "~")):
        return None
    match = _ID.match(location)
    if match is None or os.path.exists(location) or os.path.exists(location.split("@", 1)[0]):
        return None
    return HubRef(match["repo"], match["rev"])


@dataclass(frozen=True)
class Snapshot:
    ref: HubRef
    path: str
    """The local snapshot folder (inside the hub cache)."""
    commit: str
    """The 40-hex commit the revision resolved to."""


def offline() -> bool:
    """Whether the user set `HF_HUB_OFFLINE` (huggingface_hub's own truthy spellings)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


_RESOLVED: dict[str, Snapshot] = {}
"""Per process: a job resolves a branch once, so all its stages see one commit even if the branch moves
meanwhile; the next job resolves it again."""


def forget() -> None:
    """Resolve every id again on next use (a long-lived process that wants a moved branch now)."""
    _RESOLVED.clear()


def snapshot(ref: HubRef) -> Snapshot:
    """The local snapshot of `ref` (downloaded into the hub cache unless it is there already or the user
    set `HF_HUB_OFFLINE`), once per process and id."""
    key = str(ref)
    if key in _RESOLVED and os.path.isdir(_RESOLVED[key].path):
        return _RESOLVED[key]
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(ref.repo, revision=ref.revision, allow_patterns=ALLOW)
    except hf_errors.GatedRepoError:
        raise HubError(f"{ref}: gated on the Hub; accept its terms and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(
            f"{ref}: no such model on the Hub (or private: set HF_TOKEN), and no local folder {ref.repo}"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{ref}: revision {ref.revision!r} not found") from None
    except hf_errors.LocalEntryNotFoundError:
        why = (
            "HF_HUB_OFFLINE is set and it is not in the hub cache" if offline() else "the Hub is unreachable"
        )
        raise HubError(
            f"{ref}: {why} ({_cache_dir()}); download it where the Hub is reachable "
            f"(`huggingface-cli download {ref.repo}`) or point at a local folder"
        ) from None
    found = Snapshot(ref, path, os.path.basename(os.path.normpath(path)))
    _RESOLVED[key] = found
    return found


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def localize(location: str) -> str:
    """`location` with a Hub id replaced by its local snapshot folder (anything else unchanged)."""
    ref = hub_ref(location)
    return location if ref is None else snapshot(ref).path


def identity(location: str) -> dict[str, str] | None:
    """A Hub id's identity for stage hashes and manifests (`{"hub": id, "commit": sha}`), else None."""
    ref = hub_ref(location)
    if ref is None:
        return None
    return {"hub": str(ref), "commit": snapshot(ref).commit}
