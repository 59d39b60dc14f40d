"""Large collections: embeddings persisted in float16 shards, built resumably by the local engine or Ray Data,
indexed with a FAISS index chosen to fit a memory budget, searched by image or text.

``build_collection(out, images=[...])``, ``add_to_collection(out)``, ``Index.open(out).search(...)``,
``retrieve_with_index(data, out)``; the command line is ``python -m helpers index build|add|search``.
"""

from .build import EngineOptions, add_to_collection, build_collection
from .chooser import choose_index, parse_memory
from .index import Index, SearchResult
from .retrieve import retrieve_with_index

__all__ = ["EngineOptions", "Index", "SearchResult", "add_to_collection", "build_collection", "choose_index",
           "parse_memory", "retrieve_with_index"]
