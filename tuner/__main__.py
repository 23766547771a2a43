"""`python -m tuner ...`: the alt-tune command line (tuner/cli.py).

Entry point: tuner.cli.run.
"""
from tuner.cli import run

run()
