#!/usr/bin/env python3
"""The GPU check: everything of mixnn_fast that runs on a CUDA device, in one command
(``bash scripts/gpu_check.sh``) and at most six minutes, on a bare machine with one GPU.

Stages, in order; each runs in its own process with its own time limit, so a hang or a crash
costs that stage alone, and each stage's outcome is written to the JSON as soon as it is known:

    probe    the machine: GPU, driver, torch and CUDA versions, which optional modules exist
    build    CMake + nvcc with this Python, sm_80 + sm_90 machine code and PTX: in place on a
             GPU machine, into build/gpu-check-py<version>/ otherwise (the package's own
             extension, which a development install uses, is left alone)
    device   plain checks of CUDA against the CPU: the mixer on ragged sizes, every dtype and
             layout, grids whose loops wrap; the trusted path (bad indices, no device wait); the
             GMM, exact neighbours, mixing weights, soft targets; a few AMP steps
    train    the Trainer on scikit-learn's digits (in memory, no download, no DALI needed):
             CE, mixup and MixNN with bf16 autocast and with fp16 + grad scaler, and MixNN+ in bf16
             with its weight average taking several snapshots; accuracy, the
             devices and dtypes seen inside the step, finite losses; and one run that counts the
             synchronising CUDA calls per step (torch's sync debug mode), by source line
    timing   the mixer's GB/s against this device's own copy bandwidth, measured in the same run
             (CUDA events, medians); host time per trusted and per validated call.  MixNN's epoch
             against CE's comes from the train stage's metrics rows
    pytest   the suite's CUDA tests (``-m cuda``) when pytest is installed; tests needing DALI,
             hnswlib, faiss or CuPy skip with the module's name (tests/conftest.py)

Without a GPU the check builds (the same CMake call, out of tree), loads the result, says that
there is no GPU and exits 0.  Output: ``$OUT/gpu_check.json`` and ``$OUT/gpu_check.log``, and a
summary table on stdout.  Every check function takes a device, so tests/test_gpu_check.py runs
them on the CPU.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 1

#: Longest time each stage may take (seconds), and the least it is worth starting with.  The
#: driver gives a stage min(its limit, what is left minus the minimum of the stages after it).
STAGE_LIMITS = {"probe": (90, 20), "build": (180, 60), "device": (75, 20), "train": (120, 30),
                "timing": (45, 15), "pytest": (120, 30)}
GPU_STAGES = ("device", "train", "timing", "pytest")
OPTIONAL_MODULES = ("pytest", "hypothesis", "yaml", "cupy", "nvidia.dali", "hnswlib", "faiss", "sklearn", "tqdm",
                    "PIL", "torchvision", "setuptools", "pybind11", "ninja")
OK_STATUSES = ("passed", "skipped")


# =============================================================================================
# small helpers (standard library only: the orchestrator runs before anything is built)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Log:
    """The run's log file, and progress lines on stdout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a", buffering=1)

    def say(self, message: str) -> None:
        line = f"[gpu-check {time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")

    def section(self, title: str) -> None:
        self.file.write(f"\n===== {title} ({now_iso()}) =====\n")
        self.file.flush()


#: seconds a command interrupted at its time limit gets to wrap up (pytest then still writes
#: its report of the tests it finished) before it is killed
GRACE_SECONDS = 10


def _interruptible() -> None:
    """In the child, before it execs: SIGINT back to its default.  A script started as a
    background job (``cmd &`` in a shell without job control) inherits SIGINT ignored, and so
    would every command it runs: the SIGINT at the time limit would then do nothing, and pytest
    would be killed without printing its summary."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_command(cmd: list[str], timeout: float, log: Log, *, env: dict | None = None,
                cwd: Path = ROOT) -> tuple[int | None, float, bool]:
    """Run ``cmd`` with its output appended to the log.  At ``timeout`` its whole process group
    gets SIGINT, and SIGKILL ``GRACE_SECONDS`` later.  Returns (exit code, or None when killed;
    seconds; timed out)."""
    log.file.write("$ " + " ".join(str(c) for c in cmd) + "\n")
    log.file.flush()
    start = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=log.file, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_interruptible)
    try:
        rc = proc.wait(timeout=max(timeout - GRACE_SECONDS, 1))
        return rc, time.monotonic() - start, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        log.file.write(f"!! stopped after {time.monotonic() - start:.0f} s (time limit {timeout:.0f} s)\n")
        return rc, time.monotonic() - start, True


def capture(cmd: list[str], timeout: float = 30) -> str | None:
    """A short command's stdout (None when it cannot run or fails)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def stage_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def overall_status(results: dict) -> str:
    """passed / skipped / failed for a dict of check results (each with a "status")."""
    statuses = [r.get("status") for r in results.values() if isinstance(r, dict)]
    if any(s not in OK_STATUSES for s in statuses):
        return "failed"
    return "passed" if "passed" in statuses else "skipped"


# =============================================================================================
# build


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").is_file():
            return str(Path(candidate) / "bin" / "nvcc")
    return None


def cuda_architectures(library: Path, nvcc: str, build_dir: Path) -> dict:
    """The machine code (sm_XX) and PTX the built library carries: from cuobjdump when the
    toolkit has it, else from the nvcc flags the build used (``arch=compute_90,code=[sm_90]``)."""
    cuobjdump = shutil.which("cuobjdump") or str(Path(nvcc).parent / "cuobjdump")
    elf = capture([cuobjdump, "--list-elf", str(library)])
    if elf is not None:
        ptx = capture([cuobjdump, "--list-ptx", str(library)]) or ""
        return {"source": "cuobjdump", "sass": sorted(set(re.findall(r"sm_\d+", elf))),
                "ptx": sorted(set(re.findall(r"sm_\d+", ptx)))}
    flags = ""
    for name in ("build.ninja", "CMakeFiles/_C.dir/flags.make"):
        if (build_dir / name).is_file():
            flags += (build_dir / name).read_text(errors="replace")
    codes = re.findall(r"arch=compute_(\d+),code=\[?([\w,]+)\]?", flags)
    sass = sorted({c for _, code in codes for c in code.split(",") if c.startswith("sm_")})
    ptx = sorted({f"sm_{arch}" for arch, code in codes if f"compute_{arch}" in code.split(",")})
    return {"source": "nvcc flags (no cuobjdump)", "sass": sass, "ptx": ptx}


