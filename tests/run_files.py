#!/usr/bin/env python3
"""Run the test suite as one pytest process per test file, as many at once as there are CPUs (``make test``).

The suite is CPU-bound and single-threaded (TVM builds, gcc, QEMU), so on the 2-core development machine one
pytest took 36-41 min and two at a time take about half.  pytest-xdist would do this, but nothing can be
downloaded on our machines and it is not among our dependencies.  Files start heaviest first (the order of
``HEAVY``, from the durations of a whole run; a file missing there only starts later), each in its own
``--basetemp`` so no two processes share a temporary directory.  Each file's output is printed when it ends;
the exit status is 0 when every file passed (or had no test selected), else the first failing pytest's.

    python tests/run_files.py [pytest arguments, e.g. -k codegen -x]   # TINYTRAIN_TEST_JOBS=N to set N processes
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# Slowest first (seconds, handover check of 2026-12-01 on the development machine): test_training 609, test_codegen 356,
# test_device 189, test_backward_ops 125, test_stream_input 111, test_default_model 109, test_cli_training 85.
HEAVY = ["test_training.py", "test_codegen.py", "test_device.py", "test_backward_ops.py", "test_stream_input.py", "test_default_model.py",
         "test_cli_training.py", "test_float_mode.py", "test_models.py", "test_search.py", "test_dsp_kernels.py"]
NO_TESTS_COLLECTED = 5  # pytest's exit status when the arguments select nothing in a file


def ordered_files() -> list[Path]:
    files = sorted(TESTS.glob("test_*.py"))
    rank = {name: i for i, name in enumerate(HEAVY)}
    return sorted(files, key=lambda f: (rank.get(f.name, len(HEAVY)), f.name))


def run_file(path: Path, args: list[str], base: Path) -> tuple[Path, int, float, str]:
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={base / path.stem}", *args, str(path)]
    proc = subprocess.run(cmd, cwd=TESTS.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return path, proc.returncode, time.monotonic() - start, proc.stdout


def main(args: list[str]) -> int:
    jobs = int(os.environ.get("TINYTRAIN_TEST_JOBS", os.cpu_count() or 1))
    start, status = time.monotonic(), 0
    with tempfile.TemporaryDirectory(prefix="tinytrain-tests-") as tmp, ThreadPoolExecutor(max(1, jobs)) as pool:
        results = []
        for done in as_completed([pool.submit(run_file, f, args, Path(tmp)) for f in ordered_files()]):
            path, code, seconds, output = done.result()
            print(f"==== {path.name}: exit {code}, {seconds:.0f} s ====\n{output}", flush=True)
            results.append((path, code, seconds, output))
    for path, code, seconds, output in results:
        summary = output.strip().splitlines()[-1] if output.strip() else ""
        print(f"{path.name:28s} {seconds:6.0f} s  {summary}")
        if code not in (0, NO_TESTS_COLLECTED) and status == 0:
            status = code
    if status == 0 and all(code == NO_TESTS_COLLECTED for _, code, _, _ in results):
        status = NO_TESTS_COLLECTED
    print(f"{len(results)} files, {jobs} at a time, {time.monotonic() - start:.0f} s in all: {'passed' if status == 0 else f'exit {status}'}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
