"""The int8 layer: engines and activation bits per CPU (`engines`), activation observers and the
torch.ao glue (`observers`, `model`, `conv_family`, `conformer_family`), calibration samples
(`samples`), the accuracy gate (`gate`), the pipeline that quantizes once and proves it
(`pipeline`), the artifact workers load (`artifact`), their self-check (`self_check`) and the
on-disk cache (`cache`). Imports the model and inputs layers, never the job layer or Ray."""
