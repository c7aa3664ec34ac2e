"""``python -m fusedres``: the main job (see fusedres.report)."""

import sys

from fusedres.report import main

sys.exit(main())
