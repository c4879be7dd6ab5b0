"""Record a `promptdml demo` run for the README: ``python scripts/record_demo.py runs/demo``.

Writes benchmarks/results/demo.json (the run's before/after test metrics and where they were measured) and
prints the README sentence; tests/test_docs.py checks that README.md states these numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "demo.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the demo's run directory (runs/demo)")
    parser.add_argument("--note", default="", help="where and how the run was made")
    args = parser.parse_args()
    summary = json.loads((args.run / "metrics.json").read_text())
    import torch

    record = {
        "command": "promptdml demo --weights FILE",
        "note": args.note,
        "before_training_frozen_features": summary["before_training_frozen_features"],
        "test": summary["test"],
        "epochs": summary["epochs"], "train_seconds": round(summary["train_seconds"], 1),
        "device": summary["device"], "precision": summary["precision"],
        "backbone_weights": summary.get("backbone_weights"),
        "torch": torch.__version__, "machine": platform.machine(),
    }
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    b, a = record["before_training_frozen_features"], record["test"]
    print(f"wrote {OUT}\nRecall@1 {b['recall@1']:.3f} -> {a['recall@1']:.3f} and MAP@R {b['map@r']:.3f} -> "
          f"{a['map@r']:.3f}")


if __name__ == "__main__":
    main()