def build_extension(log: Log, *, in_place: bool, timeout: float) -> dict:
    """Configure and build ``mixnn_fast._C`` with this Python and nvcc (MIXNN_CUDA=ON: no nvcc
    is a failure, not a CPU-only build).  The same arguments as setup.py's, but a build tree of
    its own, so a development install's tree (build/cmake-py*) is neither reconfigured nor
    rebuilt."""
    start = time.monotonic()
    result: dict[str, Any] = {"in_place": in_place}
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    build_dir = ROOT / "build" / f"gpu-check-py{version}"
    lib_dir = ROOT / "mixnn_fast" if in_place else build_dir / "lib"
    nvcc = find_nvcc()
    cmake = shutil.which("cmake")
    nvcc_version = capture([nvcc, "--version"]) if nvcc else None
    result.update(build_dir=str(build_dir), library_dir=str(lib_dir), nvcc=nvcc, cmake=cmake,
                  nvcc_version=nvcc_version.splitlines()[-1] if nvcc_version else None)
    if cmake is None or nvcc is None:
        return {**result, "status": "failed", "reason": "cmake is not on PATH" if cmake is None else
                "nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): the CUDA kernel cannot be built"}
    pybind11_dir = capture([sys.executable, "-m", "pybind11", "--cmakedir"])
    if pybind11_dir is None:
        return {**result, "status": "failed", "reason": f"{sys.executable} has no pybind11 (python -m pybind11)"}
    build_dir.mkdir(parents=True, exist_ok=True)
    # Two checks at once in one checkout would build into the same tree: the second waits.
    lock = open(build_dir / ".gpu-check.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    configure = [cmake, "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11_dir}",
                 f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}{os.sep}", "-DMIXNN_CUDA=ON",
                 f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
        configure += ["-G", "Ninja"]  # a tree made with another generator keeps it
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
    result["jobs"] = int(jobs)
    rc, seconds, timed_out = run_command(configure, min(90.0, timeout), log)
    result["configure_seconds"] = round(seconds, 1)
    if rc != 0:
        return {**result, "status": "timeout" if timed_out else "failed",
                "reason": "CMake configure " + ("timed out" if timed_out else f"failed (exit {rc}); see the log")}
    remaining = timeout - (time.monotonic() - start)
    rc, seconds, timed_out = run_command([cmake, "--build", build_dir, "--parallel", jobs], remaining, log)
    result["compile_seconds"] = round(seconds, 1)
    if rc != 0:
        return {**result, "status": "timeout" if timed_out else "failed",
                "reason": "the build " + ("timed out" if timed_out else f"failed (exit {rc}); see the log")}
    libraries = sorted(lib_dir.glob("_C.*.so")) or sorted(lib_dir.glob("_C*.so"))
    suffix = f"cpython-{version}"
    libraries = [p for p in libraries if suffix in p.name] or libraries
    if not libraries:
        return {**result, "status": "failed", "reason": f"no _C*.so in {lib_dir} after the build"}
    library = libraries[-1]
    result["library"] = str(library)
    cache = (build_dir / "CMakeCache.txt").read_text(errors="replace")
    generator = re.search(r"^CMAKE_GENERATOR:\w+=(.*)$", cache, re.M)
    result["generator"] = generator.group(1) if generator else None
    result["architectures"] = cuda_architectures(library, nvcc, build_dir)
    has_sm90 = "sm_90" in result["architectures"]["sass"]
    loaded = load_library(library, log)
    result["loaded"] = loaded
    result["seconds"] = round(time.monotonic() - start, 1)
    problems = []
    if not has_sm90:
        problems.append("no sm_90 machine code in the library")
    if not loaded.get("cuda_compiled"):
        problems.append("the library does not load, or was built without the CUDA kernel: "
                        + str(loaded.get("error", "cuda_compiled() is False")))
    if problems:
        return {**result, "status": "failed", "reason": "; ".join(problems)}
    return {**result, "status": "passed"}


LOAD_LIBRARY = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
info = dict(module.build_info())
info["cuda_device_count"] = module.cuda_device_count()
info["cuda_take_index_errors"] = hasattr(module, "cuda_take_index_errors")
print(json.dumps(info, default=str))
"""


def load_library(library: Path, log: Log) -> dict:
    """Load the built library by its path (in a fresh process) and ask what it holds."""
    try:
        done = subprocess.run([sys.executable, "-c", LOAD_LIBRARY, str(library)], capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        return {"error": "loading the library timed out"}
    log.file.write(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# =============================================================================================
# the checks (run inside the stage processes; import torch lazily)


class Skip(Exception):
    """A check that cannot run here, and why."""


class CheckFailed(AssertionError):
    pass


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def run_checks(checks: list[tuple[str, Callable[[], dict | None]]], sink: Callable[[dict], None] | None = None
               ) -> dict:
    """Run each check, recording passed / failed (with the error) / skipped (with the reason)
    and its seconds; ``sink`` gets the results so far after each one (a stage that is killed
    later keeps them)."""
    results: dict[str, dict] = {}
    for name, check in checks:
        start = time.perf_counter()
        try:
            detail = check() or {}
            results[name] = {"status": detail.pop("status", "passed"), **detail}
        except Skip as why:
            results[name] = {"status": "skipped", "reason": str(why)}
        except Exception as exc:  # noqa: BLE001 -- every failure is a result to report
            results[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                             "traceback": traceback.format_exc(limit=8)[-4000:]}
        results[name]["seconds"] = round(time.perf_counter() - start, 3)
        if sink is not None:
            sink(results)
    return results


def _torch():
    import torch

    return torch


def as_device(device):
    torch = _torch()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def synchronize(device) -> None:
    if as_device(device).type == "cuda":
        _torch().cuda.synchronize(device)


def max_error(a, b) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().nan_to_num(nan=float("inf")).max())


def probe_machine() -> dict:
    """Versions and devices, and which optional modules this Python has."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                            "platform": platform.platform(), "hostname": platform.node(), "cpus": os.cpu_count(),
                            "modules": {name: module_present(name) for name in OPTIONAL_MODULES}}
    smi = capture(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                   "--format=csv,noheader"])
    info["nvidia_smi"] = smi.splitlines() if smi else None
    info["tools"] = {"cmake": capture(["cmake", "--version"]), "ninja": capture(["ninja", "--version"]),
                     "nvcc": find_nvcc()}
    if info["tools"]["cmake"]:
        info["tools"]["cmake"] = info["tools"]["cmake"].splitlines()[0]
    try:
        torch = _torch()
    except Exception as exc:  # noqa: BLE001
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
        info["cuda_available"] = False
        return info
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = bool(torch.cuda.is_available())
    if info["cuda_available"]:
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "memory_gib": round(props.total_memory / 2**30, 1),
                          "multiprocessors": props.multi_processor_count,
                          "count": torch.cuda.device_count(),
                          "bf16": bool(torch.cuda.is_bf16_supported()),
                          "cudnn": torch.backends.cudnn.version()}
    return info


# ---- the mixer against the CPU --------------------------------------------------------------

def _mixer_inputs(shape, in_dtype, in_layout, seed: int):
    torch = _torch()
    batch, k, m, h, w, c = shape
    g = torch.Generator().manual_seed(seed)
    nhwc = torch.randint(0, 256, (m, h, w, c), generator=g, dtype=torch.uint8)
    images = nhwc.to(in_dtype)
    if in_layout == "NCHW":
        images = images.permute(0, 3, 1, 2).contiguous()
    anchors = torch.randint(0, m, (batch,), generator=g)
    partners = torch.randint(0, m, (batch, k), generator=g)
    weights = torch.rand(batch, k + 1, generator=g) + 0.05
    weights /= weights.sum(1, keepdim=True)
    return images, anchors, partners, weights


#: absolute tolerance per output dtype, against the float64 reference rounded to that dtype
#: (normalised values lie within about ±3: half an ulp of float16 is 2e-3, of bfloat16 1.6e-2)
MIX_TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3.2e-2, "uint8": 1.0}
MIX_SHAPES = ((1, 0, 1, 1, 1, 1), (37, 3, 50, 7, 13, 3), (5, 1, 9, 33, 17, 4))  # B, K, M, H, W, C
#: grids whose loops wrap: more rows than grid.y's 65535, more pixels than 1024 blocks × 256 threads
MIX_LARGE_SHAPES = ((70000, 1, 100, 1, 1, 1), (2, 2, 4, 600, 601, 3))


