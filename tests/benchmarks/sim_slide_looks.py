"""How often a parasite-free slide reads positive when its call is looked at after every field.

    python tests/benchmarks/sim_slide_looks.py [--cells-per-field 150] [--slides 200000]
        [--stop 2100 4050 10050 30000] [--target 2000] [--model-card models/cellnet_int8.json]

False positives per field ~ Binomial(cells per field, f), f the card's `call_false_positive_rate`; after
each field the call is made as the device makes it (`device.slide.summarize_slide`). Prints, for each
stopping count, the share of slides positive at some look and at the end. A simulation, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from device.slide import summarize_slide

    ap = argparse.ArgumentParser()
    ap.add_argument("--cells-per-field", type=int, default=150)
    ap.add_argument("--slides", type=int, default=200_000)
    ap.add_argument("--stop", type=int, nargs="+", default=[2100, 4050, 10050, 30000])
    ap.add_argument("--target", type=int, default=2000)
    ap.add_argument("--model-card", default=str(ROOT / "models" / "cellnet_int8.json"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    card = json.loads(Path(args.model_card).read_text())
    f = float(card["call_false_positive_rate"])
    rng = np.random.default_rng(args.seed)
    print(f"false-positive rate per healthy cell f = {f:.5f} ({args.model_card}), {args.slides} slides each")
    for stop in args.stop:
        n_fields = -(-stop // args.cells_per_field)
        flagged = rng.binomial(args.cells_per_field, f, size=(args.slides, n_fields)).cumsum(axis=1)
        ever = np.zeros(args.slides, bool)
        for j in range(n_fields):
            n = args.cells_per_field * (j + 1)
            cutoff = summarize_slide(n, 0, threshold=card["threshold"], fp_rate_per_cell=f,
                                     target_rbc=args.target).positive_cutoff_cells
            ever |= flagged[:, j] >= cutoff
        end = flagged[:, -1] >= cutoff
        print(f"counted to {args.cells_per_field * n_fields:6d} cells: positive at some look {ever.mean():.4f}, "
              f"at the end {end.mean():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
