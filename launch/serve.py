"""Serve a Mixtral checkpoint over HTTP with OpenAI's API, experts split over ranks.

    deepspeed --num_gpus 2 launch/serve.py --ep 2 --checkpoint DIR --port 8000
    python launch/serve.py --preset tiny --api-key secret        # EP=1, CPU too

Settings: `--help` and configs/infer/default.yaml (model and engine). Endpoints: /v1/completions,
/v1/chat/completions, /v1/models, /health, /metrics.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from epkit.infer.server import main  # noqa: E402
from epkit.runtime import run_entry  # noqa: E402


def run(argv=None) -> int:
    return run_entry(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(run())
