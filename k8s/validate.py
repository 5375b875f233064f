"""Offline checks of the KubeRay manifests: `python k8s/validate.py` (exit 1 on any problem).

For the base (`k8s/base/`) and every overlay (`k8s/overlays/*/`), built as kustomize
would (`kustomize_build`), every resource is checked for:

1. the CRD schema, strictly: unknown (misspelt) fields, wrong types, bad quantities (`crd_schema`);
2. KubeRay's own admission rules that no schema expresses (`kuberay_rules`): name length, replica
   bounds, a TTL only with `shutdownAfterJobFinishes`, resources set once, unique group names;
3. agreement with the project (`project_rules`):
   - images and Ray version: `rayVersion` and the containers' `workingDir` are those of
     `deploy/Dockerfile`; a container that asks for GPUs runs a `-gpu` image;
   - RayService: `serveConfigV2` is a Serve config that `falcon serve` accepts (Serve's schema, then
     `deploy.config.ServerConfig`); its proxy listens on 0.0.0.0 at the pods' `serve` port on every
     node; the probes are KubeRay's (worker readiness includes the Serve proxy); autoscaling is on;
     each engine replica's `ray_actor_options` (from `deploy.engine.deployment_options`) fits one
     worker pod, the worker group's `maxReplicas` covers the models' `max_replicas`, GPUs and CPUs;
   - RayJob: the entrypoint is `python <script> <flags>` where the script exists in the repository
     and its own argument parser accepts the flags; `--config` / `--profile` files exist and the
     resulting `DistillConfig` loads; its Ray Train workers fit the worker group (GPUs, CPUs); the
     cache, checkpoints and drafter go to `s3://`, and every pod gets S3 credentials from a Secret;
     the cluster is shut down after the job with a TTL.

Paths in the manifests (`python pipelines/distill.py --config k8s/...`) are relative to the image's
project folder, which is the repository root here.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import math
import os
import re
import shlex
import subprocess
import sys
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings, when loaded by path

import crd_schema
import kustomize_build

K8S = Path(__file__).resolve().parent
REPO = K8S.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"
GPU = "nvidia.com/gpu"
MAX_NAME = {"RayJob": 47, "RayService": 47, "RayCluster": 53}
"""KubeRay's name limits: a RayJob / RayService appends 6 characters to name its RayCluster."""
START_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
RAYLET_HEALTH = "localhost:52365/api/local_raylet_healthz"
GCS_HEALTH = "localhost:8265/api/gcs_healthz"


@dataclass(frozen=True)
class Group:
    """A head or worker group of a Ray cluster spec, with its Ray container (KubeRay: containers[0])."""

    name: str
    spec: dict[str, Any]
    head: bool

    @property
    def container(self) -> dict[str, Any]:
        containers = self.spec.get("template", {}).get("spec", {}).get("containers") or [{}]
        return containers[0]

    def limit(self, resource: str) -> float:
        """The container's limit (else request) of `resource`, as a number; 0 when unset."""
        res = self.container.get("resources") or {}
        value = (res.get("limits") or {}).get(resource, (res.get("requests") or {}).get(resource, 0))
        return quantity(value)

    def env(self) -> dict[str, dict[str, Any]]:
        return {e.get("name"): e for e in self.container.get("env") or []}


