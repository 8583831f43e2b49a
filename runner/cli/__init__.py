"""The command line: `asr-runner` commands (`main`), live progress (`progress`), comparing runs
(`compare`) and the demo (`demo`)."""
