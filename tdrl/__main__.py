"""``python -m tdrl``: the ``tdrl`` command line (:func:`tdrl.cli.main`), e.g. under
``accelerate launch -m tdrl annotate ...`` or ``torchrun -m tdrl ...``."""

import sys

from tdrl.cli import main

if __name__ == "__main__":
    sys.exit(main())