def check_mixer(device) -> dict:
    """The mixer on ``device`` against the float64 reference and against the CPU kernel: every
    in/out dtype and layout on ragged shapes (K = 0, 1×1 images, odd sizes), and grids that wrap."""
    torch = _torch()
    from mixnn_fast import mix_images, mix_images_reference

    device = as_device(device)
    dtypes_in = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)
    dtypes_out = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)
    layouts = (("NHWC", "NCHW"), ("NCHW", "NHWC"), ("NHWC", "NHWC"), ("NCHW", "NCHW"))
    cases = [(s, i, o, lay) for s in MIX_SHAPES for i in dtypes_in for o in dtypes_out for lay in layouts]
    cases += [(s, torch.uint8, torch.float32, ("NHWC", "NCHW")) for s in MIX_LARGE_SHAPES]
    worst: dict[str, float] = {}
    failures = []
    for n, (shape, in_dtype, out_dtype, (in_layout, out_layout)) in enumerate(cases):
        images, anchors, partners, weights = _mixer_inputs(shape, in_dtype, in_layout, seed=n)
        channels = shape[5]
        norm = {} if out_dtype == torch.uint8 else dict(mean=[100.0 + 3 * i for i in range(channels)],
                                                        std=[50.0 + i for i in range(channels)])
        kwargs = dict(in_layout=in_layout, out_layout=out_layout, out_dtype=out_dtype, **norm)
        got = mix_images(images.to(device), anchors.to(device), partners.to(device), weights.to(device), **kwargs)
        on_cpu = mix_images(images, anchors, partners, weights, **kwargs)
        reference = mix_images_reference(images, anchors, partners, weights, compute_dtype=torch.float64, **kwargs)
        name = str(out_dtype).replace("torch.", "")
        tol = MIX_TOLERANCE[name]
        got = got.cpu()
        if got.device != torch.device("cpu") or got.shape != reference.shape or got.dtype != out_dtype:
            failures.append(f"{shape} {in_dtype}->{out_dtype} {in_layout}->{out_layout}: shape/dtype")
            continue
        err = max(max_error(got, reference), max_error(got, on_cpu))
        worst[name] = max(worst.get(name, 0.0), err)
        if err > tol:
            failures.append(f"{shape} {in_dtype}->{out_dtype} {in_layout}->{out_layout}: error {err:.3g} > {tol}")
    require(not failures, f"{len(failures)} of {len(cases)} cases off: " + "; ".join(failures[:5]))
    return {"cases": len(cases), "max_error_by_out_dtype": worst}


# ---- the trusted path -----------------------------------------------------------------------

def _trusted_inputs(device, seed: int = 1):
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    m, h, w, c, b, k = 96, 32, 32, 3, 64, 2
    images = torch.randint(0, 256, (m, h, w, c), generator=g, dtype=torch.uint8)
    anchors = torch.randperm(m, generator=g)[:b]
    partners = torch.randint(0, m, (b, k), generator=g)
    weights = torch.rand(b, k + 1, generator=g) + 0.05
    weights /= weights.sum(1, keepdim=True)
    table = torch.softmax(torch.randn(m, 10, generator=g), 1)
    return [t.to(device) for t in (images, anchors, partners, weights, table)]


MEAN, STD = [120.0, 115.0, 100.0], [60.0, 58.0, 57.0]


def check_trusted_path(device) -> dict:
    """mix_batch_images / mix_batch_targets equal the validated mixer; an index outside the
    batch never reads out of bounds (CPU: IndexError at the call; CUDA: the row comes out NaN
    and the error is reported later, without a device wait); on CUDA the calls do not wait for
    the device, and call no synchronising torch operation."""
    torch = _torch()
    from mixnn_fast import mix_images, mix_targets
    from mixnn_fast.mix.trusted import Normalisation, check_index_errors, mix_batch_images, mix_batch_targets

    device = as_device(device)
    images, anchors, partners, weights, table = _trusted_inputs(device)
    norm = Normalisation(3, MEAN, STD)
    got = mix_batch_images(images, anchors, partners, weights, norm)
    want = mix_images(images, anchors, partners, weights, mean=MEAN, std=STD)
    require(got.device == device and torch.equal(got, want), "mix_batch_images differs from mix_images")
    got_t = mix_batch_targets(table, anchors, partners, weights)
    require(torch.equal(got_t, mix_targets(table, anchors, partners, weights)),
            "mix_batch_targets differs from mix_targets")
    bad = partners.clone()
    bad[5, 1] = images.shape[0]  # one past the batch
    detail: dict[str, Any] = {}
    if device.type != "cuda":
        try:
            mix_batch_images(images, anchors, bad, weights, norm)
        except IndexError as exc:
            require("partners[5, 1]" in str(exc), f"the IndexError does not name partners[5, 1]: {exc}")
        else:
            raise CheckFailed("a bad index on the CPU raised nothing")
        detail["bounds"] = "IndexError at the call (host check)"
        detail["no_wait"] = "not applicable on the CPU"
        return detail

    check_index_errors(device)  # start from a clean record
    out = mix_batch_images(images, anchors, bad, weights, norm)  # must not raise: no host check
    synchronize(device)
    others = torch.arange(len(anchors), device=device) != 5
    require(bool(out[5].isnan().all()), "the row with the bad index is not NaN")
    require(torch.equal(out[others], want[others]), "rows without a bad index changed")
    try:
        check_index_errors(device)
    except IndexError as exc:
        require("partners[5, 1]" in str(exc) and "1 row" in str(exc), f"unexpected report: {exc}")
    else:
        raise CheckFailed("check_index_errors did not report the bad row")
    check_index_errors(device)  # reported once
    mix_batch_images(images, anchors, bad, weights, norm)
    synchronize(device)  # the record's copy has landed: the next call reports it
    try:
        mix_batch_images(images, anchors, partners, weights, norm)
    except IndexError as exc:
        require("an earlier call" in str(exc), f"unexpected deferred report: {exc}")
    else:
        raise CheckFailed("the call after a bad one did not report it")
    require(torch.equal(mix_batch_images(images, anchors, partners, weights, norm), want),
            "the call after the report is wrong")
    detail["bounds"] = "row NaN, reported by check_index_errors and by the next call"

    # No wait: tens of milliseconds of queued work, then the trusted calls; the stream must
    # still be busy when they return.  And no synchronising torch call inside them.
    a = torch.randn(4096, 4096, device=device)
    synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    for _ in range(20):
        a = a @ a / 64
    torch.cuda.set_sync_debug_mode("error")
    try:
        start = time.perf_counter()
        mix_batch_images(images, anchors, partners, weights, norm)
        mix_batch_targets(table, anchors, partners, weights)
        host_seconds = time.perf_counter() - start
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    busy = not torch.cuda.current_stream(device).query()
    synchronize(device)
    require(busy, "the queued work had finished when the trusted calls returned: they waited for the device")
    detail["no_wait"] = f"returned with the stream still busy, {host_seconds * 1e6:.0f} µs of host time for both"
    return detail


# ---- refresh pieces ---------------------------------------------------------------------------

def check_gmm(device) -> dict:
    torch = _torch()
    from mixnn_fast import clean_probability

    device = as_device(device)
    g = torch.Generator().manual_seed(2)
    losses = torch.cat([torch.rand(14000, generator=g) * 0.6, 1.2 + torch.rand(6000, generator=g) * 2.0])
    errors = {}
    for dtype, tol in ((torch.float32, 1e-3), (torch.float64, 1e-6)):
        on_cpu = clean_probability(losses, dtype=dtype)
        got = clean_probability(losses.to(device), dtype=dtype)
        require(got.device == device, f"the result is on {got.device}")
        errors[str(dtype)] = max_error(got.cpu(), on_cpu)
        require(errors[str(dtype)] <= tol, f"{dtype}: differs from the CPU by {errors[str(dtype)]:.3g} > {tol}")
    clean = clean_probability(losses.to(device)).cpu()
    require(float(clean[:14000].mean()) > 0.9 and float(clean[14000:].mean()) < 0.1, "the split is wrong")
    return {"max_error": errors}


