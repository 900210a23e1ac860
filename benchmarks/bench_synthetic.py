"""How long the default synthetic dataset takes to write (a script, not a test).

    python benchmarks/bench_synthetic.py            # the default dataset, 3 repeats
    python benchmarks/bench_synthetic.py --repeats 1

Each repeat writes the dataset into a fresh temporary folder (nothing is cached between
repeats) and prints the wall time; the target on a 2-core CPU is under 30 s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lagnet.data import generate_synthetic_market


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            generate_synthetic_market(Path(tmp) / "market")
            times.append(time.perf_counter() - start)
        print(f"repeat {repeat + 1}: default synthetic dataset written in {times[-1]:.1f} s")
    print(f"median {statistics.median(times):.1f} s over {len(times)} repeats (target < 30 s)")


if __name__ == "__main__":
    main()
