"""GPU preflight against a FAKE NVML.

No real GPU exists on these machines (the test cluster's GPUs are character devices without a
driver), so NVML cannot be exercised for real here. The fake replaces the pynvml module
(nvidia-ml-py) — the library boundary the preflight talks through — and keeps the real pynvml's
error classes and constants, so the preflight's handling of them is the real handling.
The last tests run the real CLI where NVML is really absent.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field

import pynvml
import pytest
from helpers import hpcfed

from hpcfed.errors import GpuPreflightFailed
from hpcfed.gpu.preflight import inspect_gpus, run_preflight

MIB = 1024 * 1024


@dataclass
class FakeGpu:
    name: str = "NVIDIA A40"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    minor: int = 0
    total_mib: int = 46068
    used_mib: int = 0
    retired_pending: bool = False
    remap: tuple = (0, 0, 0, 0)
    ecc_uncorrected: int = 0
    processes: list = field(default_factory=list)  # pids
    lost: bool = False


def fake_nvml(gpus: list[FakeGpu], init_error: type | None = None) -> types.SimpleNamespace:
    """A stand-in for the pynvml module with these GPUs (indices in list order)."""
    ns = types.SimpleNamespace()
    for name in dir(pynvml):  # error classes and constants are the real ones
        if name.startswith(("NVMLError", "NVML_")):
            setattr(ns, name, getattr(pynvml, name))
    ns.calls = []

    def init():
        if init_error:
            raise init_error()
        ns.calls.append("init")

    def handle(i):
        if not 0 <= i < len(gpus):
            raise pynvml.NVMLError_InvalidArgument()
        return gpus[i]

    def by_uuid(uuid):
        for g in gpus:
            if g.uuid == uuid:
                return g
        raise pynvml.NVMLError_NotFound()

    def answering(fn):
        def call(g, *args):
            if g.lost:
                raise pynvml.NVMLError_GpuIsLost()
            return fn(g, *args)

        return call

    proc = lambda pid: types.SimpleNamespace(pid=pid, usedGpuMemory=512 * MIB)  # noqa: E731
    ns.nvmlInit = init
    ns.nvmlShutdown = lambda: ns.calls.append("shutdown")
    ns.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    ns.nvmlDeviceGetCount = lambda: len(gpus)
    ns.nvmlDeviceGetHandleByIndex = handle
    ns.nvmlDeviceGetHandleByUUID = by_uuid
    ns.nvmlDeviceGetName = answering(lambda g: g.name)
    ns.nvmlDeviceGetUUID = answering(lambda g: g.uuid)
    ns.nvmlDeviceGetIndex = answering(lambda g: gpus.index(g))
    ns.nvmlDeviceGetMinorNumber = answering(lambda g: g.minor)
    ns.nvmlDeviceGetMemoryInfo = answering(
        lambda g: types.SimpleNamespace(
            total=g.total_mib * MIB, used=g.used_mib * MIB, free=(g.total_mib - g.used_mib) * MIB
        )
    )
    ns.nvmlDeviceGetRetiredPagesPendingStatus = answering(
        lambda g: pynvml.NVML_FEATURE_ENABLED if g.retired_pending else pynvml.NVML_FEATURE_DISABLED
    )
    ns.nvmlDeviceGetRemappedRows = answering(lambda g: g.remap)
    ns.nvmlDeviceGetTotalEccErrors = answering(lambda g, etype, counter: g.ecc_uncorrected)
    ns.nvmlDeviceGetComputeRunningProcesses = answering(lambda g: [proc(p) for p in g.processes])
    ns.nvmlDeviceGetGraphicsRunningProcesses = answering(lambda g: [])
    return ns


def node(n=4, **changes) -> list[FakeGpu]:
    """A node with n A40s; changes = {index: {attr: value}}."""
    gpus = [FakeGpu(uuid=f"GPU-{i:08d}-aaaa-bbbb-cccc-000000000000", minor=i) for i in range(n)]
    for index, attrs in changes.items():
        for k, v in attrs.items():
            setattr(gpus[int(index)], k, v)
    return gpus


JOB_2_GPUS = {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "0,1", "SLURM_GPUS_ON_NODE": "2"}


def test_healthy_gpus_pass_and_report_each_assigned_gpu():
    nvml = fake_nvml(node(2))
    report = run_preflight(20000, False, env=JOB_2_GPUS, nvml=nvml)
    assert report["ok"] and report["nvml"] and report["problems"] == []
    assert [g["uuid"] for g in report["gpus"]] == [g.uuid for g in node(2)]
    assert report["gpus"][0]["memory_total_mib"] == 46068
    assert nvml.calls == ["init", "shutdown"]  # NVML is released after the check
    json.dumps(report)  # the report is what `hpcfed gpus --json` and the job log print


def test_missing_gpu_fails_with_exit_code_10():
    # Slurm gave the job GPUs 2 and 3 of the node, but NVML only finds two GPUs in all (0, 1).
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2", "SLURM_JOB_GPUS": "1,2,3"}
    with pytest.raises(GpuPreflightFailed) as err:
        run_preflight(None, False, env=env, nvml=fake_nvml(node(2)))
    assert err.value.exit_code == 10
    assert "GPU 2 (SLURM_JOB_GPUS) is not visible to NVML" in str(err.value)
    assert "GPU 3 (SLURM_JOB_GPUS)" in str(err.value)
    assert err.value.report["ok"] is False


def test_lost_gpu_fails():
    with pytest.raises(GpuPreflightFailed, match="GPU 1: does not answer NVML queries"):
        run_preflight(None, False, env=JOB_2_GPUS, nvml=fake_nvml(node(2, **{"1": {"lost": True}})))


def test_ecc_errors_beyond_threshold_fail_and_within_pass():
    gpus = node(2, **{"1": {"ecc_uncorrected": 3}})
    with pytest.raises(
        GpuPreflightFailed, match=r"GPU 1: 3 uncorrected ECC error\(s\).*threshold 0"
    ):
        run_preflight(None, False, env=JOB_2_GPUS, nvml=fake_nvml(gpus))
    report = run_preflight(None, False, env=JOB_2_GPUS, ecc_threshold=5, nvml=fake_nvml(gpus))
    assert report["ok"] and report["gpus"][1]["ecc_uncorrected_volatile"] == 3


def test_retired_pages_pending_and_failed_remap_fail():
    gpus = node(2, **{"0": {"retired_pending": True}, "1": {"remap": (0, 1, 0, 1)}})
    with pytest.raises(GpuPreflightFailed) as err:
        run_preflight(None, False, env=JOB_2_GPUS, nvml=fake_nvml(gpus))
    assert "GPU 0: retired memory pages are pending" in str(err.value)
    assert "GPU 1: a memory row remap failed" in str(err.value)


def test_busy_gpu_fails_naming_the_other_process():
    gpus = node(2, **{"0": {"processes": [4242], "used_mib": 30000}})
    with pytest.raises(
        GpuPreflightFailed, match=r"GPU 0: busy: 1 other process\(es\) use it \(pid 4242\)"
    ):
        run_preflight(None, False, env=JOB_2_GPUS, nvml=fake_nvml(gpus))


def test_too_little_free_memory_fails():
    gpus = node(2, **{"1": {"used_mib": 40000}})
    with pytest.raises(
        GpuPreflightFailed, match="GPU 1: 6068 MiB free, the profile expects at least 20000 MiB"
    ):
        run_preflight(20000, False, env=JOB_2_GPUS, nvml=fake_nvml(gpus))


def test_only_the_assigned_gpus_are_checked_when_nvml_sees_the_whole_node():
    # Job got node GPUs 2,3 (SLURM_JOB_GPUS); CUDA renumbered them 0,1. A busy GPU 0 of the
    # node belongs to another job and must not fail this one; a broken GPU 3 must.
    gpus = node(4, **{"0": {"processes": [1]}, "3": {"ecc_uncorrected": 1}})
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "2,3"}
    with pytest.raises(GpuPreflightFailed) as err:
        run_preflight(None, False, env=env, nvml=fake_nvml(gpus))
    assert [g["id"] for g in err.value.report["gpus"]] == ["nvidia2", "nvidia3"]
    assert "GPU nvidia3: 1 uncorrected ECC" in str(err.value) and "busy" not in str(err.value)


def test_uuid_assignment_is_looked_up_by_uuid():
    gpus = node(4)
    env = {"CUDA_VISIBLE_DEVICES": f"{gpus[3].uuid},GPU-deadbeef"}
    report = inspect_gpus(env=env, nvml=fake_nvml(gpus))
    assert [g["uuid"] for g in report["gpus"]] == [gpus[3].uuid]
    assert report["problems"] == ["GPU GPU-deadbeef (CUDA_VISIBLE_DEVICES) is not visible to NVML"]


def test_without_nvml_the_profile_decides():
    nvml = fake_nvml([], init_error=pynvml.NVMLError_LibraryNotFound)
    report = run_preflight(None, True, env=JOB_2_GPUS, nvml=nvml)
    assert report["ok"] and report["skipped"].startswith(
        "skipping: NVML library (libnvidia-ml.so.1) not found"
    )
    assert report["assignment"]["count"] == 2
    with pytest.raises(GpuPreflightFailed, match="preflight.allow_without_nvml is false"):
        run_preflight(None, False, env=JOB_2_GPUS, nvml=nvml)


def test_cli_without_nvml_here_says_it_skips_and_requires_on_request():
    # Real NVML, really absent on this machine.
    proc = hpcfed("gpus", "--json", env={"CUDA_VISIBLE_DEVICES": "1", "SLURM_JOB_GPUS": "3"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["skipped"].startswith("skipping:") and report["assignment"]["slurm"] == ["3"]
    proc = hpcfed("gpus", "--require-nvml")
    assert proc.returncode == 10
    assert proc.stderr.strip().startswith("hpcfed: error: GPU preflight cannot run:")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
