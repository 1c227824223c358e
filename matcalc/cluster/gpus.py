"""GPU inventory through NVML (``nvidia-ml-py``, imported as ``pynvml``) and the reasons the
dask path may not use GPUs.

Packaging trap: ``chgnet`` depends on ``nvidia-ml-py3``, an old package that installs its own
``pynvml`` module; ``dask-cuda`` needs the maintained ``nvidia-ml-py``. Both provide ``pynvml``,
whichever was installed last wins. `cuda_status` names the clash.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import threading
from typing import Any

from matcalc.version import install_hint

log = logging.getLogger(__name__)

_NVML_LOCK = threading.Lock()
_NVML_READY: bool | None = None


def _pynvml() -> Any | None:
    """The ``pynvml`` module initialised once per process, or None (no package, no driver)."""
    global _NVML_READY
    try:
        import pynvml
    except ImportError:
        return None
    with _NVML_LOCK:
        if _NVML_READY is None:
            try:
                pynvml.nvmlInit()
                _NVML_READY = True
            except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
                log.debug("NVML unavailable: %s", exc)
                _NVML_READY = False
    return pynvml if _NVML_READY else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpus() -> list[dict[str, Any]]:
    """One dict per visible NVIDIA GPU; ``[]`` without a GPU, a driver or ``pynvml``.

    Keys: ``index``, ``name``, ``uuid``, ``memory_total_MiB``, ``memory_used_MiB``,
    ``memory_free_MiB``, ``utilization_percent`` (GPU busy, last sample period),
    ``memory_utilization_percent``, ``temperature_C``, ``power_W`` (None when not reported).
    Values a device does not report are None.
    """
    nvml = _pynvml()
    if nvml is None:
        return []
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as exc:  # noqa: BLE001
        log.warning("NVML could not count GPUs: %s", exc)
        return []
    out = []
    for i in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
        except Exception as exc:  # noqa: BLE001 - a lost GPU must not hide the others
            out.append({"index": i, "name": None, "error": str(exc)})
            continue
        info: dict[str, Any] = {"index": i}

        def get(key: str, fn: Any, *args: Any) -> Any:
            try:
                return fn(handle, *args)
            except Exception:  # noqa: BLE001 - not supported on this device
                return None

        info["name"] = _text(get("name", nvml.nvmlDeviceGetName) or "")
        uuid = get("uuid", nvml.nvmlDeviceGetUUID)
        info["uuid"] = _text(uuid) if uuid is not None else None
        mem = get("mem", nvml.nvmlDeviceGetMemoryInfo)
        mib = 1024 * 1024
        info["memory_total_MiB"] = None if mem is None else round(mem.total / mib, 1)
        info["memory_used_MiB"] = None if mem is None else round(mem.used / mib, 1)
        info["memory_free_MiB"] = None if mem is None else round(mem.free / mib, 1)
        util = get("util", nvml.nvmlDeviceGetUtilizationRates)
        info["utilization_percent"] = None if util is None else float(util.gpu)
        info["memory_utilization_percent"] = None if util is None else float(util.memory)
        temp = get("temp", nvml.nvmlDeviceGetTemperature, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
        info["temperature_C"] = None if temp is None else float(temp)
        power = get("power", nvml.nvmlDeviceGetPowerUsage)
        info["power_W"] = None if power is None else power / 1000.0
        out.append(info)
    return out


def pynvml_providers() -> list[str]:
    """Installed distributions that provide a top-level ``pynvml`` module."""
    try:
        return sorted(set(importlib.metadata.packages_distributions().get("pynvml", [])))
    except Exception:  # noqa: BLE001
        return []


def cuda_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether `matcalc.cluster.start` can build a GPU cluster here.

    The reason says what is missing (no GPU, no torch CUDA, no ``dask_cuda``, the pynvml clash).
    """
    try:
        import torch

        n_torch = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch comes with chgnet
        n_torch = 0
    if n_torch == 0:
        return False, "torch sees no CUDA GPU"
    providers = pynvml_providers()
    clash = ""
    if "nvidia-ml-py3" in providers:
        clash = (" (nvidia-ml-py3, pulled in by chgnet, provides an old 'pynvml' module that clashes with "
                 "nvidia-ml-py; reinstall with: pip install --force-reinstall nvidia-ml-py)")
    if importlib.util.find_spec("dask_cuda") is None:
        return False, "dask_cuda is not installed; install the extra: " + install_hint("cuda") + clash
    try:
        import dask_cuda  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - e.g. missing cuda-bindings, old pynvml
        return False, (f"dask_cuda does not import ({type(exc).__name__}: {exc}); install dask-cuda with its "
                       "CUDA extra, e.g. pip install 'dask-cuda[cu12]'" + clash)
    return True, f"{n_torch} CUDA GPU(s) visible to torch"
