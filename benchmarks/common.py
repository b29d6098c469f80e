"""What every benchmark's report says about the machine its figures were measured on."""

from __future__ import annotations

import os
import platform

import torch

from dllm_engine.loading import cpu_has_bf16


def machine() -> dict:
    """What the figures were measured on: CPU model, cores, native bf16, torch and Python."""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(), "cpu_bf16": cpu_has_bf16(),
            "torch": torch.__version__, "python": platform.python_version()}
