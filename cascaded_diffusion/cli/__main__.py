"""``python -m cascaded_diffusion.cli`` (torchrun uses this form)."""

import sys

from .main import main

sys.exit(main())
