"""``python -m mixnn_fast ...`` is the ``mixnn`` command (e.g. under ``torchrun -m mixnn_fast train``)."""
import sys

from mixnn_fast.app.cli import main

sys.exit(main())
