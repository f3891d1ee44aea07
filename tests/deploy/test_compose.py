"""compose.yaml, .env and the Dockerfile, checked without a Docker engine: the Compose Specification
schema, the GPU/IPC settings CUDA IPC needs, mounts, and every RADIXKV_* variable against what the code
actually reads."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import jsonschema
import pytest

from tests.deploy import compose_file, dockerfile, env_reads

SCHEMA_PATH = compose_file.REPO_ROOT.parent / "shared" / "compose" / "compose-spec.json"
GPU = ("cachemgr", "worker")
CPU = ("cachemgr-cpu", "worker-cpu")
RUN_DIR = "/run/radixkv"
# Variables that only shape compose.yaml (host side); none of them may mean anything to the code.
COMPOSE_ONLY = {
    "RADIXKV_PUBLISH",
    "RADIXKV_GPU_IDS",
    "RADIXKV_MODEL_DIR",
    "RADIXKV_HOST_RUN_DIR",
    "RADIXKV_UID",
    "RADIXKV_GID",
    "RADIXKV_IMAGE",
}
_INTERPOLATED = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_file.load()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def stages() -> dict[str, dockerfile.Stage]:
    return dockerfile.load()[1]


def _schema_validator() -> jsonschema.Draft7Validator:
    if not SCHEMA_PATH.is_file():
        pytest.skip(
            f"Compose Specification schema not found at {SCHEMA_PATH} (see ../shared/compose/README.md)"
        )
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("form", ["as written", "interpolated with defaults"])
def test_compose_file_matches_the_compose_spec_schema(form: str) -> None:
    validator = _schema_validator()
    data = compose_file.load_raw() if form == "as written" else compose_file.load()
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    assert [f"{list(e.absolute_path)}: {e.message}" for e in errors] == []


def test_schema_validation_catches_a_broken_file() -> None:
    validator = _schema_validator()
    data = compose_file.load()
    data["services"]["worker"]["ipc"] = ["host"]  # must be a string
    data["services"]["cachemgr"]["restart_policy"] = "always"  # no such key
    messages = sorted(e.message for e in validator.iter_errors(data))
    assert len(messages) == 2
    assert "['host'] is not of type 'string'" in messages
    assert "'restart_policy' does not match any of the regexes: '^x-'" in messages


def test_profiles_select_exactly_one_stack(compose: dict[str, Any]) -> None:
    dotenv = compose_file.read_dotenv()
    default_profiles = set(dotenv["COMPOSE_PROFILES"].split(","))
    assert sorted(compose_file.active_services(compose, default_profiles)) == ["cachemgr", "worker"]
    assert sorted(compose_file.active_services(compose, {"cpu"})) == ["cachemgr-cpu", "worker-cpu"]
    assert compose_file.active_services(compose, set()) == {}


@pytest.mark.parametrize("name", GPU)
def test_gpu_services_reserve_nvidia_gpus_with_configurable_ids(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    configured = compose_file.load({"RADIXKV_GPU_IDS": "2,3"})["services"][name]
    assert configured["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["2,3"]
    assert services[name]["environment"]["RADIXKV_DEVICE"] == "cuda:0"


@pytest.mark.parametrize("name", CPU)
def test_cpu_services_need_no_gpu(services: dict[str, dict[str, Any]], name: str) -> None:
    assert "deploy" not in services[name]
    assert services[name]["environment"]["RADIXKV_DEVICE"] == "cpu"
    assert services[name]["build"]["args"]["VARIANT"] == "cpu"


@pytest.mark.parametrize("name", GPU + CPU)
def test_every_service_shares_host_ipc_and_pid_namespaces(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    svc = services[name]
    assert (svc["ipc"], svc["pid"], svc["init"], svc["restart"]) == ("host", "host", True, "unless-stopped")


def test_only_cachemgr_publishes_a_port_and_workers_scale(services: dict[str, dict[str, Any]]) -> None:
    assert services["cachemgr"]["ports"] == ["127.0.0.1:8000:8000"]
    assert services["cachemgr-cpu"]["ports"] == ["127.0.0.1:8000:8000"]
    assert services["cachemgr"]["environment"]["RADIXKV_HTTP_PORT"] == "8000"
    assert services["cachemgr"]["environment"]["RADIXKV_HTTP_HOST"] == "0.0.0.0"
    published = compose_file.load({"RADIXKV_PUBLISH": "0.0.0.0:9000"})["services"]["cachemgr"]["ports"]
    assert published == ["0.0.0.0:9000:8000"]
    for name in ("worker", "worker-cpu"):
        assert "ports" not in services[name]
        assert "container_name" not in services[name]
        assert "hostname" not in services[name]
    assert {n for n, s in services.items() if "container_name" in s} == set()


def test_workers_wait_for_a_healthy_daemon(services: dict[str, dict[str, Any]]) -> None:
    assert services["worker"]["depends_on"] == {"cachemgr": {"condition": "service_healthy"}}
    assert services["worker-cpu"]["depends_on"] == {"cachemgr-cpu": {"condition": "service_healthy"}}


def test_volumes_share_the_run_dir_and_mount_the_model_read_only(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    run_dir = {"type": "bind", "source": "./run", "target": RUN_DIR, "bind": {"create_host_path": False}}
    model = {
        "type": "bind",
        "source": "./models",
        "target": "/model",
        "read_only": True,
        "bind": {"create_host_path": False},
    }
    kernels = {"type": "volume", "source": "flashinfer-cache", "target": "/var/cache/flashinfer"}
    assert services["cachemgr"]["volumes"] == [run_dir, model]
    assert services["worker"]["volumes"] == [run_dir, model, kernels]
    assert services["cachemgr-cpu"]["volumes"] == [run_dir]
    assert services["worker-cpu"]["volumes"] == [run_dir]
    assert list(compose["volumes"]) == ["flashinfer-cache"]
    for name in GPU:
        assert services[name]["environment"]["RADIXKV_MODEL"] == "/model"
    for name in GPU + CPU:
        assert services[name]["environment"]["RADIXKV_RUN_DIR"] == RUN_DIR
    moved = compose_file.load({"RADIXKV_HOST_RUN_DIR": "/srv/radixkv", "RADIXKV_MODEL_DIR": "/m"})
    assert moved["services"]["worker"]["volumes"][0]["source"] == "/srv/radixkv"
    assert moved["services"]["worker"]["volumes"][1]["source"] == "/m"
    # The repository ships the default run directory, so a fresh clone starts without a mkdir.
    assert (compose_file.REPO_ROOT / "run" / ".gitignore").is_file()


def test_flashinfer_cache_volume_is_where_the_image_points_flashinfer(
    stages: dict[str, dockerfile.Stage],
) -> None:
    envs = " ".join(i.args for i in stages["base-gpu"].all("ENV"))
    assert "FLASHINFER_WORKSPACE_BASE=/var/cache/flashinfer" in envs


@pytest.mark.parametrize("name", GPU + CPU)
def test_service_environment_names_are_read_by_that_program(
    services: dict[str, dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = env_reads.worker_reads(monkeypatch) if "worker" in name else env_reads.daemon_reads(monkeypatch)
    env = compose_file.environment(services[name])
    assert {key for key in env if key.startswith("RADIXKV_")} - reads == set()
    assert set(env) == {key for key in env if key.startswith("RADIXKV_")}


def test_passed_through_variables_keep_their_name() -> None:
    """`RADIXKV_X: ${RADIXKV_Y:-d}` would make a host variable mean something else in the container."""
    raw = compose_file.load_raw()
    for name, svc in raw["services"].items():
        for key, value in compose_file.environment(svc).items():
            used = _INTERPOLATED.findall(value)
            assert used in ([], [key]), (name, key, value)


def test_compose_only_variables_mean_nothing_to_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = compose_file.load_raw()
    env_keys = {key for svc in raw["services"].values() for key in compose_file.environment(svc)}
    used = set(_INTERPOLATED.findall(json.dumps(raw)))
    assert used - env_keys == COMPOSE_ONLY
    code_reads = (
        env_reads.daemon_reads(monkeypatch)
        | env_reads.worker_reads(monkeypatch)
        | env_reads.admin_reads(monkeypatch)
    )
    assert COMPOSE_ONLY & code_reads == set()


def test_dockerfile_targets_run_as_non_root_with_healthchecks(stages: dict[str, dockerfile.Stage]) -> None:
    for variant in ("gpu", "cpu"):
        for target, probe in (("cachemgr", "cachemgr"), ("worker", "worker")):
            chain = dockerfile.lineage(stages, target, variant)
            assert [s.name for s in chain] == [target, "common", f"base-{variant}"]
            users = [i.args for s in chain for i in s.all("USER")]
            assert users == ["radixkv"]
            (check,) = chain[0].all("HEALTHCHECK")
            assert check.args.endswith(f'CMD ["radixkv-healthcheck", "{probe}"]')


def test_dockerfile_env_names_are_read_by_the_code(
    stages: dict[str, dockerfile.Stage], monkeypatch: pytest.MonkeyPatch
) -> None:
    names = set()
    for stage in stages.values():
        for instruction in stage.all("ENV"):
            names |= {word.partition("=")[0] for word in shlex.split(instruction.args)}
    radixkv = {n for n in names if n.startswith("RADIXKV_")}
    assert radixkv == {"RADIXKV_CACHE_DIR", "RADIXKV_RUN_DIR", "RADIXKV_HTTP_HOST", "RADIXKV_HTTP_PORT"}
    assert radixkv - env_reads.daemon_reads(monkeypatch) == set()


def test_compose_build_targets_exist_and_services_run_their_program(
    services: dict[str, dict[str, Any]], stages: dict[str, dockerfile.Stage]
) -> None:
    for svc in services.values():
        target = svc["build"]["target"]
        assert target in stages
        assert svc["build"]["context"] == "."
        program = "cachemgr" if target == "cachemgr" else "computeworker"
        assert svc["command"] == (["cachemgr", "serve"] if program == "cachemgr" else ["computeworker"])
        cmd = stages[target].all("CMD")[0].args
        assert json.loads(cmd) == svc["command"]


def test_dockerignore_keeps_the_context_to_the_installable_project() -> None:
    lines = [
        line
        for line in (compose_file.REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {line[1:].rstrip("/") for line in lines if line.startswith("!")} == {
        "pyproject.toml",
        "README.md",
        "cachemgr",
        "computeworker",
        "shared",
        "bench",
    }


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert (
        compose_file.interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $SET $$SET", env)
        == "x d  d x $SET"
    )
    with pytest.raises(compose_file.InterpolationError, match="required variable UNSET is missing: boom"):
        compose_file.interpolate("${UNSET:?boom}", env)


def test_deploy_doc_lists_exactly_the_variables_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = (compose_file.REPO_ROOT / "docs" / "deploy.md").read_text()
    documented = set(re.findall(r"^\| `(RADIXKV_[A-Z_]+)`", doc, flags=re.MULTILINE))
    documented |= set(re.findall(r"^\| `RADIXKV_UID` / `(RADIXKV_GID)`", doc, flags=re.MULTILINE))
    code_reads = env_reads.daemon_reads(monkeypatch) | env_reads.worker_reads(monkeypatch)
    assert documented == code_reads | COMPOSE_ONLY
