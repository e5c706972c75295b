"""The vector index: SQLite store with a FAISS cache, the FAISS kind choice, bulk build from features."""
