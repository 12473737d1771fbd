"""The prepared GPU check (scripts/gpu_check.py) runs end to end at toy sizes on CPU; its wheel handling installs
only what is missing, offline; bad input is one line."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import script_main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_gpu_check_runs_every_part_at_toy_size(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "scripts/gpu_check.py", "--toy", "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["attention.json", "benchmark.json", "check.json", "gpu_check.log",
                                                     "tests.json", "train.json"]
    check = json.loads((out / "check.json").read_text())
    assert list(check["parts"]) == ["tests", "train", "benchmark", "attention"]
    assert all(p["status"] == "passed" for p in check["parts"].values()), check["parts"]
    tests = json.loads((out / "tests.json").read_text())
    assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    train = json.loads((out / "train.json").read_text())
    assert train["steps"] == 2 and train["exported"] and train["last_loss"] > 0
    bench = json.loads((out / "benchmark.json").read_text())
    assert [r["variant"] for r in bench["train_step"]] == ["base", "ttt"]
    assert all(r["tok_s"] > 0 and r["model_tflops"] > 0 for r in bench["train_step"])
    assert bench["train_step"][1]["plan_gib"] > 0
    for variant, r in bench["generate"].items():
        assert r["equal_to_full_forwards"], (variant, r)
    attention = json.loads((out / "attention.json").read_text())
    assert {(r["variant"], r["window"]) for r in attention["rows"]} == {
        (v, w) for v in ("ttt_packed", "flex", "unpacked_sdpa") for w in (None, 48)}
    for r in attention["rows"]:  # three ways to attend within documents give the same outputs
        assert r["max_diff_vs_ttt_packed"] < 1e-5, r
    table = run.stdout[run.stdout.index("GPU check on"):]
    assert {row["part"] for row in check["table"]} == {"tests", "train", "benchmark", "attention"}
    assert all(row["item"] in table for row in check["table"])


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel of one module `name` holding VALUE = version."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", f"VALUE = {version!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_only_missing_wheels_are_installed_offline(tmp_path):
    gpu_check = _module()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "torch", "0.0.1")  # installed: left alone
    fresh = _wheel(wheels, "ttt_gpu_check_probe", "1.2")
    missing, present = gpu_check.missing_wheels(wheels)
    assert missing == [fresh] and present == ["torch"]
    gpu_check.install_wheels(missing, tmp_path / "site")
    probe = subprocess.run([sys.executable, "-c", "import ttt_gpu_check_probe as m; print(m.VALUE)"],
                           env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")), capture_output=True, text=True)
    assert probe.stdout.strip() == "1.2", probe.stderr


def _module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_cli", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    main = script_main("gpu_check")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "dill", "0.4.1")
    _wheel(wheels, "dill", "0.4.0")
    cases = [(["--toy", "--wheels", str(wheels), "--out", str(tmp_path / "a")], "two wheels of dill (0.4.0, 0.4.1)"),
             (["--toy", "--wheels", str(tmp_path / "none"), "--out", str(tmp_path / "b")], "--wheels: no such folder")]
    if not torch.cuda.is_available():
        cases.append(([f"--out={tmp_path / 'c'}"], "no CUDA device (torch.cuda.is_available() is False)"))
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("gpu_check.py: error: ") and message in err and "\n" not in err, err
    assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())  # nothing written


def test_a_part_past_its_limit_is_stopped_with_its_children(tmp_path, monkeypatch):
    """A hang costs only its own part: at its limit the part's whole process group gets SIGINT (pytest still
    writes its report), and SIGKILL after a grace period if it ignores that."""
    gpu_check = _module()
    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    hang = ("import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "open(sys.argv[1], 'w').write(str(child.pid)); print('started', flush=True); time.sleep(60)")
    pid_file = tmp_path / "child.pid"
    with open(tmp_path / "log", "w") as log:
        result = gpu_check.run_part("hang", [sys.executable, "-c", hang, str(pid_file)], 2, dict(os.environ), log)
    assert result["status"] == "timed out after 2 s" and result["exit"] is None and result["seconds"] < 10
    assert "started" in result["output_tail"]
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild went with the group
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the part's child outlived its limit")
