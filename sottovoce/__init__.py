"""sottovoce: private post-training of language models across data holders."""

__version__ = "0.1.0"
