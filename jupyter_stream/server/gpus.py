"""The machine's GPUs, as NVML reports them, and which worker holds which.

NVML comes from the ``nvidia-ml-py`` package; where it finds no driver or no device the
machine has no GPUs. ``c.JupyterStream.simulated_gpus = ["NVIDIA H100 80GB HBM3", ...]``
stands in for NVML (tests, demos): the server then places workers on those devices
exactly as it would on real ones, and reports no memory use for them. Workers from a
gateway (see `gateway`) hold the GPUs ``c.WorkerGateway.gpus`` says it offers.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from ..requirements import GpuRequest, format_gpu_spec

log = logging.getLogger("jupyter_stream")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str
    memory_total: int | None  # bytes

    def describe(self) -> str:
        return f"{self.index}: {self.name}"


class GpuInventory:
    """The devices, read once at start, and their holders (a device has one holder at most)."""

    def __init__(self, simulated: list[str] | None = None, gateway: list[str] | None = None):
        self.simulated = simulated is not None
        #: the devices are a worker gateway's (as configured), not this machine's
        self.gateway = gateway is not None
        if gateway is not None:
            self.devices: list[Gpu] = simulated_devices(gateway)
        else:
            self.devices = simulated_devices(simulated) if simulated is not None else nvml_devices()
        self.holders: dict[int, Any] = {}

    def describe(self) -> str:
        if self.gateway:
            if not self.devices:
                return "the worker gateway offers no GPU (list those it has in c.WorkerGateway.gpus)"
            return f"the worker gateway offers {len(self.devices)}: " + ", ".join(d.describe() for d in self.devices)
        if not self.devices:
            return "this machine has no GPU (NVML found none)"
        return f"this machine has {len(self.devices)}: " + ", ".join(d.describe() for d in self.devices)

    def matching(self, request: GpuRequest) -> list[Gpu]:
        return [d for d in self.devices if request.matches(d.name)]

    def by_name(self) -> dict[str, list[int]]:
        """Device indices by device name (the kinds this machine has, and how many of each)."""
        kinds: dict[str, list[int]] = {}
        for device in self.devices:
            kinds.setdefault(device.name, []).append(device.index)
        return kinds

    def check_satisfiable(self, requests: tuple[GpuRequest, ...]) -> None:
        """Raise ValueError, naming what the machine has, if no alternative could ever be met."""
        if requests and not any(len(self.matching(r)) >= r.count for r in requests):
            raise ValueError(f"no GPU here matches {format_gpu_spec(requests)}; {self.describe()}")

    def free(self, request: GpuRequest) -> list[Gpu]:
        return [d for d in self.matching(request) if d.index not in self.holders]

    def hold(self, indices: list[int], holder: Any) -> None:
        for index in indices:
            self.holders[index] = holder

    def release(self, holder: Any) -> None:
        for index in [i for i, h in self.holders.items() if h is holder]:
            del self.holders[index]

    def usage(self, indices: list[int]) -> list[dict[str, Any]]:
        """What `/api/stream/workers` shows of a worker's devices, memory as NVML reports it now."""
        out = []
        for index in indices:
            device = self.devices[index]
            out.append({"index": device.index, "name": device.name, "uuid": device.uuid,
                        "memory_total": device.memory_total,
                        "memory_used": None if self.simulated or self.gateway else nvml_memory_used(index),
                        "simulated": self.simulated, "gateway": self.gateway})
        return out


def simulated_devices(names: list[str]) -> list[Gpu]:
    devices = []
    for index, name in enumerate(names):
        digest = hashlib.sha256(f"{index}:{name}".encode()).hexdigest()
        uuid = f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
        match = re.search(r"(\d+)\s*GB", name, re.IGNORECASE)
        devices.append(Gpu(index, name, uuid, int(match.group(1)) << 30 if match else None))
    return devices


def nvml_devices() -> list[Gpu]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # no package, no driver, no device: no GPU here
        log.debug("jupyter_stream: NVML unavailable (%s); no GPUs", e)
        return []
    devices = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name, uuid = pynvml.nvmlDeviceGetName(handle), pynvml.nvmlDeviceGetUUID(handle)
        devices.append(Gpu(index, _text(name), _text(uuid), int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
    return devices


def nvml_memory_used(index: int) -> int | None:
    try:
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    except Exception:  # noqa: BLE001 - a reading, not worth failing the API for
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
