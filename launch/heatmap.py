"""Render a run's expert load (layer x expert) as a PNG.

    python launch/heatmap.py outputs/default -o heat.png [--last N] [--share]

Reads OUTPUT_DIR/metrics.jsonl (or a checkpoint's epkit_plan.json) and sums the tokens routed to each
expert of each layer over the run (or its last N logged steps). Needs matplotlib.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def load_counts(source: str, last: int | None) -> tuple[list[list[float]], str]:
    """[layer][expert] token counts and a description of where they come from."""
    from epkit.checkpoint import Manifest
    manifest = Manifest.read(source) if os.path.isdir(source) else None
    if manifest is not None:
        if not manifest.routed_tokens:
            raise ValueError(f"{manifest.file}: no routed_tokens recorded")
        return manifest.routed_tokens, f"{source} (checkpoint routing statistics)"
    from epkit.train.metrics import read_metrics
    rows = [r for r in read_metrics(source) if "expert_tokens" in r]
    if not rows:
        raise ValueError(f"{source}: metrics.jsonl has no expert_tokens records")
    if last:
        rows = rows[-last:]
    counts = [[0.0] * len(row) for row in rows[0]["expert_tokens"]]
    for r in rows:
        for layer, row in enumerate(r["expert_tokens"]):
            for e, c in enumerate(row):
                counts[layer][e] += c
    return counts, f"{source}, steps {rows[0]['step']}-{rows[-1]['step']}"


def render(counts: list[list[float]], title: str, out: str, share: bool) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("launch/heatmap.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if share:  # fraction of the layer's routed tokens; 1/E is perfect balance
        counts = [[c / max(1.0, sum(row)) for c in row] for row in counts]
    L, E = len(counts), len(counts[0])
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * E, 1.2 + 0.45 * L))
    im = ax.imshow(counts, cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(E))
    ax.set_yticks(range(L))
    ax.set_title(title, fontsize=8)
    top = max(max(row) for row in counts) or 1.0
    if L * E <= 512:
        for layer in range(L):
            for e in range(E):
                v = counts[layer][e]
                ax.text(e, layer, f"{v:.2f}" if share else f"{v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 * top else "black")
    fig.colorbar(im, ax=ax, label="share of routed tokens" if share else "routed tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="training output directory (metrics.jsonl) or a checkpoint directory")
    p.add_argument("-o", "--output", default="heat.png", help="PNG file to write")
    p.add_argument("--last", type=int, default=None, help="only the last N logged steps")
    p.add_argument("--share", action="store_true", help="plot each expert's share of its layer's tokens")
    a = p.parse_args(argv)
    try:
        counts, where = load_counts(a.run_dir, a.last)
        render(counts, f"expert load: {where}", a.output, a.share)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output} ({len(counts)} layers x {len(counts[0])} experts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
