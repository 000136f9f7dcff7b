"""python -m convert --model RUN_DIR/model.keras --data DIR --out models/

Writes an int8 model (a colour norm's few operations in float; uint8 input and output) and its model card;
refuses a model that loses accuracy in quantisation or uses ops the deployed runtimes cannot run.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("convert")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, nargs="+",
                    help="the trained model.keras (its run folder holds split.json); several: an ensemble, the "
                         "mean logit of runs trained on one patient split, in one model (each costs one pass)")
    ap.add_argument("--data", required=True, help="NIH cell folder (Parasitized/, Uninfected/, patients.csv)")
    ap.add_argument("--out", required=True, help="folder to write <name>.tflite and <name>.json into")
    ap.add_argument("--name", default="cellnet_int8", help="model file stem (default cellnet_int8)")
    # Calibration sets the int8 activation ranges. On the model shipped until 2026-12-01 (one run), int8
    # validation accuracy was 0.9749 with 400 or 700 cells and 0.9752-0.9756 with 1,000 to 3,000 (Keras: 0.9756).
    ap.add_argument("--representative", type=int, default=1000,
                    help="training-patient cells drawn for int8 calibration (default 1000)")
    ap.add_argument("--bias-cells", type=int, default=2000,
                    help="other training-patient cells the int8 logit's mean error against float32 is measured "
                         "on, and taken off the model's last bias (default 2000; 0: no correction)")
    ap.add_argument("--target-rbc", type=int, default=2000,
                    help="RBCs per slide the threshold is optimised for (default 2000)")
    ap.add_argument("--max-drop", type=float, default=0.005, help="largest int8 accuracy drop allowed")
    ap.add_argument("--views", type=int, choices=(1, 2, 4), default=1,
                    help="average the model over 1, 2 (+ mirrored) or 4 (+ upside down, both flips) flips of "
                         "each cell, inside the converted model (default 1); each view costs one more pass")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--card-for", metavar="TFLITE",
                    help="write the card of this int8 file, converted before from the same --model members and "
                         "--seed (its card beside it says how), instead of converting again: the figures are "
                         "measured on it as on a new conversion, with today's rules. Conversion repeats its bytes on "
                         "one machine, not on another CPU (the shipped pair on an Intel machine with AMX: 339 of "
                         "149,728 bytes differ from the AMD one's), and the shipped file keeps its measurements")
    args = ap.parse_args(argv)
    if args.representative < 1:
        ap.error("--representative must be at least 1")
    if args.bias_cells < 0 or args.bias_cells == 1:  # one cell has no standard error to judge its mean by
        ap.error("--bias-cells must be 0 (no correction) or at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from convert.core import ConvertError, convert

    try:
        convert(args, argv if argv is not None else sys.argv[1:])
    except ConvertError as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
