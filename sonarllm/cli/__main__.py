"""``python -m sonarllm.cli ...``: the ``sonarllm`` command."""

import sys

from sonarllm.cli import main

sys.exit(main())
