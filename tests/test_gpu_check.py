"""scripts/gpu_check.sh and its driver, on a machine without a GPU: the no-GPU mode (the build
check), a rehearsal of the GPU mode's stages on the CPU, and the driver's pieces one by one.  A
GPU session is short and rare: a mistake in the driver must show up here, not there."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_driver()


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, **extra)
    env.pop("GPU_CHECK_BUDGET", None)
    return env


# ---------------------------------------------------------------------------------------------
# the whole command


@pytest.mark.slow  # the first run builds the extension from scratch (about a minute on 2 cores)
def test_without_a_gpu_it_checks_the_build_and_exits_0(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--no-gpu"], cwd=ROOT,
                          env=_env(OUT=str(tmp_path)), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no GPU" in done.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "no-gpu" and report["ok"] and report["no_gpu_reason"]
    build = report["stages"]["build"]
    assert build["status"] == "passed" and not build["in_place"]
    assert "sm_90" in build["architectures"]["sass"] and "sm_90" in build["architectures"]["ptx"]
    assert build["loaded"]["cuda_compiled"] and build["loaded"]["cuda_take_index_errors"]
    assert set(report["stages"]) == {"probe", "build"}
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log"]


@pytest.mark.slow
def test_a_rehearsal_runs_every_gpu_stage_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--rehearse", "--out",
                           str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["probe", "build", "device", "train", "timing", "pytest"]
    failed = {name: stage for name, stage in stages.items() if stage["status"] not in ("passed", "skipped")}
    assert not failed and report["ok"] and done.returncode == 0, json.dumps(failed, indent=1)[-4000:]
    assert set(stages["device"]["checks"]) == {"mixer", "trusted_path", "gmm", "neighbours_exact", "weights",
                                               "soft_targets", "amp_steps", "cupy_dlpack"}
    run = stages["train"]["checks"]["mixnn.bfloat16"]
    assert run["status"] == "passed" and run["observed"]["steps"] > 0
    assert {r["phase"] for r in run["epochs"]} == {"plain", "mixnn"}
    plus = stages["train"]["checks"]["mixnn_plus.bfloat16"]
    assert plus["status"] == "passed" and plus["weights_averaged"] >= 2
    assert stages["timing"]["checks"]["mixer_bandwidth"]["copy_gb_per_s"] > 0
    assert "GPU check, rehearsed on the CPU" in done.stdout and "mixer_bandwidth" in done.stdout


# ---------------------------------------------------------------------------------------------
# the checks themselves, on the CPU


@pytest.mark.parametrize("name", ["trusted_path", "gmm", "neighbours_exact", "weights", "soft_targets",
                                  "cupy_dlpack"])
def test_device_checks_run_on_the_cpu(name):
    checks = dict(gpu_check.device_checks("cpu"))
    result = gpu_check.run_checks([(name, checks[name])])[name]
    assert result["status"] == ("skipped" if name == "cupy_dlpack" else "passed"), result


def test_a_failing_check_is_recorded_and_the_next_one_still_runs():
    def broken():
        raise gpu_check.CheckFailed("wrong numbers")

    def missing():
        raise gpu_check.Skip("no such module")

    seen = []
    results = gpu_check.run_checks([("broken", broken), ("missing", missing), ("fine", lambda: {"value": 3})],
                                   sink=lambda r: seen.append(list(r)))
    assert results["broken"]["status"] == "failed" and "wrong numbers" in results["broken"]["error"]
    assert results["missing"]["status"] == "skipped" and results["missing"]["reason"] == "no such module"
    assert results["fine"]["status"] == "passed" and results["fine"]["value"] == 3
    assert seen == [["broken"], ["broken", "missing"], ["broken", "missing", "fine"]]
    assert gpu_check.overall_status(results) == "failed"
    assert gpu_check.overall_status({"a": {"status": "skipped"}}) == "skipped"


def test_the_timing_stage_runs_on_the_cpu():
    result = gpu_check.timing("cpu", quick=True)
    case = result["mixer"]["uint8 NHWC -> float32 NCHW, K=1"]
    assert case["gb_per_s"] > 0 and case["fraction_of_copy"] > 0 and case["speedup_over_plain_torch"] > 0
    assert set(result["host_us_per_call"]) == {"trusted", "validated"}


def test_the_yaml_stand_in_writes_json_only_where_pyyaml_is_missing(monkeypatch):
    if gpu_check.module_present("yaml"):
        assert gpu_check.yaml_stand_in() is None
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    assert "PyYAML is not installed" in gpu_check.yaml_stand_in()
    stand_in = sys.modules["yaml"]
    text = stand_in.safe_dump({"b": 1, "a": [1.5, None]}, sort_keys=False)
    assert json.loads(text) == {"b": 1, "a": [1.5, None]} and stand_in.safe_load(text) == {"b": 1, "a": [1.5, None]}
    with pytest.raises(stand_in.YAMLError):
        stand_in.safe_load("a: [1")


# ---------------------------------------------------------------------------------------------
# the orchestrator's pieces, on made-up results (the GPU mode's branches run here too)


def test_synchronisations_are_counted_by_line():
    def warning(message, filename, lineno):
        return warnings.WarningMessage(message, UserWarning, filename, lineno)

    caught = [warning("called a synchronizing CUDA operation", "/x/trainer.py", 10)] * 3 + \
        [warning("called a synchronizing CUDA operation", "/x/tally.py", 7), warning("something else", "/x/a.py", 1)]
    assert gpu_check.group_synchronisations(caught) == {"total": 4, "by_line": {"trainer.py:10": 3, "tally.py:7": 1}}


def test_the_epoch_comparison_skips_each_phase_s_first_epoch():
    ce = [{"phase": "plain", "train_seconds": 9.0}] + [{"phase": "plain", "train_seconds": 1.0}] * 3
    mixnn = [{"phase": "plain", "train_seconds": 9.0},
             {"phase": "mixnn", "train_seconds": 9.0, "refresh_seconds": 9.0}]
    mixnn += [{"phase": "mixnn", "train_seconds": 1.5, "refresh_seconds": 0.5, "loader_wait_fraction": 0.1,
               "mix_seconds": 0.2, "step_seconds": 1.0}] * 2
    got = gpu_check.epoch_comparison({"ce.bfloat16": {"epochs": ce}, "mixnn.bfloat16": {"epochs": mixnn}})
    assert got == {"bfloat16": {"ce_epoch_seconds": 1.0, "mixnn_train_seconds": 1.5, "mixnn_refresh_seconds": 0.5,
                                "mixnn_over_ce": 2.0, "mixnn_loader_wait_fraction": 0.1, "mixnn_mix_seconds": 0.2,
                                "mixnn_step_seconds": 1.0}}
    assert gpu_check.epoch_comparison({}) is None


def test_pytest_s_report_is_summarised_with_the_skip_reasons(tmp_path):
    xml = tmp_path / "report.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite>
      <testcase classname="tests.test_a" name="test_ok"/>
      <testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2"/></testcase>
      <testcase classname="tests.test_b" name="test_skip">
        <skipped message="needs 'nvidia.dali', which is not installed"/></testcase>
      <testcase classname="" name="tests.test_c"><skipped message="collection skipped">('/r/tests/test_c.py', 0,
        "Skipped: needs 'hypothesis', which is not installed")</skipped></testcase>
    </testsuite></testsuites>""")
    got = gpu_check.summarise_junit(xml)
    assert (got["tests"], got["passed"], got["failures"], got["errors"], got["skipped"]) == (4, 1, 1, 0, 2)
    assert got["skip_reasons"] == {"needs 'nvidia.dali', which is not installed": 1,
                                   "needs 'hypothesis', which is not installed": 1}
    assert got["failed_tests"] == ["tests.test_a::test_bad: assert 1 == 2"]


