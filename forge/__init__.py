"""What the aggregator and the workers share: the model, the codec, checkpoints.

- :mod:`forge.config`: the model's frozen config and its named sizes.
- :mod:`forge.tokenizer`: the byte-level tokenizer.
- :mod:`forge.model`: HRM-sMoE, the decoder-only language model.
- :mod:`forge.checkpoint`: safetensors checkpoint I/O with the config inside.
- :mod:`forge.codec`: the top-k update codec with error feedback.
- :mod:`forge.train`: local training of one lease, and evaluation.
"""

__version__ = "0.1.0"
