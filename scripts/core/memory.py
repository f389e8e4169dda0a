# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""How much memory this process can still get: the system's available memory, capped by a container's cgroup limit.

Inference refuses a mask whose estimated need exceeds it before any work (``scripts.generation.inference``).
"""

from __future__ import annotations

__all__ = ["available_memory", "format_bytes"]

#: A cgroup limit at or above this is no limit (cgroup v1 reports about 2**63).
_NO_CGROUP_LIMIT = 2**60


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> int | None:
    """Memory left under this container's cgroup limit (cgroup v2 or v1), or ``None`` without a limit.

    Reclaimable page cache (``inactive_file``) counts as available, as the kernel would free it.
    """
    for limit_file, usage_file, stat_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
            "/sys/fs/cgroup/memory/memory.stat",
        ),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is None or usage is None or limit >= _NO_CGROUP_LIMIT:
            continue
        reclaimable = 0
        try:
            with open(stat_file) as f:
                stats = dict(line.split() for line in f if len(line.split()) == 2)
            reclaimable = int(stats.get("inactive_file", 0))
        except (OSError, ValueError):
            pass
        return max(0, limit - usage + reclaimable)
    return None


def available_memory() -> int | None:
    """Bytes of memory the system can still give this process, or ``None`` where it cannot be told.

    ``psutil``'s available memory when installed, else ``MemAvailable`` of ``/proc/meminfo``;
    capped by the cgroup limit of a container or batch job, which those do not see.
    """
    available = None
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    limited = _cgroup_available()
    if limited is not None:
        available = limited if available is None else min(available, limited)
    return available


def format_bytes(num_bytes: float) -> str:
    """``num_bytes`` in GB, for messages."""
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes < 1e10 else f"{num_bytes / 1e9:.0f} GB"
