"""A reproducible research book on ISTR and Mask Transfiner: read the derivations, run them, trust the numbers.

Modules:

- `segbook.evaluation`: From torchvision-style predictions to COCO results, COCO box/mask AP with pycocotools, and the Boundary AP (AP^B) that Mask Transfiner reports next to mask AP.
- `segbook.reproduce`: `segbook reproduce`: run every experiment notebook under `nbs/experiments/` with papermill, with the parameters of one profile, and gather its figures, tables and a stamped `results.json`."""

__version__ = "0.1.0"
