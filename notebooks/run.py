#!/usr/bin/env python3
"""Execute oqt's notebooks and check what they show.

usage: notebooks/run.py [--mode quick|full] [--write] [--out DIR] [NOTEBOOK ...]

Executes each notebook (default: every `notebooks/*.ipynb`) top to bottom with
`OQT_NOTEBOOK_MODE` set, then reads the executed notebook back and checks it:

* no cell raised (the first error is printed with its cell and traceback);
* every cell that displays a figure produced a PNG that is not blank;
* every table (`oqtnb.show_table`) has as many body rows as it declares;
* every notebook shows at least one figure.

`--write` saves the executed notebooks in place (how the committed outputs are
made); otherwise they go to `--out` (default: target/notebooks/executed).
Exit status 0 only when every notebook passes.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import pathlib
import re
import sys
import time

NOTEBOOKS = pathlib.Path(__file__).resolve().parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


def check_png(data: bytes) -> str | None:
    """None when the PNG shows something; else why not."""
    import matplotlib.image as mpimg
    import numpy as np

    if len(data) < 2000:
        return f"PNG of {len(data)} bytes"
    img = mpimg.imread(io.BytesIO(data), format="png")
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2)
    # A blank canvas is one colour; a plot with data has many distinct levels.
    if np.unique(np.round(img, 2)).size < 4:
        return "the image is blank"
    return None


def check_executed(nb, name: str) -> list[str]:
    problems = []
    figures = 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        where = f"{name}, cell {index}"
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                problems.append(f"{where}: {out.ename}: {ANSI.sub('', out.evalue)}")
            data = out.get("data", {})
            if "image/png" in data:
                figures += 1
                why = check_png(base64.b64decode(data["image/png"]))
                if why:
                    problems.append(f"{where}: figure {figures} is empty ({why})")
            table = data.get("text/html", "")
            if isinstance(table, list):
                table = "".join(table)
            for m in re.finditer(r'<table class="oqt-table" data-expected-rows="(\d+)">(.*?)</table>', table, re.S):
                expected = int(m.group(1))
                body = re.search(r"<tbody>(.*)</tbody>", m.group(2), re.S)
                rows = body.group(1).count("<tr>") if body else 0
                if rows != expected or rows == 0:
                    problems.append(f"{where}: table with {rows} rows, expected {expected}")
    if figures == 0:
        problems.append(f"{name}: no figure was displayed")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", type=pathlib.Path)
    ap.add_argument("--mode", choices=["quick", "full"], default="quick")
    ap.add_argument("--write", action="store_true", help="save executed notebooks in place")
    ap.add_argument("--out", type=pathlib.Path, help="where executed notebooks go (without --write)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds a cell may run")
    args = ap.parse_args()

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    out_dir = args.out or NOTEBOOKS.parent / "target" / "notebooks" / "executed"
    os.environ["OQT_NOTEBOOK_MODE"] = args.mode
    # Kernels import the helpers (`from oqtnb import *`) wherever the notebook lives.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NOTEBOOKS), os.environ.get("PYTHONPATH")]))
    failed = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        started = time.time()
        client = NotebookClient(
            nb,
            timeout=args.timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.resolve().parent)}},
        )
        problems = []
        try:
            client.execute()
        except CellExecutionError as e:
            # nbclient stops at the failing cell; the message names it and shows the traceback.
            problems.append(f"{path.name}: a cell raised:\n{ANSI.sub('', str(e))}")
        problems += check_executed(nb, path.name)
        # A failed run never overwrites the committed notebook.
        target = path if args.write and not problems else out_dir / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
        status = "ok" if not problems else "FAILED"
        print(f"{path.name}: {status} ({args.mode} mode, {time.time() - started:.0f} s) → {target}")
        for p in problems:
            print(f"  {p}")
        if problems:
            failed.append(path.name)
    if failed:
        print(f"{len(failed)} of {len(paths)} notebooks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"{len(paths)} notebooks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
