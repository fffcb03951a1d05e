"""``python -m hf_svdq.cli``."""

import sys

from .main import main

sys.exit(main())
