"""The `leuk` command line."""
import typer
app = typer.Typer()