def check_neighbours(device) -> dict:
    torch = _torch()
    from mixnn_fast import nearest_neighbours

    device = as_device(device)
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(20, 64, generator=g) * 4
    x = centres[torch.randint(0, 20, (3000,), generator=g)] + torch.randn(3000, 64, generator=g)
    agreement = {}
    for metric in ("euclidean", "cosine"):
        ids_cpu, dist_cpu = nearest_neighbours(x, 5, backend="exact", metric=metric, return_distances=True)
        ids, dist = nearest_neighbours(x.to(device), 5, backend="exact", metric=metric, return_distances=True)
        require(ids.device == device and dist.device == device, f"{metric}: results on {ids.device}")
        same = float((ids.cpu() == ids_cpu).double().mean())
        agreement[metric] = same
        require(same >= 0.999, f"{metric}: {same:.4f} of the neighbours agree with the CPU's")
        require(max_error(dist.cpu(), dist_cpu) <= 1e-4 * max(1.0, float(dist_cpu.max())),
                f"{metric}: distances differ from the CPU's")
    return {"agreement": agreement}


def check_weights(device) -> dict:
    torch = _torch()
    from mixnn_fast import mixing_weights

    device = as_device(device)
    g = torch.Generator().manual_seed(4)
    clean = torch.rand(5000, generator=g)
    neighbours = torch.randint(0, 5000, (5000, 3), generator=g)
    errors = {}
    for mode in ("gmm", "avg"):
        on_cpu = mixing_weights(clean, neighbours, mode=mode)
        got = mixing_weights(clean.to(device), neighbours.to(device), mode=mode)
        require(got.device == device, f"{mode}: result on {got.device}")
        errors[mode] = max_error(got.cpu(), on_cpu)
        require(errors[mode] <= 1e-6, f"{mode}: differs from the CPU by {errors[mode]:.3g}")
        require(max_error(got.sum(1).cpu(), torch.ones(5000)) <= 1e-5, f"{mode}: rows do not sum to 1")
    return {"max_error": errors}


def check_soft_targets(device) -> dict:
    torch = _torch()
    from mixnn_fast import SoftTargets, mix_targets_reference

    device = as_device(device)
    g = torch.Generator().manual_seed(5)
    n, classes = 3001, 10
    labels = torch.randint(0, classes, (n,), generator=g)
    probabilities = torch.softmax(torch.randn(n, classes, generator=g) * 3, 1)
    ids = torch.randperm(n, generator=g)
    anchors = torch.randint(0, n, (256,), generator=g)
    partners = torch.randint(0, n, (256, 2), generator=g)
    weights = torch.rand(256, 3, generator=g) + 0.05
    weights /= weights.sum(1, keepdim=True)
    errors = {}
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        on_cpu = SoftTargets(labels, classes, momentum=0.9, start_epoch=0, dtype=dtype)
        on_cpu.update(ids, probabilities[ids], epoch=0)
        store = SoftTargets(labels.to(device), classes, momentum=0.9, start_epoch=0, dtype=dtype)
        require(store.device == device, f"the store is on {store.device}")
        store.update(ids.to(device), probabilities[ids].to(device), epoch=0)
        errors[f"update {dtype}"] = max_error(store.targets.cpu(), on_cpu.targets)
        require(errors[f"update {dtype}"] <= tol, f"{dtype}: the EMA differs from the CPU's")
        mixed = store.mix(anchors.to(device), partners.to(device), weights.to(device))
        require(mixed.device == device, f"mixed targets on {mixed.device}")
        want = mix_targets_reference(on_cpu.targets.float(), anchors, partners, weights)
        errors[f"mix {dtype}"] = max_error(mixed.cpu(), want)
        require(errors[f"mix {dtype}"] <= 1e-5, f"{dtype}: mixed targets differ from the reference")
    return {"max_error": errors}


def check_amp_steps(device, steps: int = 25) -> dict:
    """A few optimiser steps on the device, outside the Trainer: digits on the device, mixed by
    the trusted path (in-batch partners), small_cnn under bf16 autocast, then fp16 with a grad
    scaler.  Independent of the loaders, so AMP is checked even when the Trainer cannot run."""
    torch = _torch()
    import numpy as np
    from sklearn.datasets import load_digits

    from mixnn_fast.mix.trusted import Normalisation, mix_batch_images, mix_batch_targets
    from mixnn_fast.train.losses import one_hot, soft_cross_entropy
    from mixnn_fast.train.models import build_model

    device = as_device(device)
    digits = load_digits()
    images = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]).to(device)
    table = one_hot(torch.from_numpy(digits.target).to(device), 10)
    norm = Normalisation(1, [84.0], [96.0])
    runs = [torch.bfloat16, torch.float16] if device.type == "cuda" else [None]
    out = {}
    for amp in runs:
        torch.manual_seed(0)
        model = build_model("small_cnn", 10, 1).to(device).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        conv_dtypes = set()
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, args, result: conv_dtypes.add(str(result.dtype)))
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(steps):
            ids = torch.randint(0, len(images), (64,), generator=g).to(device)
            partners = ids[torch.randperm(64, generator=g).to(device)][:, None]
            lam = torch.rand(64, 1, generator=g).to(device)
            weights = torch.cat([lam, 1 - lam], 1)
            x = mix_batch_images(images, ids, partners, weights, norm)
            y = mix_batch_targets(table, ids, partners, weights)
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = soft_cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.detach())
        curve = torch.stack(losses).float().cpu()
        name = str(amp or torch.float32).replace("torch.", "")
        require(bool(curve.isfinite().all()), f"{name}: a loss is not finite")
        first, last = float(curve[:5].mean()), float(curve[-5:].mean())
        require(last < first, f"{name}: the loss did not fall ({first:.3f} -> {last:.3f})")
        require(conv_dtypes == {f"torch.{name}"}, f"{name}: the first convolution ran in {conv_dtypes}")
        out[name] = {"loss_first": round(first, 4), "loss_last": round(last, 4),
                     "scaler": scaler.is_enabled() and float(scaler.get_scale())}
    return out


def check_cupy(device) -> dict:
    """CuPy arrays through DLPack into the CUDA mixer, without a copy."""
    if as_device(device).type != "cuda":
        raise Skip("CuPy is for CUDA devices")
    if not module_present("cupy"):
        raise Skip("cupy is not installed")
    import cupy

    torch = _torch()
    from mixnn_fast import mix_images

    images, anchors, partners, weights, _ = _trusted_inputs("cpu")
    want = mix_images(images, anchors, partners, weights, mean=MEAN, std=STD)
    got = mix_images(cupy.asarray(images.numpy()), cupy.asarray(anchors.numpy()), cupy.asarray(partners.numpy()),
                     cupy.asarray(weights.numpy()), mean=MEAN, std=STD)
    require(got.is_cuda, "the result is not on the GPU")
    require(max_error(got.cpu(), want) <= 1e-4, "differs from the CPU")
    return {"cupy": cupy.__version__, "torch": torch.__version__}


def device_checks(device, *, amp_steps: int = 25) -> list[tuple[str, Callable[[], dict | None]]]:
    return [("mixer", lambda: check_mixer(device)),
            ("trusted_path", lambda: check_trusted_path(device)),
            ("gmm", lambda: check_gmm(device)),
            ("neighbours_exact", lambda: check_neighbours(device)),
            ("weights", lambda: check_weights(device)),
            ("soft_targets", lambda: check_soft_targets(device)),
            ("amp_steps", lambda: check_amp_steps(device, amp_steps)),
            ("cupy_dlpack", lambda: check_cupy(device))]


