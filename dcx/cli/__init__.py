"""The command line: Typer apps, one module per command group; output.py owns all printing."""
