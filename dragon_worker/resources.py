"""The machine the worker trains on: device choice and the hardware it reports."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch
from dragon.v1 import types_pb2

logger = logging.getLogger(__name__)


class DeviceUnavailableError(RuntimeError):
    """The device asked for does not exist on this machine."""


def select_device(spec: str) -> torch.device:
    """The torch device for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` picks the first CUDA device when there is one, else the CPU.
    """
    if spec == "auto":
        spec = "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = "cuda:0"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"{spec} asked for, but CUDA is not available")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"{spec} asked for, but only {torch.cuda.device_count()} CUDA "
                "devices exist"
            )
    return device


def limit_gpu_memory(device: torch.device, fraction: float | None) -> None:
    """Cap this process's share of the GPU's memory; no-op on the CPU."""
    if fraction is None or device.type != "cuda":
        return
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    logger.info("limited %s to %.0f%% of its memory", device, fraction * 100)


def cpu_cores() -> int:
    """Logical cores this process may run on (respects affinity and cgroups)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, falling back to the platform's word."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def describe_hardware(device: torch.device) -> types_pb2.Hardware:
    """The Hello's hardware description for training on ``device``."""
    hardware = types_pb2.Hardware(
        cpu_cores=cpu_cores(),
        host_memory_bytes=host_memory_bytes(),
        torch_version=torch.__version__,
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware.device_kind = types_pb2.DEVICE_KIND_CUDA
        hardware.device_name = props.name
        hardware.device_count = 1
        hardware.device_memory_bytes = props.total_memory
    else:
        hardware.device_kind = types_pb2.DEVICE_KIND_CPU
        hardware.device_name = cpu_name()
        hardware.device_count = 1
        hardware.device_memory_bytes = hardware.host_memory_bytes
    return hardware