# ---- training -------------------------------------------------------------------------------

TRAIN_RUNS = (("ce", "bfloat16"), ("mixup", "bfloat16"), ("mixnn", "bfloat16"),
              ("ce", "float16"), ("mixup", "float16"), ("mixnn", "float16"), ("mixnn_plus", "bfloat16"))
#: final test accuracy a run must reach on digits (10 classes: chance is 0.1), with 20% noise
ACCURACY_FLOOR = 0.6


def yaml_stand_in() -> str | None:
    """PyYAML is missing on the GPU machine, and the training package imports it to read and
    write config.yaml.  Nothing the check runs reads YAML back, so a stand-in that writes JSON
    (which is YAML) lets the Trainer run; the JSON says when it was used."""
    if module_present("yaml"):
        return None
    stand_in = types.ModuleType("yaml")

    class YAMLError(Exception):
        pass

    def safe_dump(data, stream=None, sort_keys=True, **_ignored):
        text = json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n"
        if stream is None:
            return text
        stream.write(text)
        return None

    def safe_load(stream):
        text = stream.read() if hasattr(stream, "read") else stream
        try:
            return json.loads(text) if text.strip() else None
        except ValueError as exc:
            raise YAMLError(f"the check's YAML stand-in reads JSON only: {exc}") from None

    stand_in.YAMLError, stand_in.safe_dump, stand_in.safe_load = YAMLError, safe_dump, safe_load
    sys.modules["yaml"] = stand_in
    return "yaml: PyYAML is not installed; config.yaml was written as JSON by the check's stand-in"


class Observed:
    """What the step saw: devices and dtypes of the model's input, its first convolution's
    output, the loss's inputs; the losses themselves (checked once at the end, no per-step wait)."""

    def __init__(self) -> None:
        self.model_inputs: set[str] = set()
        self.conv_outputs: set[str] = set()
        self.loss_inputs: set[str] = set()
        self.mixed: set[str] = set()
        self.losses: list = []
        self.steps = 0

    def report(self) -> dict:
        return {"model_input": sorted(self.model_inputs), "first_conv_output": sorted(self.conv_outputs),
                "loss_inputs": sorted(self.loss_inputs), "mixed_batch_and_targets_made_on": sorted(self.mixed),
                "steps": self.steps}


def watch(trainer, seen: Observed) -> None:
    torch = _torch()
    model = trainer.model

    def pre_hook(module, args):
        if module.training:
            seen.model_inputs.add(f"{args[0].device.type} {str(args[0].dtype).replace('torch.', '')}")

    def conv_hook(module, args, result):
        if module.training:
            seen.conv_outputs.add(f"{result.device.type} {str(result.dtype).replace('torch.', '')}")

    model.register_forward_pre_hook(pre_hook)
    next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(conv_hook)
    loss_function = trainer.loss_function

    def watched_loss(logits, targets):
        loss = loss_function(logits, targets)
        seen.loss_inputs.add(f"logits {logits.device.type}, targets {targets.device.type}")
        seen.losses.append(loss.detach())
        seen.steps += 1
        return loss

    trainer.loss_function = watched_loss
    inputs = getattr(trainer, "_inputs", None)
    if inputs is not None:  # where the trainer mixes: the devices the batch and targets come out on
        def watched_inputs(batch, phase):
            x, y = inputs(batch, phase)
            seen.mixed.add(f"{phase}: images {x.device.type}, targets {y.device.type}")
            return x, y

        trainer._inputs = watched_inputs


EPOCH_KEYS = ("epoch", "phase", "train_loss", "test_accuracy", "train_seconds", "loader_wait_seconds",
              "mix_seconds", "step_seconds", "refresh_seconds", "refresh_forward_seconds", "refresh_gmm_seconds",
              "refresh_neighbour_seconds", "images_per_second", "loader_wait_fraction")


