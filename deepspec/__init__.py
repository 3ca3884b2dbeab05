"""deepspec: train and evaluate speculative-decoding draft models against a frozen target."""

__version__ = "0.1.0"