def quantity(value: Any) -> float:
    """A Kubernetes quantity (`8`, `"500m"`, `"32Gi"`) as a float."""
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    if not m:
        raise ValueError(f"not a quantity: {value!r}")
    scale = {
        "": 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    return float(m.group(1)) * scale[m.group(2)]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc.get("spec") or {}
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def groups(doc: dict[str, Any]) -> list[Group]:
    spec = cluster_spec(doc)
    out = [Group("head", spec.get("headGroupSpec") or {}, head=True)]
    out += [Group(g.get("groupName", "?"), g, head=False) for g in spec.get("workerGroupSpecs") or []]
    return out


# ---------------------------------------------------------------------------------------------------
# 2. KubeRay's admission rules (ray-operator/controllers/ray/utils/validation.go)


def kuberay_rules(doc: dict[str, Any]) -> list[str]:
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name", "")
    problems = []
    if len(name) > MAX_NAME.get(kind, 63):
        problems.append(f"metadata.name: {kind} names are at most {MAX_NAME[kind]} characters")
    spec = doc.get("spec") or {}
    if kind == "RayJob":
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        if ttl < 0:
            problems.append("spec.ttlSecondsAfterFinished must be >= 0")
        if ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append("spec.ttlSecondsAfterFinished needs spec.shutdownAfterJobFinishes: true")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            problems.append("spec.suspend needs spec.shutdownAfterJobFinishes: true")
    cluster = cluster_spec(doc)
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    seen = set()
    for g in groups(doc):
        where = "headGroupSpec" if g.head else f"workerGroupSpecs[{g.name}]"
        if not g.spec.get("template", {}).get("spec", {}).get("containers"):
            problems.append(f"{where}: needs at least one container")
        params = g.spec.get("rayStartParams") or {}
        if any(params.get(k) for k in START_RESOURCE_PARAMS) and g.spec.get("resources"):
            problems.append(f"{where}: resources set in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{where}: rayStartParams['labels'] is not supported; use the group's labels")
        if g.head:
            continue
        if g.name in seen:
            problems.append(f"{where}: groupName repeated")
        seen.add(g.name)
        lo, hi, n = g.spec.get("minReplicas"), g.spec.get("maxReplicas"), g.spec.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            problems.append(f"{where}: minReplicas and maxReplicas are required without autoscaling")
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"{where}: minReplicas {lo} > maxReplicas {hi}")
        if n is not None and ((lo is not None and n < lo) or (hi is not None and n > hi)):
            problems.append(f"{where}: replicas {n} outside [minReplicas, maxReplicas]")
    return problems


# ---------------------------------------------------------------------------------------------------
# 3. Agreement with the project


def dockerfile_facts(path: Path = DOCKERFILE) -> dict[str, str]:
    """`RAY_VERSION` (the default of its ARG) and `WORKDIR` of the Dockerfile."""
    text = path.read_text()
    ray = re.search(r"^ARG RAY_VERSION=(\S+)", text, re.M)
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M)
    base = re.search(r"^FROM (\S+)", text, re.M)
    if not (ray and workdir and base):
        raise ValueError(f"{path}: expected ARG RAY_VERSION=..., FROM and WORKDIR lines")
    return {"ray_version": ray.group(1), "workdir": workdir.group(1), "base": base.group(1)}


def image_rules(doc: dict[str, Any]) -> list[str]:
    facts = dockerfile_facts()
    problems = []
    if cluster_spec(doc).get("rayVersion") != facts["ray_version"]:
        problems.append(
            f"rayVersion {cluster_spec(doc).get('rayVersion')!r} != the image's {facts['ray_version']}"
        )
    images = {str(g.container.get("image", "")) for g in groups(doc)}
    if len(images) != 1:
        problems.append(f"head and workers must run one image (one Ray, one project), got {sorted(images)}")
    wants_gpu = any(g.limit(GPU) > 0 for g in groups(doc))
    if any(image.rpartition(":")[2].endswith("-gpu") != wants_gpu for image in images):
        problems.append(f"image {sorted(images)}: a -gpu image iff a group asks for {GPU}")
    for g in groups(doc):
        if g.container.get("workingDir") != facts["workdir"]:
            problems.append(
                f"{g.name}: workingDir {g.container.get('workingDir')!r} != the image's {facts['workdir']}"
            )
    return problems


def project_rules(doc: dict[str, Any]) -> list[str]:
    problems = image_rules(doc)
    if doc.get("kind") == "RayService":
        problems += serve_rules(doc)
    elif doc.get("kind") == "RayJob":
        problems += job_rules(doc)
    return problems


