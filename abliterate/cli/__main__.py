"""``python -m abliterate.cli``: the same as the ``abliterate`` script."""

import sys

from abliterate.cli.commands import main

sys.exit(main())
