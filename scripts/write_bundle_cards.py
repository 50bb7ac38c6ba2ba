"""Write the model card (README.md) and its per-stage grid (grid.png) of every bundled cascade, exactly as
`cdm export --pretrained NAME` writes them (tests/test_sharing.py checks the committed cards against the card
writer). Run after changing a bundle's cascade.json or the card writer:

    OMP_NUM_THREADS=1 python scripts/write_bundle_cards.py [NAME ...]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from cascaded_diffusion.modelcard import CARD_FILE, GRID_FILE
from cascaded_diffusion.pretrained import PRETRAINED_ROOT, available_pretrained
from cascaded_diffusion.sharing import export_cascade


def main(names: list[str]) -> None:
    for name in names or available_pretrained():
        with tempfile.TemporaryDirectory() as tmp:
            result = export_cascade(Path(tmp) / name, pretrained=name)
            for filename in (CARD_FILE, GRID_FILE):
                shutil.copyfile(result.out / filename, PRETRAINED_ROOT / name / filename)
        print(f"{name}: wrote {CARD_FILE} and {GRID_FILE} in {result.seconds:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
