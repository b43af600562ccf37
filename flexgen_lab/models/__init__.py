"""Model shapes, tensor math and weight sources (the bottom of the import graph)."""
