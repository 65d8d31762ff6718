"""The GPUs of this machine, counted without importing torch or starting Ray.

A study asked for `--gpus N` on a machine without them must say so at once; asking Ray (or torch)
costs a Ray start (minutes on a loaded machine) or a torch import first.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

#: one entry per NVIDIA GPU while the driver is loaded
PROC_GPUS = Path("/proc/driver/nvidia/gpus")
#: present where AMD's ROCm driver is loaded (Ray counts those GPUs too; we do not)
ROCM_DEVICE = Path("/dev/kfd")


def visible_gpus() -> int | None:
    """GPUs a process started here may use: the NVIDIA driver's count (`/proc/driver/nvidia/gpus`,
    else `nvidia-smi -L`), capped by `CUDA_VISIBLE_DEVICES` where set (as CUDA and Ray read it: up
    to the first invalid entry such as -1). None where another vendor's GPU driver is loaded (unknown).
    """
    if ROCM_DEVICE.exists():
        return None
    if PROC_GPUS.is_dir():
        found = sum(1 for _ in PROC_GPUS.iterdir())
    elif smi := shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        found = sum(line.startswith("GPU ") for line in listing.splitlines())
    else:
        found = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found
    named = 0
    for entry in visible.split(","):
        if not entry.strip() or entry.strip().startswith("-"):
            break
        named += 1
    return min(found, named)