def serve_rules(doc: dict[str, Any]) -> list[str]:
    from deploy.cli import load_config

    try:
        raw = yaml.safe_load(doc["spec"].get("serveConfigV2") or "")
        if not isinstance(raw, dict):
            raise ValueError(f"expected a YAML mapping, got {type(raw).__name__}")
        load_config(raw)
    except (ValueError, TypeError, yaml.YAMLError) as err:  # pydantic's errors are ValueErrors
        return [f"spec.serveConfigV2 is not a valid Serve config for deploy/: {err}"]
    problems = unknown_serve_keys(raw) + probe_rules(doc, raw)
    http = raw.get("http_options") or {}
    port = http.get("port", 8000)
    if http.get("host") != "0.0.0.0":
        problems.append("serveConfigV2: http_options.host must be 0.0.0.0 (pods are reached on their IP)")
    if raw.get("proxy_location", "EveryNode") != "EveryNode":
        problems.append("serveConfigV2: proxy_location must be EveryNode (worker readiness probes the proxy)")
    for g in groups(doc):
        ports = {p.get("name"): p.get("containerPort") for p in g.container.get("ports") or []}
        if ports.get("serve") != port:
            problems.append(f"{g.name}: container port 'serve' {ports.get('serve')} != Serve's port {port}")
    if not cluster_spec(doc).get("enableInTreeAutoscaling"):
        problems.append(
            "rayClusterConfig.enableInTreeAutoscaling must be true (Serve autoscaling needs pods)"
        )
    return problems + capacity_rules(doc, replica_demands(raw))


def _model_fields(cls: Any) -> dict[str, Any] | None:
    """name -> annotation of a pydantic model class (v2, or v1 as Ray's compat layer may use); else None."""
    if not isinstance(cls, type):
        return None
    fields = getattr(cls, "model_fields", None)  # pydantic v2
    annotation = "annotation"
    if not isinstance(fields, dict):
        fields = getattr(cls, "__fields__", None)  # pydantic v1
        annotation = "outer_type_"
    if isinstance(fields, dict):
        names = {name: getattr(f, annotation) for name, f in fields.items()}
        return names | {f.alias: getattr(f, annotation) for f in fields.values() if getattr(f, "alias", None)}
    return None


def unknown_serve_keys(value: Any, annotation: Any = None, path: str = "serveConfigV2") -> list[str]:
    """Keys Serve's config models do not define. Serve's pydantic schemas ignore unknown keys, so a
    misspelt `route_prefx` or `num_replica` would be dropped without a word; here it is an error.
    (`args` is left to `ServerConfig`, which refuses unknown keys itself.)"""
    if annotation is None:
        from ray.serve.schema import ServeDeploySchema

        annotation = ServeDeploySchema
    fields = _model_fields(annotation)
    if fields is not None:
        if not isinstance(value, dict):
            return []
        problems = [f"{path}: unknown key {k!r}" for k in value if k not in fields]
        for key, sub in value.items():
            if key in fields and key != "args":
                problems += unknown_serve_keys(sub, fields[key], f"{path}.{key}")
        return problems
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (list, tuple) and isinstance(value, list) and args:
        return [p for i, item in enumerate(value) for p in unknown_serve_keys(item, args[0], f"{path}[{i}]")]
    models = [a for a in args if _model_fields(a) is not None]
    return unknown_serve_keys(value, models[0], path) if models and isinstance(value, dict) else []


@dataclass(frozen=True)
class Demand:
    """What one engine deployment asks per replica, and its replica bounds."""

    name: str
    gpus: float
    cpus: float
    min_replicas: int
    max_replicas: int
    device: str


def replica_demands(raw: dict[str, Any]) -> list[Demand]:
    """Per model of the Falcon application: its replicas' `ray_actor_options` and autoscaling bounds."""
    from deploy.config import ServerConfig
    from deploy.engine import deployment_options

    demands = []
    for app in raw.get("applications") or []:
        if app.get("import_path") != "deploy.router:build_app":
            continue
        for model in ServerConfig.from_dict(app.get("args") or {}).models:
            opts = deployment_options(model)
            actor, scaling = opts["ray_actor_options"], opts["autoscaling_config"]
            demands.append(
                Demand(
                    model.name,
                    actor["num_gpus"],
                    actor["num_cpus"],
                    scaling["min_replicas"],
                    scaling["max_replicas"],
                    model.device,
                )
            )
    return demands


