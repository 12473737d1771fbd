#!/usr/bin/env python
"""The prepared GPU check: one command that proves a GPU run in 8 minutes on a bare, offline machine.

    python scripts/gpu_check.py [--wheels DIR] [--out exports/gpu_check] [--toy]
                                [--parts tests,train,benchmark,attention] [--budget 480]

First the wheels in DIR whose distributions are not installed (`datasets` and its needs: docs/gpu.md has the
`pip download` line) are installed into a temporary folder that the parts import from. Then four parts run one
after the other, each a subprocess with its own time limit, so a hang costs only its own part:
  tests      `pytest --device cuda` on the device-capable tests (model contract, mixed precision, compile, loss,
             attention, export reload, evaluation; multi-process gloo tests and lm-evaluation-harness runs left out)
  train      the main job, `scripts/adapt.py recipes/tiny_qwen3.yaml`, on CUDA in bf16 with `train.compile`,
             a few steps, its evaluation and export
  benchmark  `scripts/benchmark.py gpu`: train step at 32k tokens on the Qwen3-0.6B shape, base vs TTT (tokens/s,
             MFU against the card's bf16 peak, peak memory against `--plan`), TTT MLP vs plain MLP, decode ms/token
  attention  `scripts/benchmark_attention.py`: ttt_packed vs flex attention vs unpacked SDPA on packed rows
Writes check.json (the machine, the wheels, every part's status and the table), tests.json, train.json,
benchmark.json, attention.json and gpu_check.log (every part's output) into --out, and prints one table.
`--toy` runs every part at CPU size on CPU (the CI test does), `--device cpu` for the tests.

Exit status: 0 every part passed; 1 a part failed or ran out of time; 2 bad input (no CUDA device without --toy,
an unreadable wheel folder or two wheels of one package), one line.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("tests", "train", "benchmark", "attention")
BUDGET_S = 480  # 8 minutes for the four parts together
LIMITS_S = {"tests": 140, "train": 110, "benchmark": 140, "attention": 90}  # each part's own limit
GRACE_S = 15  # after its limit a part gets SIGINT (pytest still writes its report), then SIGKILL after this long
DEVICE_TESTS = ["tests/test_modeling.py", "tests/test_mixed_precision.py", "tests/test_compile.py",
                "tests/test_loss.py", "tests/test_attention.py", "tests/test_export.py", "tests/test_remote_code.py",
                "tests/test_eval_swapped_state.py", "tests/test_eval_run.py", "tests/test_eval_tasks.py"]
NOT_ON_DEVICE = "not two_processes and not two_ranks and not lm_eval"  # gloo ranks; lm-eval runs take minutes
TOY_TESTS = ["tests/test_attention.py::test_generation_and_padded_batches_are_unchanged"]
TRAIN = ["train.mixed_precision=bf16", "train.compile=true", "train.max_steps=30", "train.warmup_steps=3",
         "train.save_every=30", "train.eval_every=30", "train.log_every=5",
         "eval.tasks=[]"]  # loss by position and the state controls; generation tasks would recompile per length
TOY_TRAIN = ["train.mixed_precision=bf16", "train.compile=false", "train.max_steps=2", "train.warmup_steps=1",
             "data.seq_len=256", "train.batch_size=2", "train.save_every=2", "train.eval_every=2",
             "train.eval_batches=1", "train.log_every=1", "eval=null"]  # inductor on 2 CPU cores takes minutes
TAIL = 3000  # characters of a part's output kept in its JSON


class CheckError(Exception):
    """Bad input to the check (exit 2, one line)."""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", metavar="DIR", help="wheels to install where their package is missing")
    parser.add_argument("--out", default="exports/gpu_check", help="folder of the JSON files")
    parser.add_argument("--toy", action="store_true", help="every part at CPU size, on CPU")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--budget", type=int, default=BUDGET_S, help="seconds for all parts together")
    args = parser.parse_args(argv)
    args.parts = args.parts.split(",")
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    if args.budget < 1:
        parser.error(f"--budget must be >= 1, got {args.budget}")
    return args


# ---------------------------------------------------------------------------------------------- wheels


def wheel_distribution(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name (PEP 427)."""
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) < 5:
        raise CheckError(f"--wheels: {path.name} is not a wheel file name (name-version-python-abi-platform.whl)")
    return re.sub(r"[-_.]+", "-", parts[0]).lower(), parts[1]


