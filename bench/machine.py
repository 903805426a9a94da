"""What a benchmark figure depends on, for its table header: the CPU and its load."""

from __future__ import annotations

import os
from pathlib import Path

# The vector extensions that decide which precision runs fastest (see lscpu's flags).
SPEED_FLAGS = ("avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu() -> str:
    """The CPU model, its count and the speed-deciding flags it has (lscpu's)."""
    model, flags = "", []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = [f for f in line.split(":", 1)[1].split() if f in SPEED_FLAGS]
    found = " ".join(flags) or "no AVX-512 VNNI/BF16, no AMX"
    return f"{model}, {os.cpu_count()} CPUs, {found}"


def load() -> str:
    """The 1-minute load average (other work on the machine skews a figure)."""
    return f"{os.getloadavg()[0]:.2f}"


def publish(table: str, markdown: "str | None") -> None:
    """Print a result table, and append it to ``markdown`` (a results file) if given."""
    print(table)
    if markdown:
        with open(markdown, "a", encoding="utf-8") as handle:
            handle.write(table + "\n\n")
