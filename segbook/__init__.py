"""A reproducible research book on ISTR and Mask Transfiner: read the derivations, run them, trust the numbers.

Modules:

- `segbook.evaluation`: From torchvision-style predictions to COCO results, COCO box/mask AP with pycocotools, and the Boundary AP (AP^B) that Mask Transfiner reports next to mask AP.
- `segbook.io`: Every file segbook writes — checkpoints, codecs, configs, metrics, results JSON, tables, figures — goes through one function, so a killed run or two concurrent writers never leave a half-written file behind.
- `segbook.pretrain`: Both papers start from an ImageNet-pretrained ResNet-50 and fine-tune for 36 epochs on COCO. This chapter makes the stand-in that a 2-core CPU can afford: a ResNet-18 trained once, by dense prediction, on its own shapes images, and committed as a small file every trained experiment starts from.
- `segbook.reproduce`: `segbook reproduce`: run every experiment notebook under `nbs/experiments/` with papermill, with the parameters of one profile, and gather its figures, tables and a stamped `results.json`."""

__version__ = "0.1.0"
