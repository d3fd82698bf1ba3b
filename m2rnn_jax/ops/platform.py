"""Which kind of accelerator the default device is: the rule every ``"auto"`` backend choice starts from."""

from __future__ import annotations

import jax


def default_platform() -> str:
    """ "gpu_nvidia", "tpu" or the name of another platform (e.g. "cpu"), from the default device."""
    device = jax.devices()[0]
    if device.platform == "gpu" and "nvidia" in device.device_kind.lower():
        return "gpu_nvidia"
    return device.platform


def on_nvidia_gpu() -> bool:
    """Whether the default device is an NVIDIA GPU (where the Pallas-Triton and Gluon kernels run)."""
    return default_platform() == "gpu_nvidia"
