"""The Flower adapter: the only place that touches Flower internals (patches.py lists every change)."""
