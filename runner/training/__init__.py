"""Tooling outside the runtime path: speech synthesis with espeak-ng (`corpus`), NeMo model recipes
and short training runs (`recipes`), and the recipe of the bundled demo model (`demo_recipe`).
Used by tests, benchmarks and to rebuild the demo model; never imported by a job."""
