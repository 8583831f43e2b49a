"""What the user gives: NeMo JSONL manifests (`manifest`) and the audio they name (`audio`: decode,
resample, cut by offset/duration). Used by the int8 layer (calibration samples) and by jobs."""
