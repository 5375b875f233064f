"""`falcon serve --config deploy/serve_config.yaml`: run a Ray Serve config file on a local Ray.

The file is a standard Serve config (`proxy_location`, `http_options`, `applications:` with `name`,
`route_prefix`, `import_path`, `args`), validated with Serve's own `ServeDeploySchema`; it is the same
document a KubeRay RayService embeds as `serveConfigV2`. Each application's builder is imported and
called with its `args`, and the result is deployed with `serve.run`. Without `--address` a local Ray is
started that listens on 127.0.0.1 only. The command blocks until Ctrl-C (or SIGTERM), then shuts Serve
and Ray down.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
"""Set before a local Ray starts: keeps every Ray listener on 127.0.0.1 and sends no usage stats."""


def load_config(source: str | Path | dict[str, Any]) -> Any:
    """A Serve config file (or its dict) -> `ray.serve.schema.ServeDeploySchema`, checked by Serve; the
    `args` of applications built by `deploy.router:build_app` are also parsed, to fail before Ray starts."""
    from ray.serve.schema import ServeDeploySchema

    from deploy.config import ServerConfig

    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"serve config {path} does not exist")
        raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    for app in schema.applications:
        if app.import_path == "deploy.router:build_app":
            ServerConfig.from_dict(app.args or {})
    return schema


def with_drafter(raw: dict[str, Any], drafter: str) -> dict[str, Any]:
    """A copy of a Serve config dict whose Falcon applications serve every model with `drafter`
    (a checkpoint folder, or "none"): how `falcon serve --drafter` puts a freshly distilled drafter
    behind the shipped config without editing it."""
    out = copy.deepcopy(raw)
    for app in out.get("applications") or []:
        if app.get("import_path") == "deploy.router:build_app":
            for model in (app.get("args") or {}).get("models") or []:
                model["drafter"] = None if drafter == "none" else str(Path(drafter).resolve())
    return out


def import_builder(import_path: str) -> Any:
    """`"module:attribute"` (or `"module.attribute"`, as Serve also accepts) -> the attribute."""
    module, sep, attr = import_path.partition(":")
    if not sep:
        module, _, attr = import_path.rpartition(".")
    if not module or not attr:
        raise ValueError(f"import_path {import_path!r} is not 'module:attribute'")
    return getattr(importlib.import_module(module), attr)


def deploy(schema: Any) -> list[str]:
    """Start Serve with the config's HTTP options and run every application; needs Ray initialised.
    Returns the application names. `serve.run` waits until each application is running."""
    from ray import serve
    from ray.serve import Application

    serve.start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    names = []
    for app in schema.applications:
        target = import_builder(app.import_path)
        built = target if isinstance(target, Application) else target(app.args or {})
        if app.runtime_env:
            print(
                f"falcon serve: {app.name}: runtime_env is used by a cluster deploy, ignored locally",
                file=sys.stderr,
            )
        serve.run(built, name=app.name, route_prefix=app.route_prefix, blocking=False)
        names.append(app.name)
    return names


def start_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to `address`, or start a local Ray bound to loopback."""
    import ray

    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="falcon serve", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(__file__).with_name("serve_config.yaml"),
        help="Ray Serve config file (default: %(default)s)",
    )
    parser.add_argument(
        "--address", default=None, help="an existing Ray cluster (default: start a local one on 127.0.0.1)"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument(
        "--drafter", default=None, help="serve every model with this drafter checkpoint folder (or 'none')"
    )
    args = parser.parse_args(argv)
    try:
        if not args.config.is_file():
            raise FileNotFoundError(f"serve config {args.config} does not exist")
        raw = yaml.safe_load(args.config.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"serve config {args.config} is not a YAML mapping")
        if args.drafter is not None:
            if args.drafter != "none":
                from falcon_core.checkpoint import check_drafter_files

                check_drafter_files(args.drafter)  # before Ray starts: a damaged file is named here
            raw = with_drafter(raw, args.drafter)
        schema = load_config(raw)
    except (FileNotFoundError, ValueError) as err:
        print(f"falcon serve: {err}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    start_ray(args.address, args.num_cpus)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        names = deploy(schema)
        http = schema.http_options
        print(
            f"falcon serve: {', '.join(names)} running at http://{http.host}:{http.port} (Ctrl-C to stop)",
            flush=True,
        )
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
