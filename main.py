"""The original project's command line: ``python main.py --source_path DATA_ROOT --config CONFIG --gpu 0``.

Runs the same training as ``promptdml train --config CONFIG --data-root DATA_ROOT``; the dataset folder is
taken from the config's dataset name under DATA_ROOT, and the authors' YAML files load unchanged.
Extra ``--set key=value`` overrides are accepted too.
"""

from __future__ import annotations

import argparse
import sys

import torch

from promptdml.cli import main as promptdml_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source_path", required=True, help="data root holding cub200/, cars196/, ...")
    parser.add_argument("--config", required=True, help="YAML config (ours or the authors')")
    parser.add_argument("--gpu", type=int, default=None, help="CUDA device index (ignored without CUDA)")
    parser.add_argument("--save_path", default=None, help="output folder for runs (default: runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    forwarded = ["train", "--config", args.config, "--data-root", args.source_path]
    if args.gpu is not None:
        if torch.cuda.is_available():
            forwarded += ["--device", f"cuda:{args.gpu}"]
        else:
            print(f"--gpu {args.gpu}: CUDA is not available here; training on the best available device",
                  file=sys.stderr)
    if args.save_path:
        forwarded += ["--output-dir", args.save_path]
    for o in args.overrides:
        forwarded += ["--set", o]
    return promptdml_main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
