"""Checkpoints from the Hugging Face hub: `expert-store pack hf://ORG/NAME[@REVISION]`.

`huggingface_hub.snapshot_download` fetches only what packing reads (safetensors shards and
their index, config.json, the tokenizer files) into a hub cache directory, then `pack` reads
the snapshot like any local checkpoint directory. The library does the rest: a token from
`token=` or `$HF_TOKEN` for gated and private repositories, resumed partial downloads, files
already in the cache not fetched again, `$HF_HUB_OFFLINE=1` served from the cache alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SCHEME = "hf://"

# What `pack` reads from a checkpoint; weights in other formats (*.bin, *.pt, *.gguf) and the
# rest of a repository (README, images, original/ consolidated files) are not fetched.
ALLOW_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

# ORG/NAME as the hub allows them; REVISION: a branch, tag or commit (no spaces, no '@').
_REF_RE = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[^\s@]+))?$")


class HubError(ValueError):
    """A hub reference or download that cannot be used: one line for the user."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str              # "ORG/NAME"
    revision: str | None      # branch, tag or commit; None: the default branch

    @property
    def name(self) -> str:
        """NAME: the default model name in the store."""
        return self.repo_id.split("/", 1)[1]

    def __str__(self) -> str:
        return SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")


def is_hub_ref(text: str) -> bool:
    return str(text).startswith(SCHEME)


def parse_hub_ref(text: str) -> HubRef:
    """'hf://ORG/NAME' or 'hf://ORG/NAME@REVISION' -> HubRef; HubError otherwise."""
    m = _REF_RE.match(text)
    if not m or ".." in m.group("repo"):
        raise HubError(f"bad hub reference {text!r}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
    return HubRef(m.group("repo"), m.group("rev"))


def download(ref: HubRef, cache_dir: str | Path | None = None, token: str | None = None,
             progress: bool = True) -> Path:
    """The snapshot directory of `ref` in the hub cache (`cache_dir`, default the library's:
    $HF_HUB_CACHE or ~/.cache/huggingface/hub), fetched if needed. Token: `token`, else
    $HF_TOKEN (the library reads it). HubError for what the user can fix (unknown repository
    or revision, gated or private without a token, offline and not cached, no network)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError:
        raise HubError("packing from hf:// needs huggingface_hub: pip install 'huggingface_hub>=0.23'") from None
    if not progress:
        disable_progress_bars()
    try:
        path = snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=str(cache_dir) if cache_dir else None,
                                 allow_patterns=list(ALLOW_PATTERNS), token=token or None)
    except Exception as e:  # noqa: BLE001 - the library's errors, turned into one line
        raise HubError(_describe(ref, e)) from None
    finally:
        if not progress:
            enable_progress_bars()
    return Path(path)


def _describe(ref: HubRef, e: Exception) -> str:
    """One line for a failed download, naming the reference and what to do."""
    kind = type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0]
    if kind == "GatedRepoError" or "401" in first:
        return f"{ref}: access denied ({kind}); set HF_TOKEN to a token that may read {ref.repo_id}"
    if kind == "RepositoryNotFoundError":
        return f"{ref}: repository not found on the hub (or private: set HF_TOKEN)"
    if kind == "RevisionNotFoundError":
        return f"{ref}: revision {ref.revision!r} not found"
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return (f"{ref}: not in the hub cache and downloads are off (HF_HUB_OFFLINE) or the hub is "
                f"unreachable: {first}")
    return f"{ref}: download failed ({kind}: {first})"
