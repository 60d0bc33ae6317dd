"""Compare two JSONL result files of launch/infer.py line by line; exit 1 if any tokens differ.

    python launch/compare_outputs.py served-ep2.jsonl served-ep1.jsonl
"""
import json
import sys


def main(a: str, b: str) -> int:
    with open(a) as fa, open(b) as fb:
        left, right = [json.loads(line) for line in fa], [json.loads(line) for line in fb]
    if len(left) != len(right):
        print(f"{a} has {len(left)} results, {b} has {len(right)}")
        return 1
    same = 0
    for i, (x, y) in enumerate(zip(left, right)):
        ok = x.get("token_ids") == y.get("token_ids")
        same += ok
        text = x.get("text") if x.get("text") is not None else x.get("token_ids")
        print(f"[{'same' if ok else 'DIFFERENT'}] #{i}: {str(text)[:70]!r}")
    print(f"{same}/{len(left)} results token-identical between {a} and {b}")
    return 0 if same == len(left) else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