def test_the_architectures_come_from_the_build_flags_without_cuobjdump(tmp_path):
    (tmp_path / "build.ninja").write_text(
        "FLAGS = --generate-code=arch=compute_80,code=[sm_80] --generate-code=arch=compute_90,code=[compute_90]"
        " --generate-code=arch=compute_90,code=[sm_90]\n")
    got = gpu_check.cuda_architectures(tmp_path / "_C.so", str(tmp_path / "bin" / "nvcc"), tmp_path)
    if got["source"] == "cuobjdump":  # this machine's cuobjdump read a library that does not exist
        pytest.skip("cuobjdump is on PATH")
    assert got == {"source": "nvcc flags (no cuobjdump)", "sass": ["sm_80", "sm_90"], "ptx": ["sm_90"]}


def test_a_command_past_its_limit_is_stopped_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_SECONDS", 1)
    log = gpu_check.Log(tmp_path / "log")
    rc, seconds, timed_out = gpu_check.run_command(["sleep", "60"], 2, log)
    assert timed_out and rc is not None and rc < 0 and seconds < 10
    assert gpu_check.run_command([sys.executable, "-c", "print('hi')"], 30, log)[::2] == (0, False)
    assert "hi" in (tmp_path / "log").read_text() and "stopped after" in (tmp_path / "log").read_text()


