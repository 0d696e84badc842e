"""MS MARCO scale, both halves: re-ranking (scale_rerank.py) and training data (scale_train.py).

    python benchmarks/scale.py                    # both, with their defaults (the real sizes)
    python benchmarks/scale.py rerank [FLAGS]     # = python benchmarks/scale_rerank.py [FLAGS]
    python benchmarks/scale.py train [FLAGS]      # = python benchmarks/scale_train.py [FLAGS]

Each half generates its synthetic data once (8.8M passages of ~55 words, 7000 x 1000 run / 40M kd-docpairs-shaped
pairs; sizes are flags of each half, see its --help) and prints a markdown table naming the machine: time to
first score or step, peak RSS, docs/s or data-side batches/s. The two halves stay separate scripts because they
share no data and each takes many minutes; this one only runs them in turn, each in its own process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HALVES = {"rerank": "scale_rerank.py", "train": "scale_train.py"}
DEFAULT_ARGS = {"rerank": ["--workdir", "/tmp/sce-scale-rerank"], "train": []}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] in HALVES:
        runs = [(argv[0], argv[1:] or DEFAULT_ARGS[argv[0]])]
    elif argv:
        print(f"usage: python benchmarks/scale.py [{'|'.join(HALVES)} [FLAGS]]", file=sys.stderr)
        return 2
    else:
        runs = list(DEFAULT_ARGS.items())
    here = Path(__file__).resolve().parent
    for name, args in runs:
        print(f"## {name}", flush=True)
        code = subprocess.call([sys.executable, str(here / HALVES[name]), *args])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
