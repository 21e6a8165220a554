"""GPU preflight: before the role starts, check with NVML that the GPUs Slurm assigned can be trusted.

Checked for each assigned GPU: NVML finds it; it is healthy (no retired pages or remapped rows
pending, no failed row remap, uncorrected volatile ECC errors not above a threshold); no other
process uses it; it has the free memory the profile expects. A failed check raises
GpuPreflightFailed (exit code 10) so the job ends in its first seconds with the reason in its log.

Where NVML cannot be loaded (no NVIDIA driver: login nodes, the test cluster's fake GPUs) the report
says it is skipping and why; the profile's `preflight.allow_without_nvml` decides if that passes.
The pynvml module (nvidia-ml-py) is the only boundary to the driver: tests replace it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from hpcfed.errors import GpuPreflightFailed
from hpcfed.gpu.assignment import read_assignment

MIB = 1024 * 1024


def _load_nvml():
    import pynvml  # nvidia-ml-py

    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _why_no_nvml(nvml, exc: Exception) -> str:
    if isinstance(exc, ImportError):
        return "the nvidia-ml-py package is not installed"
    if isinstance(exc, getattr(nvml, "NVMLError_LibraryNotFound", ())):
        return "NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver on this node"
    if isinstance(exc, getattr(nvml, "NVMLError_DriverNotLoaded", ())):
        return "the NVIDIA driver is not loaded on this node"
    return f"NVML failed to initialise: {exc}"


def _optional(nvml, fn, *args):
    """Call an NVML query that some GPUs do not support: None when unsupported."""
    try:
        return fn(*args)
    except nvml.NVMLError_NotSupported:
        return None


def _select(
    nvml, assignment: dict, all_if_unassigned: bool
) -> tuple[list[tuple[str, Any]], list[str]]:
    """(label, handle) for each assigned GPU, and problems for the ones NVML cannot find."""
    count = nvml.nvmlDeviceGetCount()
    every = [(str(i), nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
    wanted = assignment["count"]
    if wanted is None:
        return (every if all_if_unassigned else []), []
    cuda = assignment["cuda"] or []
    slurm = assignment["slurm"]
    selected: list[tuple[str, Any]] = []
    problems: list[str] = []

    if cuda and all(c.startswith(("GPU-", "MIG-")) for c in cuda):
        for uuid in cuda:
            try:
                selected.append((uuid, nvml.nvmlDeviceGetHandleByUUID(uuid)))
            except nvml.NVMLError:
                problems.append(f"GPU {uuid} (CUDA_VISIBLE_DEVICES) is not visible to NVML")
        return selected, problems
    if count == wanted:
        # NVML sees exactly the job's GPUs: the node has that many, or cgroups hide the others.
        return every, []
    if slurm:
        # NVML sees the whole node: Slurm's indices follow gres.conf's File=/dev/nvidiaN order.
        by_minor = {}
        for _label, handle in every:
            minor = _optional(nvml, nvml.nvmlDeviceGetMinorNumber, handle)
            if minor is not None:
                by_minor[str(minor)] = handle
        for index in slurm:
            if index in by_minor:
                selected.append((f"nvidia{index}", by_minor[index]))
            else:
                problems.append(
                    f"GPU {index} ({assignment['slurm_variable']}) is not visible to NVML "
                    f"(NVML sees {count} GPU(s))"
                )
        return selected, problems
    for index in cuda:
        if index.isdigit() and int(index) < count:
            selected.append((index, every[int(index)][1]))
        else:
            problems.append(
                f"GPU {index} (CUDA_VISIBLE_DEVICES) is not visible to NVML (NVML sees {count} GPU(s))"
            )
    if len(selected) + len(problems) < wanted:
        problems.append(f"the job was given {wanted} GPU(s) but NVML sees {count}")
    return selected, problems


def _check_device(
    nvml,
    label: str,
    handle,
    *,
    min_memory_mib: Optional[int],
    ecc_threshold: int,
    own_pids: set[int],
) -> dict:
    gpu: dict[str, Any] = {"id": label, "problems": []}
    problems = gpu["problems"]
    try:
        gpu["name"] = _text(nvml.nvmlDeviceGetName(handle))
        gpu["uuid"] = _text(nvml.nvmlDeviceGetUUID(handle))
        gpu["index"] = nvml.nvmlDeviceGetIndex(handle)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    except nvml.NVMLError as exc:  # e.g. GPU is lost: the device is there but does not answer
        problems.append(f"does not answer NVML queries: {exc}")
        gpu["ok"] = False
        return gpu
    gpu["memory_total_mib"] = mem.total // MIB
    gpu["memory_free_mib"] = mem.free // MIB

    pending = _optional(nvml, nvml.nvmlDeviceGetRetiredPagesPendingStatus, handle)
    gpu["retired_pages_pending"] = None if pending is None else pending == nvml.NVML_FEATURE_ENABLED
    if gpu["retired_pages_pending"]:
        problems.append("retired memory pages are pending: the GPU needs a reset")
    remap = _optional(nvml, nvml.nvmlDeviceGetRemappedRows, handle)
    if remap is not None:
        _corr, _unc, remap_pending, remap_failed = remap
        gpu["remapped_rows_pending"] = bool(remap_pending)
        if remap_pending:
            problems.append("remapped memory rows are pending: the GPU needs a reset")
        if remap_failed:
            problems.append("a memory row remap failed: the GPU should be replaced")
    ecc = _optional(
        nvml,
        nvml.nvmlDeviceGetTotalEccErrors,
        handle,
        nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
        nvml.NVML_VOLATILE_ECC,
    )
    gpu["ecc_uncorrected_volatile"] = ecc
    if ecc is not None and ecc > ecc_threshold:
        problems.append(
            f"{ecc} uncorrected ECC error(s) since the driver loaded (threshold {ecc_threshold})"
        )

    procs: list[dict[str, Any]] = []
    for query in (
        nvml.nvmlDeviceGetComputeRunningProcesses,
        nvml.nvmlDeviceGetGraphicsRunningProcesses,
    ):
        for p in _optional(nvml, query, handle) or []:
            if p.pid not in own_pids and p.pid not in [q["pid"] for q in procs]:
                used = getattr(p, "usedGpuMemory", None)
                procs.append({"pid": p.pid, "used_mib": None if used is None else used // MIB})
    gpu["processes"] = procs
    if procs:
        problems.append(
            f"busy: {len(procs)} other process(es) use it (pid {', '.join(str(p['pid']) for p in procs)})"
        )
    if min_memory_mib is not None and gpu["memory_free_mib"] < min_memory_mib:
        problems.append(
            f"{gpu['memory_free_mib']} MiB free, the profile expects at least {min_memory_mib} MiB"
        )
    gpu["ok"] = not problems
    return gpu


def inspect_gpus(
    min_memory_mib: Optional[int] = None,
    *,
    env: Optional[Mapping[str, str]] = None,
    ecc_threshold: int = 0,
    all_if_unassigned: bool = False,
    nvml=None,
) -> dict:
    """The preflight report without raising: `ok`, `problems`, one entry per GPU, the assignment.

    env: where Slurm's variables are read (os.environ when None); nvml: the pynvml module.
    all_if_unassigned: with no GPU variables (a login node), report every GPU NVML sees.
    """
    assignment = read_assignment(os.environ if env is None else env)
    report: dict[str, Any] = {
        "assignment": assignment,
        "nvml": False,
        "skipped": None,
        "driver_version": None,
        "min_memory_mib": min_memory_mib,
        "ecc_threshold": ecc_threshold,
        "gpus": [],
        "problems": [],
    }
    try:
        nvml = nvml or _load_nvml()
        nvml.nvmlInit()
    except Exception as exc:  # ImportError or pynvml.NVMLError
        report["skipped"] = f"skipping: {_why_no_nvml(nvml, exc)}"
        report["ok"] = True
        return report
    try:
        report["nvml"] = True
        report["driver_version"] = _text(nvml.nvmlSystemGetDriverVersion())
        selected, problems = _select(nvml, assignment, all_if_unassigned)
        report["problems"].extend(problems)
        own = {os.getpid(), os.getppid()}
        for label, handle in selected:
            gpu = _check_device(
                nvml,
                label,
                handle,
                min_memory_mib=min_memory_mib,
                ecc_threshold=ecc_threshold,
                own_pids=own,
            )
            report["gpus"].append(gpu)
            report["problems"].extend(f"GPU {label}: {p}" for p in gpu["problems"])
    except nvml.NVMLError as exc:
        report["problems"].append(f"NVML query failed: {exc}")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    report["ok"] = not report["problems"]
    return report


def run_preflight(
    min_memory_mib: Optional[int],
    allow_without_nvml: bool,
    *,
    env: Optional[Mapping[str, str]] = None,
    ecc_threshold: int = 0,
    nvml=None,
) -> dict:
    """Check the job's GPUs; return the report, or raise GpuPreflightFailed (exit 10) saying why.

    The exception carries the report as `.report`, so a caller can still log or print it.
    """
    report = inspect_gpus(min_memory_mib, env=env, ecc_threshold=ecc_threshold, nvml=nvml)
    if report["skipped"]:
        report["ok"] = allow_without_nvml
        if not allow_without_nvml:
            _fail(
                report,
                f"GPU preflight cannot run: {report['skipped'][len('skipping: ') :]} "
                "(the site profile requires it: preflight.allow_without_nvml is false)",
            )
        return report
    if not report["ok"]:
        shown = report["problems"][:3]
        more = len(report["problems"]) - len(shown)
        _fail(
            report,
            "GPU preflight failed: " + "; ".join(shown) + (f" (and {more} more)" if more else ""),
        )
    return report


def _fail(report: dict, message: str) -> None:
    exc = GpuPreflightFailed(message)
    exc.report = report  # type: ignore[attr-defined]
    raise exc
