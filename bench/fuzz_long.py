"""Long form of the fuzz tests (issue 5 item 7): ``python bench/fuzz_long.py [--examples N] [--minutes M]``.

Runs tests/security/test_fuzz.py under pytest with RELAY_FUZZ_EXAMPLES=N (default 2000) and a wall-clock
budget: each hypothesis test stops generating after its share of the budget (RELAY_FUZZ_SECONDS), and the
whole run is killed (its process group, by PID) if it overruns by more than a minute. Exit code: pytest's,
or 124 on a timeout. Extra arguments after ``--`` go to pytest (e.g. ``-- -k smtp_sessions -x``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HYPOTHESIS_TESTS = 5  # the @given tests in test_fuzz.py that share the budget


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000, help="hypothesis examples per test (default 2000)")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget (default 10)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    if args.examples < 1 or args.minutes <= 0:
        ap.error("--examples and --minutes must be positive")

    budget = args.minutes * 60
    env = dict(os.environ)
    env["RELAY_FUZZ_EXAMPLES"] = str(args.examples)
    env["RELAY_FUZZ_SECONDS"] = f"{budget * 0.9 / HYPOTHESIS_TESTS:.0f}"
    python = ROOT / ".venv" / "bin" / "python"
    cmd = [
        str(python if python.exists() else sys.executable),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--hypothesis-show-statistics",
        "tests/security/test_fuzz.py",
        *args.pytest_args,
    ]
    print(
        f"fuzz_long: {args.examples} examples per test, budget {args.minutes:g} min: {' '.join(cmd)}",
        flush=True,
    )
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=budget + 60)
    except subprocess.TimeoutExpired:
        print(
            f"fuzz_long: over budget ({time.monotonic() - started:.0f}s); stopping pytest, pid {proc.pid}",
            flush=True,
        )
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return 124
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
        return 130
    print(f"fuzz_long: pytest exited {code} after {time.monotonic() - started:.0f}s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
