"""python -m device COMMAND: the device's command line.

  serve            run the service (camera, analysis, page) — what systemd and `make demo` run
  analyze          analyse saved field images (JSON, annotated copies, slide result)
  cells            classify single-cell images with a .tflite model (accuracy when labelled)
  evaluate-fields  measure segmentation/counting on annotated fields
  check-config     validate a config file without starting anything
  hash-password    make an admin password hash for the config
"""

from __future__ import annotations

import sys

from device.cli import main

if __name__ == "__main__":
    sys.exit(main())
