"""`python -m train CONFIG [key=value ...]` (also `clipray train ...`): train, evaluate, export."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="clipray train", description="Train a retrieval model with Ray Train + DeepSpeed. "
        "Connects to RAY_ADDRESS (or ray.address) when set, else starts a local Ray. Re-running the "
        "same command resumes from the latest checkpoint of train.run_name under train.storage_path.")
    ap.add_argument("config", help="YAML config, e.g. train/configs/demo.yaml")
    ap.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. model.head=seqTransf")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    from clipray.config import load_config
    from train.driver import run

    run(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    # through the `clipray` entry point: a bad config or path is a one-line error and exit
    # status 2 there, and `ray job submit ... python -m train` shows the same, not a traceback
    from clipray.cli import main as cli

    raise SystemExit(cli(["train", *sys.argv[1:]]))
