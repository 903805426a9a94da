"""Where emotion models come from: the packaged default and local directories need
nothing; a Hugging Face hub id is fetched into the local cache here, before a run, so
that inference itself never goes online (and an offline machine fails in seconds)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from transforms.emotion_model import DEFAULT_MODEL

_LOG = logging.getLogger(__name__)
# What a text-classification model needs from the hub: no other weights' formats.
_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "tokenizer*"]


def offline() -> bool:
    """Whether the user said the hub is off limits (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``)."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub, so an offline machine fails in seconds, not after
    huggingface_hub's retries (skipped behind a proxy, which a probe cannot see)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def fetch(model: str) -> None:
    """Make a hub model available offline: download it into the Hugging Face cache if it
    is a hub id that is not there yet and the hub is reachable. Anything else is left to
    ``transforms.emotion.check_model``, which says what is wrong in one line."""
    if model == DEFAULT_MODEL or Path(model).expanduser().exists() or offline():
        return
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        return  # a path that does not exist
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str) or not hub_reachable():
        return
    from huggingface_hub import snapshot_download

    _LOG.info("fetching emotion model %s from the Hugging Face hub", model)
    try:
        snapshot_download(model, allow_patterns=_FILES)
    except Exception as error:  # noqa: BLE001 - check_model names the fix
        _LOG.warning("cannot fetch %s: %s", model, str(error).strip().splitlines()[0][:200])
