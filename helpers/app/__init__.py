"""A search page in the browser over a persisted collection (``python -m helpers app --index INDEX_DIR``): query by
an image (file picker, drag and drop, paste), by text (CLIP models) or by clicking a result, with a JSON API beside
it. FastAPI is imported only when the app is built."""

from .service import AppError, SearchService, search_service
from .web import create_app

__all__ = ["AppError", "SearchService", "create_app", "search_service"]
