"""crowdd: donate idle machines to train neural networks together."""

__version__ = "0.1.0"
