"""`falcon serve --config deploy/serve_config.yaml` end to end: the shipped config (only the port moved),
its own local Ray, a chat request, the API key from the environment, greedy text over HTTP equal to
`falcon generate`'s (same target, drafter, tree, dtype and one thread), a clean stop on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from deploy.config import PROJECT_ROOT
from tests.deploy.conftest import pick_free_port

pytestmark = pytest.mark.slow  # a Ray cluster and a model replica in a subprocess (~40 s)


def _get(url: str, key: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_falcon_serve_runs_the_shipped_config(tmp_path: Path) -> None:
    from openai import OpenAI

    raw = yaml.safe_load((PROJECT_ROOT / "deploy" / "serve_config.yaml").read_text())
    port = pick_free_port()
    raw["http_options"]["port"] = port
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "FALCON_API_KEY": "cli-key",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    cmd = [sys.executable, "-m", "falcon_core.cli", "serve", "--config", str(config), "--num-cpus", "2"]
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"falcon serve exited early:\n{Path(log.name).read_text()[-3000:]}"
            try:
                if _get(base + "/health")[0] == 200 and _get(base + "/v1/models", "cli-key")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "falcon serve did not come up in 300 s"
            time.sleep(1)
        status, body = _get(base + "/v1/models")
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        client = OpenAI(base_url=base + "/v1", api_key="cli-key", max_retries=0, timeout=300)
        name = raw["applications"][0]["args"]["models"][0]["name"]
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert reply.usage.completion_tokens >= 1 and reply.choices[0].message.content

        # Greedy text over HTTP == `falcon generate`'s with the served model's settings (speculative, bf16).
        served = raw["applications"][0]["args"]["models"][0]
        question, n = "What is the capital of France?", 24
        http_reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": question}], max_tokens=n, temperature=0
        )
        gen = [sys.executable, "-m", "falcon_core.cli", "generate", "--prompt", question, "--json"]
        gen += ["--model", served["model"], "--drafter", str(PROJECT_ROOT / served["drafter"])]
        gen += [
            "--tree",
            served["tree"],
            "--dtype",
            served["dtype"],
            "--threads",
            str(served["torch_threads"]),
        ]
        gen += ["--max-new-tokens", str(n)]
        out = subprocess.run(gen, env=env, capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        (record,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        assert record["stats"]["speculative_steps"] > 0  # the drafter was used, as in the replica
        assert http_reply.choices[0].message.content == record["text"]
        assert http_reply.usage.completion_tokens == len(record["token_ids"])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        log.close()
    assert rc == 0, Path(log.name).read_text()[-3000:]
    assert "running at http://127.0.0.1" in Path(log.name).read_text()


def test_drafter_override_reaches_every_model_and_is_validated(tmp_path: Path) -> None:
    from deploy.cli import load_config, main, with_drafter

    raw = yaml.safe_load((PROJECT_ROOT / "deploy" / "serve_config.yaml").read_text())
    ckpt = tmp_path / "drafter"
    out = with_drafter(raw, str(ckpt))
    models = out["applications"][0]["args"]["models"]
    assert models and all(m["drafter"] == str(ckpt.resolve()) for m in models)
    assert raw["applications"][0]["args"]["models"][0]["drafter"] != str(ckpt.resolve())  # a copy
    assert all(m["drafter"] is None for m in with_drafter(out, "none")["applications"][0]["args"]["models"])
    load_config(out)  # still a valid Serve config
    assert main(["--drafter", str(tmp_path / "missing")]) == 2  # refused before Ray starts
