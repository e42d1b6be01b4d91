"""`python -m producer.cli` runs the command-line tool (as `python -m bgq` does)."""

from producer.cli import main

main()
