"""persrec: sequential recommendation over long user histories with personalized expert tokens."""

__version__ = "0.1.0"
