"""The engine: runs a planned request piece by piece on a resident model."""
