"""`python -m runner.cli`: the `asr-runner` command."""

from runner.cli.main import console

console()