def capacity_rules(doc: dict[str, Any], demands: list[Demand]) -> list[str]:
    """Engine replicas vs the worker groups: each replica fits a pod, the bounds agree, no GPU idles."""
    workers = [g for g in groups(doc) if not g.head]
    gpu_groups = [g for g in workers if g.limit(GPU) > 0]
    problems = []
    for d in demands:
        if (d.device == "cuda") != (d.gpus > 0):
            problems.append(f"model {d.name}: device {d.device} with num_gpus {d.gpus:g}")
        pool = gpu_groups if d.gpus > 0 else workers
        fits = [g for g in pool if g.limit(GPU) >= d.gpus and g.limit("cpu") >= d.cpus]
        if not fits:
            problems.append(
                f"model {d.name}: no worker pod has {d.gpus:g} GPUs and {d.cpus:g} CPUs for one replica"
            )
        for g in fits if d.gpus > 0 else []:
            per_pod = math.floor(g.limit(GPU) / d.gpus)
            if per_pod * d.cpus > g.limit("cpu"):
                problems.append(
                    f"model {d.name}: {per_pod} replicas per {g.name} pod (by GPUs) need "
                    f"{per_pod * d.cpus:g} CPUs, the pod has {g.limit('cpu'):g}: GPUs would idle"
                )
    gpu_need_max = sum(d.max_replicas * d.gpus for d in demands)
    gpu_need_min = sum(d.min_replicas * d.gpus for d in demands)
    gpu_max = sum(g.spec.get("maxReplicas", 0) * g.limit(GPU) for g in gpu_groups)
    gpu_min = sum(g.spec.get("minReplicas", 0) * g.limit(GPU) for g in gpu_groups)
    if gpu_need_max > gpu_max:
        problems.append(
            f"models need up to {gpu_need_max:g} GPUs, worker groups' maxReplicas give {gpu_max:g}"
        )
    if gpu_max and not gpu_need_max:
        problems.append("worker pods ask for GPUs but no model uses one")
    biggest_pod = max((g.limit(GPU) for g in gpu_groups), default=0)
    if gpu_groups and gpu_min - gpu_need_min >= biggest_pod:  # a whole pod's GPUs idle at the minimum
        problems.append(
            f"worker groups' minReplicas hold {gpu_min:g} GPUs, models' min_replicas use {gpu_need_min:g}"
        )
    cpu_need = sum(d.max_replicas * d.cpus for d in demands if d.gpus == 0)
    cpu_max = sum(g.spec.get("maxReplicas", 0) * g.limit("cpu") for g in workers if g.limit(GPU) == 0)
    if cpu_need > cpu_max:
        problems.append(
            f"CPU models need up to {cpu_need:g} CPUs, CPU worker groups' maxReplicas give {cpu_max:g}"
        )
    return problems


def _probe_command(probe: dict[str, Any] | None) -> str:
    return " ".join((probe or {}).get("exec", {}).get("command") or [])


