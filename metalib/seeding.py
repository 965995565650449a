"""Seeds derived from names, so every draw in a study is reproducible and independent."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts: derive_seed(seed, "eval", "webcam", 5)."""
    text = "/".join(str(part) for part in parts)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