def missing_wheels(folder: Path) -> tuple[list[Path], list[str]]:
    """(wheels whose distribution is not installed, names of those already installed). One wheel a package."""
    if not folder.is_dir():
        raise CheckError(f"--wheels: no such folder: {folder}")
    seen, missing, present = {}, [], []
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel_distribution(wheel)
        if name in seen:
            raise CheckError(f"--wheels: two wheels of {name} ({seen[name]}, {version}) in {folder}: keep one")
        seen[name] = version
        try:
            importlib.metadata.version(name)
            present.append(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(wheel)
    return missing, present


def install_wheels(wheels: list[Path], target: Path) -> None:
    """pip install the wheels (no index, no dependencies) into `target`."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--target", str(target), *map(str, wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise CheckError(f"--wheels: pip could not install {', '.join(w.name for w in wheels)}: {last}")


# ---------------------------------------------------------------------------------------------- parts


def run_part(name: str, cmd: list[str], limit: float, env: dict, log) -> dict:
    """Run one part in its own process group; kill the group at `limit` seconds. Status, seconds, exit code and
    the output's tail; the whole output goes to `log`."""
    log.write(f"\n===== {name}: {' '.join(cmd)} (limit {limit:.0f} s)\n")
    log.flush()
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own group: a timeout kills pytest's children too
        try:
            rc = proc.wait(timeout=limit)
            status = "passed" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, status = None, f"timed out after {limit:.0f} s"
        out.seek(0)
        text = out.read()
    log.write(text)
    log.flush()
    return {"part": name, "status": status, "exit": rc, "seconds": time.monotonic() - t0, "command": cmd,
            "output_tail": text[-TAIL:]}


def tests_command(args, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}"]
    if args.toy:
        return cmd + ["--device", "cpu", *TOY_TESTS]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "4"]  # tiny models: the GPU is idle most of the time; four workers share it
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "100"]  # a hanging test fails alone (an inductor compile takes tens of seconds)
    return cmd + ["--device", "cuda", "-k", NOT_ON_DEVICE, *DEVICE_TESTS]


def pytest_counts(xml_path: Path) -> dict:
    """Counts and failing test ids from pytest's JUnit XML (absent when pytest did not get that far)."""
    if not xml_path.is_file():
        return {}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        kind = "failed" if "failure" in kinds else "errors" if "error" in kinds else \
            "skipped" if "skipped" in kinds else "passed"
        counts[kind] += 1
        if kind in ("failed", "errors"):
            failures.append(f"{case.get('classname')}::{case.get('name')}")
    return counts | {"failures": failures}


def train_results(run: Path, export: Path) -> dict:
    lines = []
    if (run / "metrics.jsonl").is_file():
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in lines if "loss" in m]
    evals = [m["eval_loss"] for m in lines if "eval_loss" in m]
    return {"steps": steps[-1]["step"] if steps else 0, "first_loss": steps[0]["loss"] if steps else None,
            "last_loss": steps[-1]["loss"] if steps else None, "eval_loss": evals[-1] if evals else None,
            "tokens_per_s": steps[-1]["tokens_per_s"] if steps else None,
            "exported": (export / "model.safetensors").is_file() or any(export.glob("model-*.safetensors"))}


