"""Shared helpers for the benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import torch


def command_line(script: str, parser, args, skip=("out",)) -> str:
    """The command a report names: the script with the flags that differ from their defaults
    (``skip``: those that only say where the results go)."""
    flags = []
    for key, value in vars(args).items():
        if key in skip or value == parser.get_default(key):
            continue
        flag = "--" + key.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value}")
    return " ".join(["python", f"benchmarks/{script}", *flags])


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def interleaved_times(fns: dict, *, repeats: int = 10, warmup: int = 2) -> dict:
    """Wall times (seconds) of each fn in ``fns``, called in turn once per round.

    Round-robin rather than one function after another, so that a slow spell of a shared machine
    spreads over every function instead of landing on whichever ran then.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def quartiles(times: list) -> tuple:
    """(25th percentile, median, 75th percentile) of a list of times."""
    return tuple(statistics.quantiles(times, n=4, method="inclusive"))


def write_results(name: str, payload: dict, markdown: str, out_dir: str | None = None) -> None:
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown)


def describe(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads)"
    return f"{where}, torch {info['torch']}, Python {info['python']}, {info['date']}"
