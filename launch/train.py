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

from epkit.checkpoint import CheckpointError  # noqa: E402
from epkit.data import DataError  # noqa: E402
from epkit.runtime import comm_failure_message, is_comm_failure  # noqa: E402
from epkit.train import main, parse_config  # noqa: E402
from epkit.train.loop import DivergedError  # noqa: E402


def run(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        main(cfg)
    except (ValueError, DataError, CheckpointError, FileNotFoundError, ImportError, DivergedError) as e:
        if os.environ.get("EPKIT_DEBUG"):
            raise
        rank = os.environ.get("RANK", "0")
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        if not is_comm_failure(e) or os.environ.get("EPKIT_DEBUG"):
            raise
        print(f"error (rank {os.environ.get('RANK', '0')}): {comm_failure_message(e)}", file=sys.stderr, flush=True)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(run())