def probe_rules(doc: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """KubeRay's probes for RayService pods (written out, since a custom probe replaces its own)."""
    port = (raw.get("http_options") or {}).get("port", 8000)
    serve_health = f"localhost:{port}/-/healthz"
    problems = []
    for g in groups(doc):
        ready, live = (
            _probe_command(g.container.get("readinessProbe")),
            _probe_command(g.container.get("livenessProbe")),
        )
        want_ready = [RAYLET_HEALTH, GCS_HEALTH] if g.head else [RAYLET_HEALTH, serve_health]
        missing = [w for w in want_ready if w not in ready]
        if missing:
            problems.append(f"{g.name}: readinessProbe must check {missing}")
        if RAYLET_HEALTH not in live:
            problems.append(f"{g.name}: livenessProbe must check the raylet ({RAYLET_HEALTH})")
        if not g.head and serve_health in live:
            problems.append(
                f"{g.name}: livenessProbe must not check Serve (a loading model would restart the pod)"
            )
    return problems


def job_rules(doc: dict[str, Any]) -> list[str]:
    spec = doc["spec"]
    problems = []
    if not spec.get("shutdownAfterJobFinishes") or not spec.get("ttlSecondsAfterFinished"):
        problems.append("spec: shutdownAfterJobFinishes: true and a ttlSecondsAfterFinished are required")
    for g in groups(doc):
        env = g.env()
        for key in S3_ENV:
            ref = (env.get(key) or {}).get("valueFrom", {}).get("secretKeyRef")
            if not ref or ref.get("optional"):
                problems.append(f"{g.name}: env {key} must come from a Secret (secretKeyRef, not optional)")
    try:
        config = entrypoint_config(spec.get("entrypoint", ""))
    except (ValueError, FileNotFoundError) as err:
        return [*problems, f"spec.entrypoint: {err}"]
    return problems + train_rules(doc, config)


def entrypoint_config(entrypoint: str) -> Any:
    """The `DistillConfig` an entrypoint `python pipelines/distill.py [flags]` runs with.

    Raises ValueError (FileNotFoundError) when the script does not exist, its own parser refuses a
    flag, or a `--config` / `--profile` file is missing or does not load."""
    argv = shlex.split(entrypoint)
    if len(argv) < 2 or argv[0] not in ("python", "python3") or not argv[1].endswith(".py"):
        raise ValueError(f"expected 'python <script>.py [flags]', got {entrypoint!r}")
    script = REPO / argv[1]
    if not script.is_file():
        raise FileNotFoundError(f"{argv[1]} does not exist in the repository")
    flags = argv[2:]
    check_script_flags(script, _absolute_config(flags))
    from pipelines import config as distill_config

    parser = argparse.ArgumentParser(add_help=False)
    distill_config.add_arguments(parser)
    args, _ = _parse(parser, _absolute_config(flags), known=True)
    return distill_config.config_from_args(args)


def _absolute_config(flags: list[str]) -> list[str]:
    out = list(flags)
    for i, flag in enumerate(out[:-1]):
        if flag == "--config":
            out[i + 1] = str(REPO / out[i + 1])
    return out


def _parse(parser: argparse.ArgumentParser, argv: list[str], known: bool = False) -> Any:
    """`parse_args` (or `parse_known_args`) with argparse's exit turned into a ValueError."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_known_args(argv) if known else (parser.parse_args(argv), [])
    except SystemExit as exit_:
        lines = err.getvalue().strip().splitlines()
        raise ValueError(lines[-1] if lines else f"the parser exited ({exit_.code})") from None


def check_script_flags(script: Path, flags: list[str]) -> None:
    """Raise ValueError unless the script's own parser accepts `flags`: its module's `build_parser()`
    when it has one, else the options its `--help` lists (with their `{choices}`)."""
    rel = script.relative_to(REPO)
    module_name = ".".join(rel.with_suffix("").parts)
    build = getattr(importlib.import_module(module_name), "build_parser", None)
    try:
        if build is not None:
            _parse(build(), flags)
        else:
            _check_against_help(help_options(script), flags)
    except ValueError as err:
        raise ValueError(f"{rel} refuses {' '.join(flags)!r}: {err}") from err


@cache
def help_options(script: Path) -> dict[str, tuple[str, ...] | None]:
    """Option -> its choices (`()` for any value, None for a flag without value), from `--help`."""
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"},
    )
    if result.returncode != 0:
        raise ValueError(f"--help failed: {result.stderr.strip()[-500:]}")
    options: dict[str, tuple[str, ...] | None] = {}
    for line in result.stdout.splitlines():
        m = re.match(r"^ {2}(-.*?)(?: {2,}|$)", line)
        for part in m.group(1).split(", ") if m else ():
            name, _, meta = part.partition(" ")
            choices = re.fullmatch(r"\{(.*)\}", meta)
            options[name] = tuple(choices.group(1).split(",")) if choices else (() if meta else None)
    return options


def _check_against_help(options: dict[str, tuple[str, ...] | None], flags: list[str]) -> None:
    i = 0
    while i < len(flags):
        name, eq, value = flags[i].partition("=")
        if name not in options:
            raise ValueError(f"unrecognized arguments: {flags[i]}")
        choices = options[name]
        if choices is None:
            if eq:
                raise ValueError(f"argument {name}: ignored explicit argument {value!r}")
            i += 1
            continue
        if not eq:
            if i + 1 >= len(flags):
                raise ValueError(f"argument {name}: expected one argument")
            value, i = flags[i + 1], i + 1
        if choices and value not in choices:
            raise ValueError(f"argument {name}: invalid choice: {value!r} (choose from {', '.join(choices)})")
        i += 1


def train_rules(doc: dict[str, Any], config: Any) -> list[str]:
    """The run's Ray Train workers and storage vs the job's cluster."""
    workers = [g for g in groups(doc) if not g.head]
    problems = []
    gpus = sum(g.spec.get("replicas", 0) * g.limit(GPU) for g in workers)
    ray = config.ray
    if ray.use_gpu and ray.num_workers > gpus:
        problems.append(
            f"ray.num_workers {ray.num_workers} (one GPU each) > the worker groups' {gpus:g} GPUs"
        )
    if not ray.use_gpu and gpus:
        problems.append(f"the worker groups hold {gpus:g} GPUs but ray.use_gpu is false")
    if ray.use_gpu and gpus and ray.num_workers < gpus:
        problems.append(f"ray.num_workers {ray.num_workers} leaves GPUs of the {gpus:g} idle")
    data = config.data
    if gpus and data.cache_actors > gpus:  # a caching actor takes a whole GPU when the cluster has GPUs
        problems.append(
            f"data.cache_actors {data.cache_actors} (one GPU each) > the worker groups' {gpus:g} GPUs"
        )
    if not any(g.limit("cpu") >= data.cache_cpus_per_actor for g in workers):
        problems.append(
            f"data.cache_cpus_per_actor {data.cache_cpus_per_actor:g} exceeds every worker pod's CPUs"
        )
    if not any(g.limit("cpu") >= ray.cpus_per_worker for g in workers):
        problems.append(f"ray.cpus_per_worker {ray.cpus_per_worker:g} exceeds every worker pod's CPUs")
    for field_name, value in (
        ("data.cache_url", config.data.cache_url),
        ("ray.storage_path", ray.storage_path),
        ("output.dir", config.output.dir),
    ):
        if not str(value or "").startswith("s3://"):
            problems.append(
                f"{field_name} {value!r} must be an s3:// URL: the job's pods are deleted after it"
            )
    return problems


# ---------------------------------------------------------------------------------------------------
# Driver


def check_resource(doc: dict[str, Any]) -> list[str]:
    """Every problem of one built resource (schema, then KubeRay's rules, then the project's)."""
    problems = [str(e) for e in crd_schema.validate(doc)]
    if problems:
        return problems
    return kuberay_rules(doc) + project_rules(doc)


def targets(k8s_dir: Path = K8S) -> list[Path]:
    """The base (`base/`) and every overlay folder (`overlays/*/`)."""
    overlays = sorted(p.parent for p in (k8s_dir / "overlays").glob(f"*/{kustomize_build.KUSTOMIZATION}"))
    return [k8s_dir / "base", *overlays]


def check_tree(k8s_dir: Path = K8S) -> dict[str, list[str]]:
    """Folder (relative to `k8s_dir`'s parent) -> its problems, `<Kind>/<name>: ...` each."""
    report = {}
    for folder in targets(k8s_dir):
        where = str(folder.relative_to(k8s_dir.parent))
        try:
            docs = kustomize_build.build(folder)
        except (kustomize_build.KustomizeError, OSError, yaml.YAMLError) as err:
            report[where] = [f"build: {err}"]
            continue
        report[where] = [
            f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}: {p}"
            for d in docs
            for p in check_resource(d)
        ]
        if not docs:
            report[where].append("build: no resources")
    return report


def _lines(report: dict[str, list[str]]) -> Iterator[str]:
    for where, problems in report.items():
        yield f"{where}: {'ok' if not problems else f'{len(problems)} problem(s)'}"
        yield from (f"  {p}" for p in problems)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--k8s", type=Path, default=K8S, help="the k8s folder to check (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    report = check_tree(args.k8s.resolve())
    for line in _lines(report):
        print(line)
    return 1 if any(report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
