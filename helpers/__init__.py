"""helpers: a toolkit for content-based image retrieval.

Modules (one concept each): ``data``, ``models``, ``embedding``, ``search``, ``metrics``, ``submission``,
``pipeline``, ``viz``, ``demo``, ``cli``. Heavy libraries (faiss, transformers, open_clip) are imported lazily.
"""

__version__ = "0.1.0"
