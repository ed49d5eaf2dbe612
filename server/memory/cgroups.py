"""The memory limit of the cgroups this process is in (containers, systemd slices).

psutil reports the machine's RAM; a container may be allowed far less. The host probe reads
the tightest limit among this process's cgroup and its ancestors (v2, then v1) and plans
against that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# cgroup v1 reports "no limit" as a huge page-aligned number rather than "max".
_CGROUP_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory limit of the cgroups this process is in.

    Attributes:
        limit: The limit in bytes.
        usage: Memory charged to that cgroup, less inactive file cache the kernel can reclaim
            (the "working set" container runtimes kill on).
        path: The cgroup directory the limit comes from.
    """

    limit: int
    usage: int
    path: str


def read_cgroup_memory(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> CgroupMemory | None:
    """Find the memory limit that applies to this process, if any (cgroup v2, then v1).

    Args:
        root: Where the cgroup file system is mounted.
        proc_cgroup: This process's cgroup membership file.

    Returns:
        The smallest limit among this process's cgroup and its ancestors, or None if unlimited.
    """
    best: CgroupMemory | None = None
    for directory in _cgroup_v2_dirs(root, proc_cgroup):
        limit = _read_int(directory / "memory.max")
        if limit is None or limit >= _CGROUP_UNLIMITED:
            continue
        if best is None or limit < best.limit:
            current = _read_int(directory / "memory.current") or 0
            inactive = _read_stat(directory / "memory.stat", "inactive_file")
            best = CgroupMemory(limit, max(0, current - inactive), str(directory))
    if best is not None:
        return best
    v1 = root / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    if limit is None or limit >= _CGROUP_UNLIMITED:
        return None
    usage = _read_int(v1 / "memory.usage_in_bytes") or 0
    inactive = _read_stat(v1 / "memory.stat", "total_inactive_file")
    return CgroupMemory(limit, max(0, usage - inactive), str(v1))


def _cgroup_v2_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    # The process's own cgroup and every ancestor up to the mount point: a limit set on a
    # parent (a systemd slice, a pod) binds just as hard as one set on the leaf.
    dirs = [root]
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                relative = Path(line[3:].strip().lstrip("/"))
                parts = relative.parts
                dirs.extend(root.joinpath(*parts[: i + 1]) for i in range(len(parts)))
    except OSError:
        pass
    return dirs


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _read_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0
