"""cluster.yaml passes Ray's own cluster-config validation; the KubeRay RayJob is well formed."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _validate(cfg: dict) -> dict:
    """What `ray up` does before touching a cloud: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(cfg))
    validate_config(full)
    return full


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_validator(cluster):
    full = _validate(cluster)
    assert full["provider"]["type"] == "aws"
    types = full["available_node_types"]
    head = types[full["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t.get("min_workers", 0) == 0 for t in gpu_types)


def test_validator_rejects_a_broken_config(cluster):
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu-l40s"]["resourcez"] = {"GPU": 1}
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(cluster)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        _validate(bad)


def test_cluster_setup_installs_project_mlflow_and_shared_storage(cluster):
    setup = "\n".join(cluster["setup_commands"])
    assert '.[vllm]' in setup and "/mnt/efs" in setup and "HF_HOME=/mnt/efs" in setup
    head = "\n".join(cluster["head_start_ray_commands"])
    assert "mlflow server" in head and "--host 0.0.0.0" in head and "--backend-store-uri" in head
    assert "MLFLOW_TRACKING_URI" in "\n".join(cluster["head_setup_commands"])
    assert cluster["file_mounts"] == {"~/mast": "."}


def test_rayjob_manifest():
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) >= {"RayJob", "PersistentVolumeClaim", "Deployment", "Service"}
    job = kinds["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"].startswith("mast sweep sweeps/paper.yaml")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http://")
    rc = job["spec"]["rayClusterSpec"]
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = rc["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert "mlflow" in " ".join(kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"])
