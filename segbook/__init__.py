"""A reproducible research book on ISTR and Mask Transfiner: read the derivations, run them, trust the numbers.

Modules:

- `segbook.evaluation`: From torchvision-style predictions to COCO results, COCO box/mask AP with pycocotools, and the Boundary AP (AP^B) that Mask Transfiner reports next to mask AP."""

__version__ = "0.1.0"
