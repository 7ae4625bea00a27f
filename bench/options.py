"""The command-line options the benches share, declared once: `parser(__doc__)` and the groups below.

A bench is run as a script from the repository root (`PYTHONPATH=. python bench/NAME.py ...`), so this folder is
on its path and `from options import ...` finds this file. Only argparse here: the GPU machine's benches import
it too.
"""

from __future__ import annotations

import argparse


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench's parser, described by the first line of its docstring."""
    return argparse.ArgumentParser(description=doc.strip().splitlines()[0] if doc else None)


def add_config(p: argparse.ArgumentParser, *, shards: bool = True) -> None:
    """`--shards DIR` (required; left out with `shards=False`), `--config` (a preset or YAML file, `shapes` by
    default) and `--set section.field=value` (repeatable), for `mrcnn.config.load_config(args.config, args.set)`."""
    if shards:
        p.add_argument("--shards", required=True, help="a shard set (mrcnn-cli preprocess)")
    p.add_argument("--config", default="shapes", help="preset (coco, shapes, torchvision) or a YAML file")
    p.add_argument("--set", action="append", default=[], help="override, repeatable: section.field=value")


def add_threads(p: argparse.ArgumentParser, *, default: int = 1, help: str = "torch threads") -> None:
    """`--threads N`: torch's intra-op threads (one by default: the 2-core box is shared)."""
    p.add_argument("--threads", type=int, default=default, help=help)


def add_sample(p: argparse.ArgumentParser, *, preset: str = "coco", images: int = 128,
               images_help: str | None = None) -> None:
    """`--preset`, `--images N` (how many to measure on) and `--json PATH` (also write the numbers there)."""
    p.add_argument("--preset", default=preset)
    p.add_argument("--images", type=int, default=images, help=images_help)
    p.add_argument("--json", default=None, help="also write the numbers here")
