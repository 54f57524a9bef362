"""The seed text's claims about the dropout family, re-measured on package-shipped data, with plots.

``python -m bench.experiments`` regenerates every figure and ``docs/evidence.md`` from scratch (seeds fixed).
Each experiment is one module with a ``run(context) -> Finding`` function; the finding's text is derived
from the measured numbers, including where they contradict the seed. Not a test: nothing here asserts.
"""
