"""Probes: which GPU a CUDA ordinal is, reading its memory, host RAM and cgroups, peaks."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from server.memory import probes
from server.memory.cgroups import read_cgroup_memory
from server.memory.gpu_identity import (
    CudaIdentity,
    NvmlDeviceInfo,
    NvmlMigInfo,
    match_cuda_identity,
    parse_pci_bus_id,
    resolve_visible_devices,
)
from server.memory.peaks import peak_sampler
from server.memory.probes import (
    DeviceMemory,
    HostProbe,
    MemorySnapshot,
    NvmlProbe,
    ProbeUnavailable,
    cuda_available,
    open_probe,
)

GiB = 2**30

UUID_A = "GPU-aaaaaaaa-1111-2222-3333-444444444444"
UUID_B = "GPU-bbbbbbbb-1111-2222-3333-444444444444"
UUID_C = "GPU-cccccccc-1111-2222-3333-444444444444"
MIG_D = "MIG-dddddddd-1111-2222-3333-444444444444"
MIG_E = "MIG-eeeeeeee-1111-2222-3333-444444444444"

GPU_A = NvmlDeviceInfo(0, UUID_A, "00000000:17:00.0", "NVIDIA A")
GPU_B = NvmlDeviceInfo(1, UUID_B, "00000000:65:00.0", "NVIDIA A")
GPU_C = NvmlDeviceInfo(
    2,
    UUID_C,
    "00000000:B3:00.0",
    "NVIDIA A100",
    mig_enabled=True,
    mig_devices=(NvmlMigInfo(0, MIG_D, 1, 0), NvmlMigInfo(1, MIG_E, 2, 0)),
)
DEVICES = [GPU_A, GPU_B, GPU_C]


def _names(env: str | None, devices: list[NvmlDeviceInfo] = DEVICES) -> list[str]:
    return [d.uuid[:12] for d in resolve_visible_devices(env, devices)]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (None, ["GPU-aaaaaaaa", "GPU-bbbbbbbb", "MIG-dddddddd"]),
        ("", []),
        ("1", ["GPU-bbbbbbbb"]),
        ("1,0", ["GPU-bbbbbbbb", "GPU-aaaaaaaa"]),
        (" 1 , 0 ", ["GPU-bbbbbbbb", "GPU-aaaaaaaa"]),
        ("0,7,1", ["GPU-aaaaaaaa"]),  # CUDA stops at the first entry naming nothing
        ("-1", []),
        ("0,0", ["GPU-aaaaaaaa"]),  # a repeat ends the list too
        ("GPU-bbbbbbbb", ["GPU-bbbbbbbb"]),  # any unambiguous UUID prefix
        ("gpu-BBBB", ["GPU-bbbbbbbb"]),
        (UUID_B + "," + UUID_A, ["GPU-bbbbbbbb", "GPU-aaaaaaaa"]),
        ("GPU-", []),  # matches every GPU: ambiguous
        ("GPU-ffff", []),
        ("2", ["MIG-dddddddd"]),  # a MIG-enabled GPU runs CUDA on its first slice
        (MIG_E, ["MIG-eeeeeeee"]),
        ("MIG-eeee", ["MIG-eeeeeeee"]),
        (f"MIG-{UUID_C}/2/0", ["MIG-eeeeeeee"]),  # legacy form: parent UUID / GI / CI
        (f"MIG-{UUID_C}/9/0", []),
        (f"{MIG_D},{MIG_E}", ["MIG-dddddddd"]),  # one MIG slice per process at most
        (f"{MIG_E},1", ["MIG-eeeeeeee", "GPU-bbbbbbbb"]),
        ("nonsense,0", []),
    ],
)
def test_resolve_visible_devices(env: str | None, expected: list[str]) -> None:
    assert _names(env) == expected


def test_integer_entries_count_in_pci_order_not_nvml_listing_order() -> None:
    shuffled = [GPU_B, GPU_C, GPU_A]
    assert _names("0", shuffled) == ["GPU-aaaaaaaa"]
    assert _names(None, shuffled) == ["GPU-aaaaaaaa", "GPU-bbbbbbbb", "MIG-dddddddd"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00000000:17:00.0", (0, 0x17, 0, 0)),
        ("0000:17:00.0", (0, 0x17, 0, 0)),  # CUDA's 4-digit domain matches NVML's 8-digit one
        ("0001:B3:00.1", (1, 0xB3, 0, 1)),
        ("17:00.0", (0, 0x17, 0, 0)),
        ("not a bus id", None),
    ],
)
def test_parse_pci_bus_id(text: str, expected: tuple[int, int, int, int] | None) -> None:
    assert parse_pci_bus_id(text) == expected


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        (CudaIdentity(UUID_B[4:], None), UUID_B),
        (CudaIdentity(MIG_E[4:], "0000:B3:00.0"), MIG_E),
        (CudaIdentity(None, "0000:65:00.0"), UUID_B),
        (CudaIdentity("ffffffff-0000-0000-0000-000000000000", "0000:17:00.0"), UUID_A),
        # A bus id (or a parent UUID from an old driver) cannot tell two slices apart.
        (CudaIdentity(None, "0000:B3:00.0"), None),
        (CudaIdentity(UUID_C[4:], None), None),
        (CudaIdentity(None, None), None),
    ],
)
def test_match_cuda_identity(identity: CudaIdentity, expected: str | None) -> None:
    found = match_cuda_identity(identity, DEVICES)
    assert (found.uuid if found is not None else None) == expected


class FakeNvml:
    """Just enough of pynvml: three GPUs as above, the third split into two MIG slices."""

    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        pass

    def __init__(self, *, fail_init: bool = False) -> None:
        self.fail_init = fail_init
        self.inits = 0
        self.shutdowns = 0
        # NVML lists GPUs in its own order; memory per UUID.
        self.gpus = [GPU_A, GPU_B, GPU_C]
        self.memory = {
            UUID_A: (24 * GiB, 20 * GiB),
            UUID_B: (24 * GiB, 2 * GiB),
            UUID_C: (80 * GiB, 70 * GiB),
            MIG_D: (10 * GiB, 9 * GiB),
            MIG_E: (20 * GiB, 5 * GiB),
        }

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return ("gpu", self.gpus[index])

    def nvmlDeviceGetUUID(self, handle: Any) -> bytes:
        return str(handle[1].uuid).encode()

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        return SimpleNamespace(busId=handle[1].pci_bus_id.encode())

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return str(handle[1].name)

    def nvmlDeviceGetMigMode(self, handle: Any) -> tuple[int, int]:
        if not handle[1].mig_enabled:
            raise self.NVMLError("Not Supported")
        return 1, 1

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> Any:
        slices = handle[1].mig_devices
        if index >= len(slices):
            raise self.NVMLError("Not Found")
        return ("mig", slices[index])

    def nvmlDeviceGetGpuInstanceId(self, handle: Any) -> int:
        return int(handle[1].gpu_instance_id)

    def nvmlDeviceGetComputeInstanceId(self, handle: Any) -> int:
        return int(handle[1].compute_instance_id)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        total, free = self.memory[handle[1].uuid]
        return SimpleNamespace(total=total, free=free, used=total - free)


def _probe(
    index: int,
    env: str | None,
    *,
    nvml: FakeNvml | None = None,
    identity: CudaIdentity | None = None,
) -> NvmlProbe:
    environ = {} if env is None else {"CUDA_VISIBLE_DEVICES": env}
    return NvmlProbe(
        index,
        nvml=nvml or FakeNvml(),
        environ=environ,
        driver_identity=(lambda ordinal: identity),
    )


@pytest.mark.parametrize(
    ("index", "env", "uuid", "free", "mig"),
    [
        (0, None, UUID_A, 20 * GiB, False),
        (1, None, UUID_B, 2 * GiB, False),
        (0, "1", UUID_B, 2 * GiB, False),
        (1, "1,0", UUID_A, 20 * GiB, False),
        (0, MIG_E, MIG_E, 5 * GiB, True),
        (0, "2", MIG_D, 9 * GiB, True),
    ],
)
def test_nvml_probe_reads_the_device_cuda_means(
    index: int, env: str | None, uuid: str, free: int, mig: bool
) -> None:
    snap = _probe(index, env).snapshot()
    assert (snap.device.uuid, snap.device.free, snap.device.mig) == (uuid, free, mig)
    assert snap.device.kind == "cuda" and snap.device.index == index
    assert snap.device.used == snap.device.total - snap.device.free
    assert snap.host.kind == "cpu" and snap.host.total > 0


def test_the_driver_answer_wins_over_the_environment(caplog: pytest.LogCaptureFixture) -> None:
    # CUDA_DEVICE_ORDER=FASTEST_FIRST on mixed GPUs: ordinal 0 is not the lowest bus id.
    probe = _probe(0, None, identity=CudaIdentity(None, "0000:65:00.0"))
    with caplog.at_level(logging.WARNING):
        snap = probe.snapshot()
    assert snap.device.uuid == UUID_B
    assert "using the driver's answer" in caplog.text
    assert probe.describe()["matched_by"].startswith("CUDA driver")


def test_an_ordinal_past_the_visible_devices_is_unavailable() -> None:
    with pytest.raises(ProbeUnavailable, match="no CUDA device 1"):
        _probe(1, "0").snapshot()


def test_nvml_failing_to_start_is_unavailable_not_a_crash() -> None:
    with pytest.raises(ProbeUnavailable, match="Driver Not Loaded"):
        _probe(0, None, nvml=FakeNvml(fail_init=True)).open()


def test_nvml_initialises_lazily_once_and_closes() -> None:
    nvml = FakeNvml()
    probe = _probe(0, None, nvml=nvml)
    assert nvml.inits == 0
    probe.snapshot()
    probe.snapshot()
    assert probe.describe()["uuid"] == UUID_A
    assert nvml.inits == 1
    probe.close()
    assert nvml.shutdowns == 1


def test_cuda_available_never_raises() -> None:
    ok, reason = cuda_available()
    assert isinstance(ok, bool) and reason


def test_open_probe() -> None:
    assert isinstance(open_probe("cpu", 0), HostProbe)
    with pytest.raises(ValueError, match="unknown device"):
        open_probe("tpu", 0)
    ok, _ = cuda_available()
    if ok:
        snap = open_probe("cuda", 0).snapshot()
        assert 0 <= snap.device.free <= snap.device.total
    else:
        with pytest.raises(ProbeUnavailable):
            open_probe("cuda", 0)


def test_host_probe_reads_this_machine() -> None:
    snap = HostProbe().snapshot()
    assert snap.device is snap.host
    assert 0 < snap.host.free <= snap.host.total
    assert snap.host.kind == "cpu" and snap.host.uuid is None


def _cgroup_v2(root: Path, relative: str, limit: str, current: int, inactive: int) -> None:
    folder = root / relative
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.max").write_text(f"{limit}\n")
    (folder / "memory.current").write_text(f"{current}\n")
    (folder / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\nactive_file 3\n")


def test_cgroup_v2_limit_and_working_set(tmp_path: Path) -> None:
    _cgroup_v2(tmp_path, "", str(2 * GiB), 3 * GiB // 2, GiB // 2)
    cgroup = read_cgroup_memory(tmp_path, tmp_path / "missing")
    assert cgroup is not None
    assert (cgroup.limit, cgroup.usage) == (2 * GiB, GiB)


def test_cgroup_v2_tightest_ancestor_wins(tmp_path: Path) -> None:
    _cgroup_v2(tmp_path, "", "max", 0, 0)
    _cgroup_v2(tmp_path, "kubepods", str(3 * GiB), 0, 0)
    _cgroup_v2(tmp_path, "kubepods/pod1", "max", 0, 0)
    membership = tmp_path / "self-cgroup"
    membership.write_text("0::/kubepods/pod1\n")
    cgroup = read_cgroup_memory(tmp_path, membership)
    assert cgroup is not None and cgroup.limit == 3 * GiB
    assert cgroup.path.endswith("kubepods")


def test_cgroup_unlimited(tmp_path: Path) -> None:
    _cgroup_v2(tmp_path, "", "max", 0, 0)
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert read_cgroup_memory(tmp_path, tmp_path / "missing") is None


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{GiB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{GiB // 2}\n")
    (v1 / "memory.stat").write_text(f"total_inactive_file {GiB // 4}\n")
    cgroup = read_cgroup_memory(tmp_path, tmp_path / "missing")
    assert cgroup is not None and (cgroup.limit, cgroup.usage) == (GiB, GiB // 4)


def test_host_probe_respects_a_smaller_cgroup_limit(tmp_path: Path) -> None:
    _cgroup_v2(tmp_path, "", str(256 * 2**20), 200 * 2**20, 0)
    memory = HostProbe(cgroup_root=tmp_path).read()
    assert memory.total == 256 * 2**20
    assert memory.free <= 56 * 2**20
    assert memory.used == 200 * 2**20


class RampProbe:
    """A probe whose ``used`` the test sets."""

    def __init__(self, used: int) -> None:
        self.used = used
        self.reads = 0

    def snapshot(self) -> MemorySnapshot:
        self.reads += 1
        memory = DeviceMemory("cuda", 0, "fake", None, 100, 100 - self.used, self.used)
        return MemorySnapshot(memory, memory, time.monotonic())

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake"}


def _wait_for_reads(probe: RampProbe, more: int) -> None:
    target = probe.reads + more
    deadline = time.monotonic() + 5
    while probe.reads < target and time.monotonic() < deadline:
        time.sleep(0.001)


def test_peak_sampler_catches_a_transient_peak() -> None:
    probe = RampProbe(10)
    with peak_sampler(probe, interval_ms=1) as reading:
        probe.used = 70
        _wait_for_reads(probe, 3)
        probe.used = 20
        _wait_for_reads(probe, 3)
    assert (reading.baseline, reading.peak, reading.delta) == (10, 70, 60)
    assert reading.samples >= 6


def test_peak_sampler_stops_its_thread() -> None:
    before = threading.active_count()
    with peak_sampler(RampProbe(1), interval_ms=1):
        pass
    assert threading.active_count() == before


# ---- device detection: the cuBLAS CTranslate2 will dlopen --------------------------------------
# The loader reads LD_LIBRARY_PATH when a process starts, so each case runs in a fresh Python
# whose library path is a folder we fill: nothing, a file that is not a library, a library that
# is not cuBLAS, one with only some of the functions CTranslate2 resolves, one whose libcublasLt
# dependency is missing, and one that passes. The libraries are compiled here from a few lines
# of C; the names and functions checked are those read off the installed CTranslate2.

_CHECK = (
    "from server.memory.probes import cublas_needs, missing_cuda_library as m; "
    "print(m(cublas_needs()) or 'OK')"
)


def _check_with_library_path(folder: Path) -> str:
    env = {**os.environ, "LD_LIBRARY_PATH": str(folder)}
    done = subprocess.run(
        [sys.executable, "-c", _CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    )
    return done.stdout.strip()


def _compile_library(folder: Path, soname: str, functions: list[str], *links: str) -> None:
    calls = "".join(f"int {f}(void) {{ return 0; }}\n" for f in functions)
    (folder / "stub.c").write_text(calls)
    subprocess.run(
        [
            "cc",
            "-shared",
            "-fPIC",
            "-o",
            str(folder / soname),
            f"-Wl,-soname,{soname}",
            str(folder / "stub.c"),
            f"-L{folder}",
            *links,
        ],
        check=True,
        capture_output=True,
    )


def test_cublas_needs_are_read_from_ctranslate2() -> None:
    needs = probes.cublas_needs()
    assert needs.libraries == ("libcublas.so.12",)  # the 4.x wheels on PyPI: CUDA 12 builds
    assert {"cublasCreate_v2", "cublasGemmEx", "cublasSgemm_v2"} <= set(needs.functions)


def test_cublas_check_names_what_is_missing(tmp_path: Path) -> None:
    assert shutil.which("cc"), "the C compiler builds the stand-in libraries"
    needs = probes.cublas_needs()
    name = needs.libraries[0]
    reason = _check_with_library_path(tmp_path)  # nothing there
    assert reason.startswith(f"{name} cannot be loaded") and "LD_LIBRARY_PATH" in reason
    (tmp_path / name).write_bytes(b"not an ELF file")
    assert _check_with_library_path(tmp_path).startswith(f"{name} cannot be loaded")
    _compile_library(tmp_path, name, ["something_else"])  # a library, but not cuBLAS
    assert _check_with_library_path(tmp_path).startswith(f"{name} loads but lacks cublasCreate_v2")
    _compile_library(tmp_path, name, ["cublasCreate_v2"])  # cuBLAS of another version
    reason = _check_with_library_path(tmp_path)
    assert "cublasGemmEx" in reason and "not the cuBLAS this CTranslate2 was built for" in reason
    # everything, but through libcublasLt (as the CUDA 13 link without its Lt beside it)
    _compile_library(tmp_path, "libcublasLt.so.12", ["cublasLtCreate"])
    _compile_library(
        tmp_path, name, list(needs.functions), "-Wl,--no-as-needed", "-l:libcublasLt.so.12"
    )
    assert _check_with_library_path(tmp_path) == "OK"
    (tmp_path / "libcublasLt.so.12").unlink()
    reason = _check_with_library_path(tmp_path)
    assert reason.startswith(f"{name} cannot be loaded") and "libcublasLt.so.12" in reason


def test_a_gpu_without_cublas_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """CTranslate2 counting a device is not enough: this host has no libcublas.so.12, so a
    pretend device must still be refused, with the library named."""
    import ctranslate2

    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 1)
    ok, reason = cuda_available()
    assert not ok
    assert reason.startswith("1 CUDA device(s), but libcublas.so.12 cannot be loaded")