def test_the_budget_keeps_time_for_the_stages_after():
    budget = gpu_check.Budget(200.0)
    assert budget.for_stage("build", ("device", "train", "timing", "pytest")) == pytest.approx(200 - 95, abs=1)
    assert budget.for_stage("pytest", ()) == 120
    assert gpu_check.Budget(40.0).for_stage("timing", ("pytest",)) == pytest.approx(10, abs=1)


def _gpu_report() -> dict:
    """A GPU run's JSON as the orchestrator writes it, with one of each kind of stage result."""
    passed = {"status": "passed", "seconds": 0.5}
    return {
        "mode": "gpu", "ok": False, "seconds": 301.2, "budget_seconds": 330.0,
        "machine": {"python": "3.12.3", "torch": "2.11.0+cu130", "torch_cuda": "13.0",
                    "nvidia_smi": ["NVIDIA H200, 580.65.06, 143771 MiB, 9.0"],
                    "device": {"name": "NVIDIA H200", "capability": "9.0"}},
        "stages": {
            "probe": {"status": "passed", "seconds": 9.1},
            "build": {"status": "passed", "seconds": 41.0, "configure_seconds": 8.0, "compile_seconds": 33.0,
                      "jobs": 16, "architectures": {"source": "cuobjdump", "sass": ["sm_80", "sm_90"],
                                                    "ptx": ["sm_90"]}},
            "device": {"status": "failed", "seconds": 20.0, "checks": {
                "mixer": {**passed, "cases": 194, "max_error_by_out_dtype": {"float32": 1e-6}},
                "trusted_path": {**passed, "bounds": "row NaN", "no_wait": "returned with the stream busy"},
                "gmm": {"status": "failed", "seconds": 1.0, "error": "CheckFailed: differs"},
                "cupy_dlpack": {"status": "skipped", "seconds": 0.0, "reason": "cupy is not installed"}}},
            "train": {"status": "passed", "seconds": 60.0, "checks": {
                "ce.bfloat16": {**passed, "test_accuracy": 0.95, "loader_backend": "host",
                                "observed": {"steps": 138, "model_input": ["cuda float32"],
                                             "first_conv_output": ["cuda bfloat16"]}},
                "synchronisations": {**passed, "synchronisations": {"total": 40, "per_step": 0.6,
                                                                    "by_line": {"trainer.py:350": 30}}}}},
            "timing": {"status": "passed", "seconds": 12.0, "checks": {"mixer_bandwidth": {
                **passed, "copy_gb_per_s": 3900.0, "host_us_per_call": {"trusted": 40.0, "validated": 400.0},
                "mixer": {"uint8 NHWC -> float32 NCHW, K=1": {"gb_per_s": 2000.0, "fraction_of_copy": 0.51}}}}},
            "pytest": {"status": "failed", "seconds": 80.0, "tests": 40, "passed": 30, "failures": 1, "errors": 0,
                       "skipped": 9, "skip_reasons": {"needs 'nvidia.dali', which is not installed": 9}}},
        "epoch_comparison": {"bfloat16": {"mixnn_over_ce": 1.7, "ce_epoch_seconds": 0.2,
                                          "mixnn_train_seconds": 0.25, "mixnn_refresh_seconds": 0.09,
                                          "mixnn_loader_wait_fraction": 0.05}},
    }


def test_the_summary_table_of_a_gpu_run():
    table = gpu_check.summary_table(_gpu_report())
    assert table.startswith("GPU check: NVIDIA H200 (compute capability 9.0), python 3.12.3, torch 2.11.0+cu130, "
                            "CUDA 13.0, driver 580.65.06")
    for expected in ("sass sm_80,sm_90 ptx sm_90", "CheckFailed: differs", "cupy is not installed",
                     "acc 0.95, 138 steps, input cuda float32, conv cuda bfloat16, loader host",
                     "0.6 per step (trainer.py:350 x30)", "2000.0 GB/s = 0.51 of copy (3900.0 GB/s)",
                     "30 passed, 1 failed, 0 errors, 9 skipped", "epoch mixnn/ce bfloat16", "1.7x",
                     "FAILED: see the stages above; 301.2 s of a 330.0 s budget"):
        assert expected in table, expected
    no_gpu = gpu_check.summary_table({"mode": "no-gpu", "ok": True, "no_gpu_reason": "torch sees no CUDA device",
                                      "machine": {"python": "3.11", "torch": "2.14"}, "seconds": 5,
                                      "budget_seconds": 330,
                                      "stages": {"build": {"status": "failed", "reason": "no nvcc"}}})
    assert "no GPU (torch sees no CUDA device)" in no_gpu and "no nvcc" in no_gpu

