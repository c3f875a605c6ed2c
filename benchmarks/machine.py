"""The machine header every benchmark prints and writes: what ran the numbers (a number without its
machine means little: timings moved by several x between machines and loads on the same code)."""

from __future__ import annotations

import os
import platform

MIB = 1 << 20


def machine_info() -> dict:
    """Platform, CPUs, Python/torch/numpy versions, torch threads, the load average now, and the GPU."""
    import numpy
    import torch

    info = {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": numpy.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "load_average_start": os.getloadavg(),
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_mib=round(props.total_memory / MIB),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def finish(info: dict) -> str:
    """Record the load average at the end; the line that shows whether other jobs shared the machine."""
    info["load_average_end"] = os.getloadavg()
    loads = [info[k] for k in ("load_average_start", "load_average_end")]
    shown = " -> ".join("/".join(f"{x:.2f}" for x in v) for v in loads)
    return f"load average (1/5/15 min) start -> end: {shown}"


def busy(info: dict) -> bool:
    """True when other jobs were running (the load average says more than this process's share)."""
    end = info.get("load_average_end", (0.0,))[0]
    return info["load_average_start"][0] > 0.5 or end > info["cpu_affinity"] + 0.5
