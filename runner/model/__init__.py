"""The model layer: what a NeMo CTC model is (`arch`), its plain-torch rebuild (`features`, `conv`,
`conformer`, `ctc`), CTC decoding to text (`decoding`, `transcribe`) and to words with times and
confidence (`words`), and reading `.nemo` archives (`nemo_archive`, `nemo_config` for config ->
description, and `nemo_loader`, the only module that may import NeMo, on the driver only). Imports
nothing above it; torch only on workers."""
