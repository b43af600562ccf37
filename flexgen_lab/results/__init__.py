"""Results: the SQLite store every run is written to, and the tables printed from it."""
