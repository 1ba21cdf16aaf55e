"""GPU refusals: specs that cannot run are refused at load; GPU trials never fall back to the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mast.config import DecodingSpec, SweepSpec, load_yaml
from mast.files import InputError
from mast.resources import NoCudaError, check_local_gpus, cuda_problem, local_gpu_count, require_cuda

SWEEP = "name: x\nmodels: {toy: {seed: 0}}\ngrid: {rule: [mast]}\n"


def _mast(tmp_path, *argv):
    p = subprocess.run([sys.executable, "-m", "mast.cli", *argv], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return p.returncode, lines, p.stderr


def test_greedy_with_several_samples_is_refused():
    assert DecodingSpec(temperature=0.6, n=4).n == 4
    assert DecodingSpec(temperature=0.0, n=1).n == 1
    with pytest.raises(ValueError, match="needs sampling"):
        DecodingSpec(temperature=0.0, n=2)


def test_mast_eval_refuses_greedy_n_gt_1_in_one_line(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "s.yaml").write_text("name: x\nbenchmark: math\ndecoding: {temperature: 0, n: 4}\n")
    rc, lines, err = _mast(tmp_path, "eval", "--model", str(model), "--suite", str(tmp_path / "s.yaml"),
                           "--out", str(tmp_path / "out.jsonl"))
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "s.yaml: decoding: n = 4 needs sampling" in lines[0]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("text,expected", [
    ("evaluation: {decoding: {temperature: 0.0, n: 8}}\n", "evaluation.decoding: n = 8 needs sampling"),
    ("evaluation: {backend: vllm}\nresources: {gpu: 0.5}\n", "resources.gpu: 0.5 is a fractional GPU"),
])
def test_sweep_spec_refusals_name_file_and_field(tmp_path, text, expected):
    p = tmp_path / "sweep.yaml"
    p.write_text(SWEEP + text)
    with pytest.raises(InputError) as e:
        load_yaml(p, SweepSpec)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: ") and expected in msg, msg


def test_fractional_gpu_is_fine_with_hf_and_whole_gpus_with_vllm(tmp_path):
    ok = [("hf", 0.25), ("hf", 0.5), ("vllm", 1.0), ("vllm", 2.0)]
    for backend, gpu in ok:
        spec = SweepSpec.model_validate({"name": "x", "models": {"toy": {"seed": 0}}, "grid": {"rule": ["mast"]},
                                         "evaluation": {"backend": backend}, "resources": {"gpu": gpu}})
        assert spec.resources.gpu == gpu


def test_mast_sweep_refuses_fractional_vllm_and_leaves_nothing(tmp_path):
    (tmp_path / "s.yaml").write_text(SWEEP + "evaluation: {backend: vllm}\nresources: {gpu: 0.5}\n")
    out = tmp_path / "run"
    rc, lines, err = _mast(tmp_path, "sweep", str(tmp_path / "s.yaml"), "--out", str(out))
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "resources.gpu: 0.5 is a fractional GPU" in lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_cuda_problem_says_what_to_do():
    assert cuda_problem(0.0, False, None, None) is None  # CPU trial: nothing to check
    assert cuda_problem(1.0, True, "13.0", None) is None
    cpu_build = cuda_problem(1.0, False, None, None)
    assert "CPU-only build" in cpu_build and "resources.gpu: 0" in cpu_build
    hidden = cuda_problem(1.0, False, "13.0", "")
    assert "CUDA_VISIBLE_DEVICES" in hidden
    old_driver = cuda_problem(0.5, False, "13.0", "0")
    assert "driver >= 580" in old_driver and "nvidia-smi" in old_driver and "0.5" in old_driver


def test_require_cuda_on_this_machine():
    import torch

    require_cuda(0.0)  # a CPU trial never needs CUDA
    if torch.cuda.is_available():
        require_cuda(1.0)
    else:
        with pytest.raises(NoCudaError, match="no CUDA GPU is usable"):
            require_cuda(1.0)


def test_check_local_gpus():
    check_local_gpus(0.0, None, {"GPU": 0})            # a CPU sweep
    check_local_gpus(1.0, None, {"GPU": 1})            # a local Ray with the GPU
    check_local_gpus(2.0, "ray://head:10001", {})      # a cluster may autoscale GPU nodes from zero
    check_local_gpus(1.0, "auto", {"GPU": 0})
    for address in (None, "", "local"):
        with pytest.raises(InputError, match=r"^resources.gpu: a trial needs 1 GPU\(s\) but this machine has 0"):
            check_local_gpus(1.0, address, {"GPU": 0})
    with pytest.raises(InputError, match="needs 2 GPU"):  # tensor-parallel 2 on a one-GPU box
        check_local_gpus(2.0, None, {"GPU": 1, "CPU": 8})


@pytest.mark.gpu
def test_local_gpu_count_matches_torch_here():
    """Where a GPU is (without one both counts are 0 and nothing is checked): Ray's count is torch's."""
    import torch

    assert local_gpu_count() == torch.cuda.device_count() > 0


def test_paper_spec_samples_r1_style_and_unlearns_on_generated_texts():
    from pathlib import Path

    spec = load_yaml(Path(__file__).resolve().parents[1] / "sweeps" / "paper.yaml", SweepSpec)
    d = spec.evaluation.decoding
    assert (d.temperature, d.top_p) == (0.6, 0.95) and d.n >= 4  # DeepSeek's R1-distill settings, avg@n
    assert spec.evaluation.max_model_len >= d.max_tokens + 512   # room for the prompt
    assert spec.unlearning.texts == "generated"
    assert spec.unlearning.max_length >= 8192 and spec.selection.max_length >= 8192
    assert spec.evaluation.backend == "vllm" and spec.resources.gpu == 1
    assert spec.evaluation.dtype == "bfloat16" and spec.evaluation.timeout_s > 3600


def test_check_local_resources_also_refuses_a_trial_wider_than_the_local_cpus():
    check_local_gpus(0.0, None, {"GPU": 0, "CPU": 4}, spec_cpu=4)
    with pytest.raises(InputError, match=r"^resources.cpu: a trial needs 8 CPU\(s\) but the local Ray would have 2"):
        check_local_gpus(0.0, None, {"GPU": 0, "CPU": 2}, spec_cpu=8)
    check_local_gpus(0.0, "ray://head:10001", {"CPU": 2}, spec_cpu=8)  # a cluster: its nodes decide


def test_mast_sweep_refuses_more_gpus_than_the_local_ray_would_have_and_leaves_nothing(tmp_path):
    """No RAY_ADDRESS: the sweep would start a local Ray and wait for ever; it is refused before any folder."""
    import os

    want = local_gpu_count() + 1  # this machine, whatever it has, cannot place the trial
    (tmp_path / "s.yaml").write_text(SWEEP + f"resources: {{gpu: {want}}}\n")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-m", "mast.cli", "sweep", str(tmp_path / "s.yaml"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"resources.gpu: a trial needs {want} GPU(s) but this machine has {want - 1}" in lines[0]
    assert not out.exists() and sorted(q.name for q in tmp_path.iterdir()) == ["s.yaml"]


def test_vllm_backend_gets_the_engine_options_and_the_timeout_of_the_spec():
    """EvaluationSpec.backend_options passes every vLLM setting of evaluation: to VLLMBackend (by its own names)."""
    import inspect

    from mast.backends import VLLMBackend

    spec = SweepSpec.model_validate({
        "name": "x", "models": {"toy": {"seed": 0}}, "grid": {"rule": ["mast"]}, "resources": {"gpu": 2},
        "evaluation": {"backend": "vllm", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.7,
                       "max_model_len": 4096, "dtype": "bfloat16", "enforce_eager": True, "timeout_s": 600}})
    opts = spec.evaluation.backend_options()
    assert opts == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.7, "max_model_len": 4096,
                    "dtype": "bfloat16", "enforce_eager": True, "timeout_s": 600}
    assert set(opts) <= set(inspect.signature(VLLMBackend).parameters)
    assert spec.evaluation.model_copy(update={"backend": "hf"}).backend_options() == {}
