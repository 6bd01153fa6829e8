"""Third-party messages that say nothing to our users, filtered out by their text (nothing else is hidden).

Why by text: muting a whole logger (transformers, diffusers) would also hide the warnings that matter. Each
filter names the one message and why it is noise for us.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_third_party"]

_NOISE = (
    # transformers 5 without torchvision: pipelines' CLIP/Siglip image processors fall back to the PIL versions,
    # which is what we want on a CPU (we never use the processors' torchvision backend). Logged once per class per
    # process, so every worker repeated it.
    "requires torchvision (not installed); falling back to",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _NOISE)


_installed = False


def quiet_third_party() -> None:
    """Install the filters (idempotent; cheap: call it in every process that imports a pipeline)."""
    global _installed
    if _installed:
        return
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropNoise())
    _installed = True
