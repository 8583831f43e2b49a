"""int8 batch transcription for NeMo CTC models on CPU clusters.

Importing this package is cheap: it never imports NeMo or Ray. NeMo is imported only by
`runner.nemo_loader` (driver side), Ray only by the orchestration module.
"""

__version__ = "0.1.0"
