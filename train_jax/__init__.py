"""Cross-Modal Mapping (CMM) few-shot training in pure JAX on cached CLIP features.

Run ``python -m train_jax --help``. Nothing is imported here so that ``python -m train_jax.report`` stays light.
"""