def run_check(args) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.toy:
        raise CheckError("no CUDA device (torch.cuda.is_available() is False): the GPU check needs one; --toy runs "
                         "it at CPU size on CPU")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CheckError(f"--out: is a file, not a folder: {out}")
    wheels, present = missing_wheels(Path(args.wheels)) if args.wheels else ([], [])
    out.mkdir(parents=True, exist_ok=True)
    for name in (*args.parts, "check"):  # a part that fails now must not show an earlier run's result
        (out / f"{name}.json").unlink(missing_ok=True)
    machine = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "python": sys.version.split()[0], "toy": args.toy}
    with tempfile.TemporaryDirectory() as tmp, open(out / "gpu_check.log", "w") as log:
        tmp = Path(tmp)
        site = tmp / "site"
        if wheels:
            install_wheels(wheels, site)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(site)] * bool(wheels) + [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        toy = ["--toy"] * args.toy
        commands = {
            "tests": tests_command(args, tmp),
            "train": [sys.executable, "scripts/adapt.py", "recipes/tiny_qwen3.yaml",
                      *(TOY_TRAIN if args.toy else TRAIN), f"train.output_dir={tmp / 'run'}", f"export.dir={tmp / 'export'}"],
            "benchmark": [sys.executable, "scripts/benchmark.py", "gpu", *toy, "--repeats", "1" if args.toy else "2",
                          "--out", str(out / "benchmark.json")],
            "attention": [sys.executable, "scripts/benchmark_attention.py", *toy, "--repeats", "1" if args.toy else "3",
                          "--out", str(out / "attention.json")],
        }
        deadline = time.monotonic() + args.budget
        results = {}
        for name in args.parts:
            left = deadline - time.monotonic()
            if left < 1:
                results[name] = {"part": name, "status": "not run (the check's budget is spent)", "seconds": 0.0}
                continue
            print(f"gpu_check: {name} (limit {min(LIMITS_S[name], left):.0f} s) ...", flush=True)
            results[name] = run_part(name, commands[name], min(LIMITS_S[name], left), env, log)
            if name == "tests":
                results[name] |= pytest_counts(tmp / "tests.xml")
                if results[name]["status"] == "passed" and not results[name].get("passed"):
                    results[name]["status"] = "failed (no test ran)"
            elif name == "train":
                results[name] |= train_results(tmp / "run", tmp / "export")
            print(f"gpu_check: {name} {results[name]['status']} in {results[name]['seconds']:.0f} s", flush=True)
    for name in ("tests", "train"):
        if name in results:
            (out / f"{name}.json").write_text(json.dumps(results[name], indent=2))
    for name in ("benchmark", "attention"):
        if name in results and (out / f"{name}.json").is_file():
            results[name]["result"] = json.loads((out / f"{name}.json").read_text())
    table = summary_rows(results)
    check = {"machine": machine, "wheels": {"installed": [w.name for w in wheels], "present": present},
             "parts": {k: {f: v[f] for f in ("status", "seconds") if f in v} for k, v in results.items()},
             "table": table}
    (out / "check.json").write_text(json.dumps(check, indent=2))
    print(format_table(machine, table))
    print(f"gpu_check: wrote {out}/")
    return check


# ---------------------------------------------------------------------------------------------- the table


def _gib(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.2f} GiB"


def summary_rows(results: dict) -> list[dict]:
    """One row per measurement: part, status, item, result (what the table at the end shows)."""
    rows = []

    def add(part, item, result):
        r = results[part]
        rows.append({"part": part, "status": r["status"], "seconds": round(r["seconds"], 1), "item": item,
                     "result": result})

    if "tests" in results:
        r = results["tests"]
        counts = ", ".join(f"{r[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if k in r) or "no report"
        first = f"; first failure {r['failures'][0]}" if r.get("failures") else ""
        add("tests", "pytest on the device", counts + first)
    if "train" in results:
        r = results["train"]
        loss = f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}" if r.get("last_loss") is not None else "no loss"
        tok = f", {r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s") else ""
        add("train", "main job (adapt.py tiny_qwen3)",
            f"{r.get('steps', 0)} steps, {loss}{tok}, {'exported' if r.get('exported') else 'not exported'}")
    bench = results.get("benchmark", {}).get("result")
    if bench:
        for s in bench["train_step"]:
            mfu = f", MFU {100 * s['mfu']:.1f}%" if s.get("mfu") is not None else ""
            plan = f" (plan {_gib(s['plan_gib'])})" if s.get("plan_gib") is not None else ""
            add("benchmark", f"train step {s['tokens']} tok, {s['variant']}",
                f"{s['tok_s']:,.0f} tok/s{mfu}, peak {_gib(s['peak_gib'])}{plan}")
        for chunk in sorted({m["chunk"] for m in bench["mlp"]}):
            add("benchmark", f"MLP fwd+bwd, chunk {chunk}", ", ".join(
                f"{m['variant']} {m['ms']:.2f} ms" for m in bench["mlp"] if m["chunk"] == chunk))
        add("benchmark", "decode", ", ".join(
            f"{v} {g['decode_ms_per_token']:.2f} ms/token (cached == full forwards: {g['equal_to_full_forwards']})"
            for v, g in bench["generate"].items()))
    elif "benchmark" in results:
        add("benchmark", "scripts/benchmark.py gpu", "no result")
    attention = results.get("attention", {}).get("result")
    if attention:
        for window in dict.fromkeys(r["window"] for r in attention["rows"]):
            add("attention", f"packed rows, window {window}", ", ".join(
                f"{r['variant']} {r['ms']:.2f} ms{'' if r['backward'] else ' (fwd only)'} / {_gib(r['peak_gib'])}"
                for r in attention["rows"] if r["window"] == window))
    elif "attention" in results:
        add("attention", "scripts/benchmark_attention.py", "no result")
    return rows


def format_table(machine: dict, rows: list[dict]) -> str:
    head = ("part", "status", "s", "item", "result")
    cells = [head] + [(r["part"], r["status"], f"{r['seconds']:.0f}", r["item"], r["result"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = [f"GPU check on {machine['device']} (torch {machine['torch']}{', toy sizes' if machine['toy'] else ''})"]
    lines += ["  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4] for c in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        check = run_check(args)
    except CheckError as e:
        print(f"gpu_check.py: error: {e}", file=sys.stderr)
        return 2
    return 0 if all(p["status"] == "passed" for p in check["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
