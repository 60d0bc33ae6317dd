"""Fine-tune a Mixtral with its experts split over ranks.

    python launch/train.py                                   # tiny preset, embedded corpus, one process
    deepspeed --num_gpus 2 launch/train.py --ep 2            # experts split over 2 ranks
    accelerate launch --config_file configs/accelerate/ep2.yaml launch/train.py --ep 2
    deepspeed --num_gpus 4 launch/train.py --config configs/train/default.yaml --ep 2 --zero-stage 2

Settings: `--help`; a YAML recipe gives defaults, flags override it. Prints the final checkpoint's path.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from epkit.data import DataError  # noqa: E402
from epkit.runtime import run_entry  # noqa: E402
from epkit.train import main, parse_config  # noqa: E402
from epkit.train.loop import DivergedError  # noqa: E402


def run(argv=None) -> int:
    def train() -> int:
        main(parse_config(argv))
        return 0
    return run_entry(train, (DataError, DivergedError))


if __name__ == "__main__":
    sys.exit(run())
