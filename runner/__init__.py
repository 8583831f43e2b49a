"""int8 batch transcription for NeMo CTC models on CPU clusters.

Layers, each a subpackage that imports only the ones below it:
  runner.cli       the `asr-runner` commands, progress, compare, demo
  runner.job       spec, plan, run folder, orchestration, stats, the Ray pool, the worker
  runner.int8      engines, observers, calibration, accuracy gate, artifact, self-check, cache
  runner.model     model description, plain-torch rebuild, CTC decoding, the .nemo loader
  runner.inputs    manifests and audio
and a few shared modules at the top (errors, timing, sysinfo, metrics). `runner.training`
(espeak-ng corpus, NeMo recipes, the demo model's recipe) is tooling outside the runtime path.

Importing this package is cheap: it never imports NeMo or Ray. NeMo is imported only by
`runner.model.nemo_loader` (driver side), Ray only by `runner.job.ray_pool`.
"""

__version__ = "0.1.0"
