"""`python -m runner.cli`: the `asr-runner` command."""

import sys

from runner.cli.main import main

sys.exit(main())
