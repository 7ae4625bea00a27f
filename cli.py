"""mrcnn-cli: the command line of mrcnn-pipeline (thin: each command calls a function in pipelines/)."""

import typer

app = typer.Typer(no_args_is_help=True, help="Mask R-CNN training as a distributed pipeline on Ray.")
