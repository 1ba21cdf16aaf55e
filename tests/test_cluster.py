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


def _gcp_variant() -> dict:
    """The GCP variant commented at the end of cluster.yaml, spliced into the AWS config."""
    text = (ROOT / "cluster.yaml").read_text()
    block = text.split("# GCP variant", 1)[1].split("\n# provider:", 1)[1].split("\n# and in setup_commands", 1)[0]
    lines = ["provider:"] + [ln[2:] if ln.startswith("# ") else ln[1:] for ln in block.splitlines() if ln.startswith("#")]
    gcp = yaml.safe_load("\n".join(lines))
    cfg = yaml.safe_load(text)
    cfg.update(gcp)
    return cfg


@pytest.mark.parametrize("variant", ["aws", "gcp"])
def test_every_node_pins_a_current_image(cluster, variant):
    """No node falls back to Ray's default AMI (Ubuntu 18.04, driver < 580); the GCP variant validates too."""
    cfg = cluster if variant == "aws" else _gcp_variant()
    full = _validate(cfg)
    assert full["provider"]["type"] == variant
    for name, node in full["available_node_types"].items():
        nc = node["node_config"]
        if variant == "aws":
            assert nc["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/"), name
            assert "ubuntu-24.04" in nc["ImageId"] and "nvidia-driver" in nc["ImageId"]
        else:
            image = nc["disks"][0]["initializeParams"]["sourceImage"]
            assert "2404" in image and "nvidia-580" in image, name


@pytest.mark.parametrize("driver,python_ok,ok", [("595.91.07", True, True), ("580.105.08", True, True),
                                                  ("550.54.15", True, False), (None, True, True),
                                                  (None, False, False)])
def test_setup_preflight_refuses_old_python_or_driver(cluster, tmp_path, driver, python_ok, ok):
    """The first setup command, run by bash with a fake nvidia-smi / python3 on PATH."""
    import os
    import subprocess
    import sys

    cmd = cluster["setup_commands"][0]
    assert "3, 11" in cmd and "580" in cmd
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if driver:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n[ \"$1\" = -L ] && exit 0\necho {driver}\n")
    # python3 -c CODE, with sys.version_info faked to 3.10 for an old image
    fake = "" if python_ok else "sys.version_info = (3, 10, 12); "
    (bin_dir / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; {fake}exec(sys.argv[1])' \"$2\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
    assert (p.returncode == 0) == ok, (p.returncode, p.stdout, p.stderr)
    if not ok:
        assert ("< 580" in p.stdout) or ("python3 is 3.10; MAST needs >= 3.11" in p.stderr), (p.stdout, p.stderr)


def test_k8s_mlflow_accepts_the_service_host():
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    hosts = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert "mlflow:5000" in hosts and "mlflow" in hosts
    job = next(d for d in docs if d["kind"] == "RayJob")
    uri = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]
    assert uri == "http://mlflow:5000"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(tmp_path, name: str, extra: list[str]):
    """A real `mlflow server` from this venv on a loopback port (SQLite store in tmp_path)."""
    import subprocess
    import sys

    port = _free_port()
    d = tmp_path / name
    d.mkdir()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    log = (d / "server.log").open("w")
    proc = subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
                             "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", *extra],
                            stdout=log, stderr=subprocess.STDOUT, cwd=d, start_new_session=True)
    return proc, port, log


def _get(port: int, host: str | None, deadline: float) -> int | None:
    """Status of an MLflow REST call with the given Host header; None while the server is not up yet."""
    import http.client
    import time

    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default",
                      headers={"Host": host} if host else {})
            status = c.getresponse().status
            c.close()
            return status
        except OSError:
            time.sleep(0.5)
    return None


@pytest.mark.slow
def test_k8s_mlflow_flags_accept_host_mlflow_5000_on_a_real_server(tmp_path):
    """The Deployment's own flags make a real MLflow server answer the sweep's `Host: mlflow:5000`;
    without --allowed-hosts the same request is refused (403), which is the bug this prevents."""
    import os
    import signal
    import time

    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()) if d]
    cmd = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    flags = ["--allowed-hosts", cmd[cmd.index("--allowed-hosts") + 1]]
    servers = [_mlflow_server(tmp_path, "fixed", flags), _mlflow_server(tmp_path, "default", [])]
    try:
        deadline = time.time() + 120
        (_, fixed, _), (_, default, _) = servers
        assert _get(fixed, "mlflow:5000", deadline) == 200
        assert _get(fixed, "localhost:5000", deadline) == 200     # kubectl port-forward
        assert _get(default, "mlflow:5000", deadline) == 403      # MLflow's default: Invalid Host header
        assert _get(default, None, deadline) == 200               # 127.0.0.1:PORT is allowed by default
    finally:
        for proc, _, log in servers:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except Exception:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            log.close()
