"""What machine a benchmark ran on: the ``machine`` field of every benchmark's JSON."""

from __future__ import annotations

import os
import platform

__all__ = ["machine_info"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """Cores, CPU model, memory and accelerators (from JAX, when importable)."""
    info = {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import jax

        devs = jax.devices()
        info["jax_backend"] = jax.default_backend()
        info["gpu"] = [d.device_kind for d in devs if d.platform == "gpu"] or None
    except Exception as err:  # noqa: BLE001 - a benchmark must still report the machine
        info["gpu"] = None
        info["jax_error"] = repr(err)
    return info
