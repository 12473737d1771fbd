"""The prepared GPU check runs end to end at toy sizes on CPU, without `datasets` (absent on the GPU machine)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_gpu_check_runs_at_toy_size_without_datasets(tmp_path):
    out = tmp_path / "gpu.json"
    script = textwrap.dedent(f"""
        import runpy, sys
        class NoDatasets:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "datasets":
                    raise ImportError("the GPU check must not need datasets")
        sys.meta_path.insert(0, NoDatasets())
        sys.argv = ["benchmark.py", "gpu", "--toy", "--repeats", "1", "--out", {str(out)!r}]
        runpy.run_path("scripts/benchmark.py", run_name="__main__")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["train_step"]] == ["base", "ttt"]
    assert all(r["tok_s"] > 0 for r in result["train_step"])
    assert {(r["chunk"], r["variant"]) for r in result["mlp"]} == {
        (c, v) for c in (32, 64) for v in ("plain", "ttt", "published")}
    for variant, r in result["generate"].items():
        assert r["equal_to_full_forwards"], (variant, r)
    assert "(3) generate" in run.stdout
