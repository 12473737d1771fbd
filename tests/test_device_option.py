"""`pytest --device`: a device that is not here ends the session with one line before any test; a name that is
not a device is a usage error; the `device` fixture, `DEVICE` and TTT_TEST_DEVICE (for subprocesses) agree."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _pytest(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
                           "tests/test_flops.py::test_bf16_peaks_by_device_name"], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})), timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_cuda_without_a_gpu_runs_nothing_and_says_so_in_one_line():
    run = _pytest("--device", "cuda", env={"TTT_TEST_DEVICE": "cpu"})  # the option wins over the environment
    out = (run.stdout + run.stderr).strip()
    assert run.returncode == 0 and "passed" not in out, out
    assert out == ("Exit: --device cuda: no cuda device here (torch.cuda.is_available() is False): nothing run"), out


def test_a_name_that_is_not_a_device_is_a_usage_error():
    run = _pytest("--device", "gpu0")
    assert run.returncode == 4 and "--device gpu0: not a torch device (cpu, cuda, cuda:1, ...)" in run.stderr


def test_the_fixture_the_constant_and_the_environment_agree(device):
    from conftest import DEVICE

    assert str(device) == DEVICE == os.environ["TTT_TEST_DEVICE"]
