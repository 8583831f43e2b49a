"""The command line: `asr-runner` commands (`main`), live progress (`progress`), comparing runs
(`compare`), converting a run to subtitles, CTM or a manifest (`convert`, formats in `runner.export`)
and the demo (`demo`)."""
