"""One report from the JUnit XML of several pytest processes (scripts/gpu_check.sh runs the GPU tests in some).

    python scripts/junit_report.py OUT.json FILE.xml [FILE.xml ...] [--slowest 15]

Prints the totals, every test that failed or errored, and the slowest tests (setup + call + teardown, as
pytest's JUnit XML counts them); writes all of it to OUT.json: ``{"totals": {...}, "tests": [{"id", "outcome",
"seconds", "message"}, ...]}``, slowest first.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET

_OUTCOMES = {"failure": "failed", "error": "error", "skipped": "skipped"}


def read(path: str) -> list[dict]:
    """The test cases of one JUnit XML file (pytest's), as dicts."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in _OUTCOMES:
                outcome, message = _OUTCOMES[child.tag], (child.get("message") or "")[:300]
                break
        module = case.get("classname", "").replace(".", "/")
        tests.append({"id": f"{module}.py::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message, "file": path})
    return tests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_out")
    parser.add_argument("xml", nargs="+")
    parser.add_argument("--slowest", type=int, default=15)
    args = parser.parse_args()
    tests = sorted((t for path in args.xml for t in read(path)), key=lambda t: -t["seconds"])
    totals = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    totals["seconds (sum over tests)"] = round(sum(t["seconds"] for t in tests), 1)
    print("totals:", ", ".join(f"{k} {v}" for k, v in totals.items()))
    for t in tests:
        if t["outcome"] in ("failed", "error"):
            print(f"{t['outcome'].upper():7s} {t['id']}: {t['message']}")
    print(f"slowest {args.slowest}:")
    for t in tests[: args.slowest]:
        print(f"  {t['seconds']:8.2f} s  {t['outcome']:7s} {t['id']}")
    with open(args.json_out, "w") as f:
        json.dump({"totals": totals, "tests": tests}, f, indent=1)


if __name__ == "__main__":
    main()
