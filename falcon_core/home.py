"""Where Falcon keeps what it makes once and reuses: converted models, cached features, checkpoints."""

from __future__ import annotations

import os
from pathlib import Path


def falcon_home() -> Path:
    """`$FALCON_HOME` if set, else `~/.cache/falcon`. Not created here; writers create what they need."""
    env = os.environ.get("FALCON_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "falcon"
