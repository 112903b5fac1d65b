"""``python -m abliterate.vast ...`` = ``abliterate-vast ...``."""

import sys

from abliterate.vast.cli import main

sys.exit(main())
