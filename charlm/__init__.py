"""charlm: character-level language models (multi-layer LSTM/GRU/RNN), from corpus to samples."""

__version__ = "0.1.0"
