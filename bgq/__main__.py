"""`python -m bgq` runs the command-line tool."""

from producer.cli import main

main()
