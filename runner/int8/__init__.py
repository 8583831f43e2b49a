"""The int8 layer: settings validated in one place (`config`), engines and activation bits per CPU
(`engines`), activation observers and the torch.ao glue (`observers`, `model`, `conv_family`,
`conformer_family`), calibration samples (`samples`), the accuracy gate (`gate`), the pipeline that
quantizes once and proves it (`pipeline`), from files to an artifact through the on-disk cache (`make`,
`cache`), the artifact workers load (`artifact`) and their self-check (`self_check`). Imports the model
and inputs layers, never the job layer or Ray."""