def train_run(method: str, amp_dtype: str, device, root: Path, *, epochs: int = 6,
              accuracy_floor: float = ACCURACY_FLOOR, count_syncs: bool = False) -> dict:
    """One Trainer run on digits; raises CheckFailed naming what went wrong."""
    torch = _torch()
    yaml_stand_in()
    from mixnn_fast.mix.trusted import check_index_errors
    from mixnn_fast.train.config import TrainConfig
    from mixnn_fast.train.trainer import Trainer

    device = as_device(device)
    # MixNN+ restarts every third of the run and averages over most of it, so that its weight
    # average takes at least two snapshots: the second is the first real averaging step (which
    # crashed on CUDA once, 2026-12-04, while the CPU path worked)
    plus = dict(restart_period=max(1, epochs // 3), plus_average_last=0.9) if method == "mixnn_plus" \
        else dict(restart_period=epochs)
    cfg = TrainConfig(dataset="digits", method=method, device=str(device), amp=True, amp_dtype=amp_dtype,
                      epochs=epochs, warmup_epochs=max(1, epochs // 3), correction_start=max(1, 2 * epochs // 3),
                      noise="symmetric_uniform", noise_rate=0.2, neighbour_backend="exact", batch_size=64, lr=0.05,
                      checkpoint_every=epochs, progress=False, tensorboard=False, seed=0,
                      out_dir=str(root / f"{method}-{amp_dtype}{'-syncs' if count_syncs else ''}"), **plus)
    trainer = Trainer(cfg, overwrite=True)
    seen = Observed()
    watch(trainer, seen)
    syncs = None
    if count_syncs and device.type == "cuda":
        syncs = count_synchronisations(trainer.fit)
    else:
        trainer.fit()
    rows = [{k: r.get(k) for k in EPOCH_KEYS if k in r} for r in trainer.metrics.rows]
    result: dict[str, Any] = {"epochs": rows, "observed": seen.report(),
                              "autocast_dtype": str(trainer.autocast_dtype).replace("torch.", ""),
                              "scaler_enabled": trainer.scaler.is_enabled(),
                              "loader_backend": getattr(trainer.loaders.plain, "backend", None)}
    if syncs is not None:
        result["synchronisations"] = {**syncs, "per_step": round(syncs["total"] / max(seen.steps, 1), 2)}
    # Where the rest of the run's state lives (reported, not required: the soft-target table may
    # sit on the host by design, its (B, C) rows being tiny)
    refreshed = trainer.last_refresh
    result["state_devices"] = {
        "soft_targets": str(getattr(trainer.targets, "device", None)),
        **({"refresh_features": str(refreshed.features.device), "refresh_clean_prob": str(refreshed.clean_prob.device)}
           if refreshed is not None else {})}
    final = rows[-1].get("test_accuracy") if rows else None
    result["test_accuracy"] = final
    problems = []
    params = {p.device.type for p in trainer.model.parameters()}
    if params != {device.type}:
        problems.append(f"parameters on {params}")
    if seen.steps == 0:
        problems.append("no step seen")
    if any(not s.startswith(device.type + " ") for s in seen.model_inputs):
        problems.append(f"model input {seen.model_inputs}")
    if any(s != f"logits {device.type}, targets {device.type}" for s in seen.loss_inputs):
        problems.append(f"loss inputs {seen.loss_inputs}")
    if any(f"images {device.type}" not in s for s in seen.mixed):
        problems.append(f"the mixed batch was made on the CPU and copied: {seen.mixed}")
    on_gpu = device.type == "cuda"
    amp = {"bfloat16": "bfloat16", "float16": "float16"}[amp_dtype] if on_gpu else "float32"
    if seen.conv_outputs != {f"{device.type} {amp}"}:
        problems.append(f"the first convolution ran in {seen.conv_outputs}, expected {device.type} {amp}")
    if trainer.scaler.is_enabled() != (on_gpu and amp_dtype == "float16"):
        problems.append(f"grad scaler enabled={trainer.scaler.is_enabled()}")
    if seen.losses and not bool(torch.stack(seen.losses).isfinite().all()):
        problems.append("a step's loss is not finite")
    if final is None or not final >= accuracy_floor:
        problems.append(f"test accuracy {final} < {accuracy_floor}")
    if method == "mixnn_plus":
        average = trainer.averaged
        result["weights_averaged"] = int(average.n_averaged) if average is not None else 0
        if result["weights_averaged"] < 2:
            problems.append(f"the weight average took {result['weights_averaged']} snapshot(s), expected at least 2")
        if average is not None and {p.device.type for p in average.module.parameters()} != {device.type}:
            problems.append("the weight average is not on the run's device")
    try:
        check_index_errors(device)
    except IndexError as exc:
        problems.append(str(exc))
    if problems:
        result["status"] = "failed"
        result["error"] = "; ".join(problems)
    return result


def count_synchronisations(function: Callable[[], Any]) -> dict:
    """Run ``function`` with torch's CUDA sync debug mode on "warn" and count the synchronising
    calls it made, by the source line that made them (only torch's own: a native extension's
    waits are not seen, which is what the trusted path's check measures)."""
    torch = _torch()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return group_synchronisations(caught)


def group_synchronisations(caught: list) -> dict:
    """torch's "called a synchronizing CUDA operation" warnings, counted by the line that made
    them (the Python line that called into torch)."""
    by_line: dict[str, int] = {}
    for w in caught:
        if "synchronizing CUDA operation" not in str(w.message):
            continue
        where = f"{Path(w.filename).name}:{w.lineno}"
        by_line[where] = by_line.get(where, 0) + 1
    return {"total": sum(by_line.values()), "by_line": dict(sorted(by_line.items(), key=lambda kv: -kv[1])[:15])}


def train_checks(device, root: Path, *, epochs: int = 6, accuracy_floor: float = ACCURACY_FLOOR,
                 runs=TRAIN_RUNS) -> list[tuple[str, Callable[[], dict | None]]]:
    def blocked_by_modules():
        missing = [m for m in ("sklearn",) if not module_present(m)]
        if missing:
            raise Skip(f"{', '.join(missing)} is not installed")

    checks = []
    for method, amp in runs:
        def run(method=method, amp=amp):
            blocked_by_modules()
            return train_run(method, amp, device, root, epochs=epochs, accuracy_floor=accuracy_floor)
        checks.append((f"{method}.{amp}", run))
    if as_device(device).type == "cuda":
        def syncs():
            blocked_by_modules()
            result = train_run("mixnn", "bfloat16", device, root, epochs=3, accuracy_floor=0.0, count_syncs=True)
            return {k: result[k] for k in ("synchronisations", "status", "error") if k in result}
        checks.append(("synchronisations", syncs))
    return checks


def epoch_comparison(train: dict) -> dict | None:
    """MixNN's epoch against CE's, same precision: medians over the epochs after the first of
    each phase (the first pays for autotuning and allocation)."""
    out = {}
    for amp in ("bfloat16", "float16"):
        ce = train.get(f"ce.{amp}", {}).get("epochs") or []
        mixnn = train.get(f"mixnn.{amp}", {}).get("epochs") or []
        ce_times = [r["train_seconds"] for r in ce[1:] if r.get("train_seconds")]
        mixnn_rows = [r for r in mixnn if r.get("phase") == "mixnn"][1:]
        if not ce_times or not mixnn_rows:
            continue
        train_s = statistics.median(r["train_seconds"] for r in mixnn_rows)
        refresh_s = statistics.median((r.get("refresh_seconds") or 0.0) for r in mixnn_rows)
        ce_s = statistics.median(ce_times)
        out[amp] = {"ce_epoch_seconds": round(ce_s, 4), "mixnn_train_seconds": round(train_s, 4),
                    "mixnn_refresh_seconds": round(refresh_s, 4),
                    "mixnn_over_ce": round((train_s + refresh_s) / ce_s, 3) if ce_s else None,
                    "mixnn_loader_wait_fraction": statistics.median(r.get("loader_wait_fraction") or 0.0
                                                                    for r in mixnn_rows),
                    "mixnn_mix_seconds": statistics.median(r.get("mix_seconds") or 0.0 for r in mixnn_rows),
                    "mixnn_step_seconds": statistics.median(r.get("step_seconds") or 0.0 for r in mixnn_rows)}
    return out or None


# ---- timing ---------------------------------------------------------------------------------

def median_seconds(function: Callable[[], Any], device, reps: int, warmup: int = 3) -> float:
    """Median time of ``function``: CUDA events on a GPU (device time), perf_counter otherwise."""
    torch = _torch()
    device = as_device(device)
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    if device.type == "cuda":
        pairs = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            pairs.append((start, end))
        synchronize(device)
        times = [s.elapsed_time(e) / 1000.0 for s, e in pairs]
    else:
        for _ in range(reps):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing(device, *, quick: bool = False) -> dict:
    """The mixer's bandwidth against a plain device copy, and host time per call."""
    torch = _torch()
    from mixnn_fast import mix_images, mix_images_reference
    from mixnn_fast.mix.trusted import Normalisation, mix_batch_images

    device = as_device(device)
    batch, side = (8, 32) if quick else (256, 224)
    reps = 5 if quick else 20
    norm = Normalisation(3, MEAN, STD)
    cases = {}
    copy_gbps = None
    for label, k, out_dtype in (("uint8 NHWC -> float32 NCHW, K=1", 1, torch.float32),
                                ("uint8 NHWC -> bfloat16 NCHW, K=1", 1, torch.bfloat16),
                                ("uint8 NHWC -> float32 NCHW, K=3", 3, torch.float32)):
        m = batch * (k + 1)  # a coherent plan: each term decoded once
        images = torch.randint(0, 256, (m, side, side, 3), dtype=torch.uint8, device=device)
        anchors = torch.arange(batch, device=device) * (k + 1)
        partners = anchors[:, None] + torch.arange(1, k + 1, device=device)
        weights = torch.full((batch, k + 1), 1.0 / (k + 1), device=device)
        out = torch.empty((batch, 3, side, side), dtype=out_dtype, device=device)
        seconds = median_seconds(lambda: mix_batch_images(images, anchors, partners, weights, norm, out=out),
                                 device, reps)
        moved = images.numel() + out.numel() * out.element_size()  # each term read once, the output written once
        case = {"seconds": seconds, "bytes": moved, "gb_per_s": round(moved / seconds / 1e9, 1)}
        if copy_gbps is None:  # a same-size copy, in the same run: what this device's memory does
            src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            copy_seconds = median_seconds(lambda: dst.copy_(src), device, reps)
            copy_gbps = round(2 * src.numel() / copy_seconds / 1e9, 1)
            plain = median_seconds(lambda: mix_images_reference(images, anchors, partners, weights, mean=MEAN, std=STD,
                                                                compute_dtype=torch.float32), device, max(3, reps // 4))
            case["plain_torch_seconds"] = plain
            case["speedup_over_plain_torch"] = round(plain / seconds, 2)
            del src, dst
        case["fraction_of_copy"] = round(case["gb_per_s"] / copy_gbps, 3) if copy_gbps else None
        cases[label] = case
    # Host time per call on a small batch: the trusted path only queues the kernel; the validated
    # one reads indices and weights first (on CUDA that waits for the device, every call).
    images, anchors, partners, weights, _ = _trusted_inputs(device)
    calls = 20 if quick else 200
    per_call = {}
    for name, call in (("trusted", lambda: mix_batch_images(images, anchors, partners, weights, norm)),
                       ("validated", lambda: mix_images(images, anchors, partners, weights, mean=MEAN, std=STD))):
        call()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        host = time.perf_counter() - start
        synchronize(device)
        per_call[name] = round(host / calls * 1e6, 1)
    return {"copy_gb_per_s": copy_gbps, "mixer": cases, "host_us_per_call": per_call,
            "shape": {"batch": batch, "side": side, "channels": 3}}


# =============================================================================================
# the stages (each in its own process; ``--stage NAME``)

#: What each stage does: "full" on a GPU; "quick" for a rehearsal of the GPU mode on the CPU
#: (``--rehearse``, tests/test_gpu_check.py), small enough for a 2-core machine.
PROFILES = {
    "full": dict(train_runs=TRAIN_RUNS, epochs=6, accuracy_floor=ACCURACY_FLOOR, amp_steps=25, timing_quick=False),
    "quick": dict(train_runs=(("mixnn", "bfloat16"), ("mixnn_plus", "bfloat16")), epochs=2, accuracy_floor=0.0, amp_steps=6, timing_quick=True),
}


def stage_main(name: str, device: str, work: Path, profile: str = "full") -> int:
    settings = PROFILES[profile]
    fragment = work / "stages" / f"{name}.json"
    fragment.parent.mkdir(parents=True, exist_ok=True)

    def sink(checks: dict) -> None:
        write_json(fragment, {"status": overall_status(checks), "checks": checks})

    if name == "probe":
        write_json(fragment, {"status": "passed", **probe_machine()})
        return 0
    if name == "device":
        checks = run_checks(device_checks(device, amp_steps=settings["amp_steps"]), sink)
    elif name == "train":
        stand_in = yaml_stand_in()
        root = work / "train-runs"
        checks = run_checks(train_checks(device, root, epochs=settings["epochs"],
                                         accuracy_floor=settings["accuracy_floor"], runs=settings["train_runs"]), sink)
        result = {"status": overall_status(checks), "checks": checks,
                  "epoch_comparison": epoch_comparison(checks)}
        if stand_in:
            result["stand_ins"] = [stand_in]
        write_json(fragment, result)
        shutil.rmtree(root, ignore_errors=True)
        return 0
    elif name == "timing":
        checks = run_checks([("mixer_bandwidth", lambda: timing(device, quick=settings["timing_quick"]))], sink)
    else:
        raise SystemExit(f"unknown stage {name!r}")
    sink(checks)
    return 0


# =============================================================================================
# the orchestrator


class Budget:
    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.start = time.monotonic()

    def left(self) -> float:
        return self.total - (time.monotonic() - self.start)

    def for_stage(self, name: str, later: tuple[str, ...]) -> float:
        limit, _ = STAGE_LIMITS[name]
        reserve = sum(STAGE_LIMITS[s][1] for s in later)
        return min(limit, self.left() - reserve)


def run_stage_process(name: str, device: str, work: Path, timeout: float, log: Log, profile: str = "full") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--device", device, "--work", str(work),
           "--profile", profile]
    rc, seconds, timed_out = run_command(cmd, timeout, log, env=stage_env())
    fragment = work / "stages" / f"{name}.json"
    result = json.loads(fragment.read_text()) if fragment.exists() else {}
    if timed_out:
        result.update(status="timeout", reason=f"stopped after {timeout:.0f} s (the results before are kept)")
    elif rc != 0:
        result.update(status="crashed", reason=f"exit code {rc}: see gpu_check.log", log_tail=log_tail(log.path))
    elif not result:
        result = {"status": "crashed", "reason": "the stage wrote no result"}
    result["seconds"] = round(seconds, 1)
    return result


def log_tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace")
    return text[-chars:]


def run_pytest(work: Path, timeout: float, log: Log, modules: dict) -> dict:
    if not modules.get("pytest"):
        return {"status": "skipped", "reason": "pytest is not installed on this machine; the device stage covers "
                                               "the CUDA paths"}
    junit = work / "pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q", "-rs",
           f"--junitxml={junit}", "tests"]
    rc, seconds, timed_out = run_command(cmd, timeout, log, env=stage_env())
    result: dict[str, Any] = {"exit_code": rc, "seconds": round(seconds, 1)}
    if junit.exists():
        result.update(summarise_junit(junit))
    if timed_out:
        result.update(status="timeout", reason=f"stopped after {timeout:.0f} s")
    elif not junit.exists():
        result.update(status="failed", reason=f"pytest exited {rc} without a report; see gpu_check.log")
    elif result["failures"] or result["errors"] or rc not in (0, 5):
        result["status"] = "failed"
    elif result["tests"] > result["skipped"]:
        result["status"] = "passed"
    else:
        result.update(status="skipped", reason="every CUDA test skipped")
    return result


def summarise_junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    reasons: dict[str, int] = {}
    failed = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        for child in case:
            if child.tag == "skipped":
                counts["skipped"] += 1
                reason = (child.get("message") or "").strip()
                # a module skipped whole is reported as "collection skipped"; its reason is in the text
                found = re.search(r"Skipped: (.*?)[\"']\)\s*$", child.text or "", re.S)
                if found:
                    reason = found.group(1).strip()
                reasons[reason] = reasons.get(reason, 0) + 1
            elif child.tag in ("failure", "error"):
                counts["failures" if child.tag == "failure" else "errors"] += 1
                failed.append(f"{name}: {(child.get('message') or '')[:300]}")
    counts["passed"] = counts["tests"] - counts["skipped"] - counts["failures"] - counts["errors"]
    return {**counts, "skip_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            "failed_tests": failed[:30]}


def orchestrate(out: Path, budget_seconds: float, *, force_no_gpu: bool = False, rehearse: bool = False) -> int:
    """The whole check.  ``force_no_gpu``: the no-GPU mode even where there is a GPU (the build
    check alone).  ``rehearse``: the GPU mode's stages on the CPU with the quick profile and an
    out-of-tree build, to find mistakes in this driver before a GPU session does."""
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    budget = Budget(budget_seconds)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    report: dict[str, Any] = {"schema": SCHEMA, "started": now_iso(), "budget_seconds": budget_seconds,
                              "repository": str(ROOT), "git": capture(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
                              "stages": {}}
    json_path = out / "gpu_check.json"

    def record(name: str, result: dict) -> None:
        report["stages"][name] = result
        report["seconds"] = round(budget.total - budget.left(), 1)
        write_json(json_path, report)
        log.say(f"{name}: {result.get('status')}" + (f" ({result.get('reason') or result.get('error')})"
                                                      if result.get("status") not in OK_STATUSES else ""))

    try:
        log.section("probe")
        log.say(f"probing the machine with {sys.executable}")
        probe = run_stage_process("probe", "cpu", work, budget.for_stage("probe", ("build",)), log)
        report["machine"] = {k: v for k, v in probe.items() if k not in ("status", "seconds")}
        record("probe", {"status": probe.get("status"), "seconds": probe.get("seconds"),
                         **({"reason": probe["reason"]} if "reason" in probe else {})})
        gpu = bool(probe.get("cuda_available")) and not force_no_gpu
        report["mode"] = "rehearsal" if rehearse else "gpu" if gpu else "no-gpu"
        if not gpu and not rehearse:
            why = ("--no-gpu was given" if force_no_gpu and probe.get("cuda_available") else
                   probe.get("torch_error") or (f"the probe failed: {probe.get('reason')}"
                                                if probe.get("status") != "passed" else "torch sees no CUDA device"))
            report["no_gpu_reason"] = why
            log.say(f"no GPU here ({why}): checking that the extension would build, then stopping")
        if rehearse:
            log.say("rehearsal: the GPU mode's stages on the CPU (quick profile, out-of-tree build)")

        log.section("build")
        timeout = budget.for_stage("build", GPU_STAGES if gpu or rehearse else ())
        log.say(f"building the extension (CMake + nvcc, {os.cpu_count()} cores, limit {timeout:.0f} s)")
        record("build", build_extension(log, in_place=gpu and not rehearse, timeout=timeout))
        built = report["stages"]["build"]["status"] == "passed"

        if gpu or rehearse:
            device, profile = ("cpu", "quick") if rehearse else ("cuda", "full")
            for i, name in enumerate(GPU_STAGES):
                later = GPU_STAGES[i + 1:]
                timeout = budget.for_stage(name, later)
                log.section(name)
                if not built:
                    record(name, {"status": "blocked", "reason": "the extension did not build"})
                    continue
                if timeout < STAGE_LIMITS[name][1] / 2:
                    record(name, {"status": "skipped", "reason": f"no time left ({timeout:.0f} s)"})
                    continue
                log.say(f"stage {name} (limit {timeout:.0f} s)")
                if name == "pytest":
                    record(name, run_pytest(work, timeout, log, report["machine"].get("modules", {})))
                else:
                    record(name, run_stage_process(name, device, work, timeout, log, profile))
            train = report["stages"].get("train", {}).get("checks") or {}
            report["epoch_comparison"] = report["stages"].get("train", {}).get("epoch_comparison")
            if train.get("synchronisations"):
                report["synchronisations"] = train["synchronisations"].get("synchronisations")
    finally:
        statuses = {name: s.get("status") for name, s in report["stages"].items()}
        report["ok"] = all(s in OK_STATUSES for s in statuses.values())
        report["finished"] = now_iso()
        report["seconds"] = round(budget.total - budget.left(), 1)
        write_json(json_path, report)
        shutil.rmtree(work, ignore_errors=True)
    summary = summary_table(report)
    log.file.write("\n" + summary + "\n")
    print("\n" + summary, flush=True)
    print(f"\n[gpu-check] {json_path}\n[gpu-check] {log.path}", flush=True)
    return 0 if report["ok"] else 1


# ---- the summary table ------------------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def stage_lines(name: str, stage: dict) -> list[tuple[str, str, str, str]]:
    """(name, status, seconds, detail) rows for one stage and its checks."""
    seconds = _fmt(stage.get("seconds", ""), 3)
    status = stage.get("status", "?")
    detail = stage.get("reason") or stage.get("error") or ""
    rows = []
    if name == "build" and status == "passed":
        arch = stage.get("architectures", {})
        detail = (f"sass {','.join(arch.get('sass') or []) or '?'} ptx {','.join(arch.get('ptx') or []) or '?'}; "
                  f"configure {stage.get('configure_seconds')} s + compile {stage.get('compile_seconds')} s "
                  f"on {stage.get('jobs')} jobs")
    if stage.get("stand_ins"):
        detail = "; ".join([detail] * bool(detail) + stage["stand_ins"])
    if name == "pytest" and "tests" in stage:
        skipped = ", ".join(f"{n}: {r[:60]}" for r, n in list(stage.get("skip_reasons", {}).items())[:3])
        detail = (f"{stage['passed']} passed, {stage['failures']} failed, {stage['errors']} errors, "
                  f"{stage['skipped']} skipped" + (f" ({skipped})" if skipped else "")) + \
            (f"; {detail}" if detail else "")
    rows.append((name, status, seconds, detail))
    for check, result in (stage.get("checks") or {}).items():
        rows.append((f"  {check}", result.get("status", "?"), _fmt(result.get("seconds", ""), 3),
                     check_detail(name, check, result)))
    return rows


def check_detail(stage: str, check: str, result: dict) -> str:
    if result.get("status") == "failed":
        return (result.get("error") or "")[:160]
    if result.get("status") == "skipped":
        return result.get("reason", "")
    if stage == "train" and check != "synchronisations":
        observed = result.get("observed", {})
        return (f"acc {_fmt(result.get('test_accuracy'))}, {observed.get('steps')} steps, input "
                f"{','.join(observed.get('model_input', []))}, conv {','.join(observed.get('first_conv_output', []))}"
                f", loader {result.get('loader_backend')}")
    if check == "synchronisations":
        syncs = result.get("synchronisations") or {}
        top = ", ".join(f"{k} x{v}" for k, v in list(syncs.get("by_line", {}).items())[:3])
        return f"{syncs.get('per_step')} per step ({top})"
    if check == "mixer_bandwidth":
        first = next(iter(result.get("mixer", {}).items()), (None, {}))
        return (f"{first[0]}: {first[1].get('gb_per_s')} GB/s = {first[1].get('fraction_of_copy')} of copy "
                f"({result.get('copy_gb_per_s')} GB/s); host µs/call {result.get('host_us_per_call')}")
    if check == "mixer":
        return f"{result.get('cases')} cases, max error {result.get('max_error_by_out_dtype')}"
    keys = [k for k in result if k not in ("status", "seconds")]
    return "; ".join(f"{k} {result[k]}" for k in keys)[:160]


def summary_table(report: dict) -> str:
    machine = report.get("machine", {})
    torch_version = machine.get("torch") or machine.get("torch_error")
    if report.get("mode") == "rehearsal":
        head = (f"GPU check, rehearsed on the CPU (the GPU mode's stages, quick profile): python "
                f"{machine.get('python')}, torch {torch_version}")
    elif report.get("mode") == "gpu":
        dev = machine.get("device") or {}
        smi = machine.get("nvidia_smi") or []
        driver = smi[0].split(",")[1].strip() if smi and smi[0].count(",") >= 1 else "?"
        head = (f"GPU check: {dev.get('name')} (compute capability {dev.get('capability')}), python "
                f"{machine.get('python')}, torch {torch_version}, CUDA {machine.get('torch_cuda')}, driver {driver}")
    else:
        head = (f"GPU check: no GPU ({report.get('no_gpu_reason', '?')}); python {machine.get('python')}, "
                f"torch {torch_version}")
    rows = [("stage", "status", "seconds", "detail")]
    for name, stage in report.get("stages", {}).items():
        rows += stage_lines(name, stage)
    comparison = report.get("epoch_comparison") or {}
    for amp, c in comparison.items():
        rows.append((f"epoch mixnn/ce {amp}", "-", "", f"{c['mixnn_over_ce']}x (ce {c['ce_epoch_seconds']} s; mixnn "
                     f"train {c['mixnn_train_seconds']} s + refresh {c['mixnn_refresh_seconds']} s; loader wait "
                     f"{_fmt(c['mixnn_loader_wait_fraction'])})"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [head, ""]
    for r in rows:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
    verdict = "no GPU: the extension builds" if report.get("mode") == "no-gpu" and report.get("ok") else \
        ("all passed" if report.get("ok") else "FAILED: see the stages above")
    lines += ["", f"{verdict}; {report.get('seconds')} s of a {report.get('budget_seconds')} s budget"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-check-out")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for the whole check")
    parser.add_argument("--no-gpu", action="store_true", help="check the build only, even on a GPU machine")
    parser.add_argument("--rehearse", action="store_true",
                        help="run the GPU mode's stages on the CPU, quickly (finds mistakes in this driver)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile", default="full", choices=sorted(PROFILES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return stage_main(args.stage, args.device, args.work, args.profile)
    return orchestrate(args.out.resolve(), args.budget, force_no_gpu=args.no_gpu, rehearse=args.rehearse)


if __name__ == "__main__":
    sys.exit(main())
