"""The rich consoles the CLI prints to: results on stdout, errors and progress on stderr."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
