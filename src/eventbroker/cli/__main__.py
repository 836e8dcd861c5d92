"""``python -m eventbroker.cli``: the same as the ``eventbroker`` command."""

import sys

from eventbroker.cli.main import main

sys.exit(main())
