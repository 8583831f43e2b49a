"""Tooling outside the runtime path: speech synthesis with espeak-ng (`corpus`), NeMo model recipes and
short training runs (`recipes`), and the bundled demo model's recipe (`demo_recipe`, with the demo set's
grammar in `demo_corpus`, its audio in `demo_data` and its training batches in `demo_batches`). Used by
tests, benchmarks and to rebuild the demo model; never imported by a job."""
