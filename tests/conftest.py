"""Shared fixtures: the real default target (converted once per machine), a moto S3 server on loopback.

Environment set here for every test and the processes it starts:
- `FALCON_HOME` defaults to the repository's git-ignored `.falcon_home/`, so CI runs and sessions on
  the same checkout share one GGUF conversion (~20 s the first time, then ~0.01 s);
- Ray stays on loopback and sends no usage stats.
`gpu`-marked tests are skipped without CUDA.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("FALCON_HOME", str(REPO / ".falcon_home"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# One OpenMP thread per process (the test process, the subprocesses and Ray workers it starts): with
# several torch processes on 2 cores, spinning OpenMP threads made forwards up to 10x slower (measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Local HF folder of SmolLM2-135M-Instruct (bf16 safetensors), resolved through the default alias."""
    from falcon_core.resolve import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint (moto server) on 127.0.0.1, with the AWS_* variables pointing at it.

    Buckets are created by the tests (`boto3.client("s3").create_bucket(Bucket=...)`); no region goes
    into s3fs's client_kwargs (moto then refuses bucket creation), the region comes from the env.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        try:
            yield endpoint
        finally:
            server.stop()
