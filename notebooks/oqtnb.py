"""Shared helpers for oqt's notebooks: run the `oqt` binary, read its JSON,
and show figures and tables that `run.py` can check after execution.

Every notebook starts with `from oqtnb import *`. The mode comes from the
environment (`run.py --mode` sets it): `OQT_NOTEBOOK_MODE=quick` (default; a
few eval chunks, a few steps — what CI executes) or `full` (the settings
BENCHMARKS.md's figures were measured with).
"""

from __future__ import annotations

import html
import io
import json
import os
import pathlib
import shutil
import subprocess
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from IPython.display import HTML, Image, display  # noqa: E402

NOTEBOOKS = pathlib.Path(__file__).resolve().parent
ROOT = NOTEBOOKS.parent
MODE = os.environ.get("OQT_NOTEBOOK_MODE", "quick")
if MODE not in ("quick", "full"):
    raise ValueError(f"OQT_NOTEBOOK_MODE={MODE!r}: expected `quick` or `full`")
QUICK = MODE == "quick"
# Bundles, reports and TensorBoard runs go here (kept between runs: delete to redo).
WORK = pathlib.Path(os.environ.get("OQT_NOTEBOOK_WORK", ROOT / "target" / "notebooks" / MODE))
WORK.mkdir(parents=True, exist_ok=True)
# Committed results of runs too long for a notebook (e.g. the llama.cpp side-by-side).
DATA = NOTEBOOKS / "data"
if "OQT_DATA" not in os.environ and (ROOT.parent / "shared" / "datasets").is_dir():
    os.environ["OQT_DATA"] = str(ROOT.parent / "shared" / "datasets")


def oqt_binary() -> pathlib.Path:
    """`$OQT_BIN`, else the release build, else the debug build."""
    if "OQT_BIN" in os.environ:
        return pathlib.Path(os.environ["OQT_BIN"])
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "oqt"
        if p.exists():
            return p
    raise FileNotFoundError("no oqt binary: run `cargo build --release -p oqt-cli` or set OQT_BIN")


def oqt(*args):
    """Run `oqt ARGS… --json` and return the parsed JSON.

    A failure raises with oqt's own error message, so the notebook cell shows it.
    """
    cmd = [str(oqt_binary()), *map(str, args), "--json"]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=WORK)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd[1:])}` exited with {proc.returncode}:\n{proc.stderr.strip()[-2000:]}"
        )
    shown = [str(a).replace(f"{WORK}/", "") for a in args[:3]]  # no machine paths in saved outputs
    print(f"oqt {' '.join(shown)} … ({time.time() - started:.1f} s)")
    return json.loads(proc.stdout)


def cached_json(path: pathlib.Path, make):
    """The JSON at `path` if a previous run wrote it, else `make()` saved there."""
    path = pathlib.Path(path)
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)
    return value


def rtn_bundle(recipe: str) -> pathlib.Path:
    """The default model quantized with RTN on `recipe`, made once and shared by
    the notebooks (quick mode calibrates static recipes on 4 × 128 tokens)."""
    path = WORK / "bundles" / f"{recipe}.rtn.oqt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        calib = ["--calib-samples", "4", "--calib-seq-len", "128"] if QUICK else []
        oqt("quantize", "--recipe", recipe, "smollm2-135m", "--method", "rtn", "--no-eval", *calib, "--output", path)
    return path


def workdir(notebook: str) -> pathlib.Path:
    """This notebook's own folder under WORK (notebooks never share outputs)."""
    path = WORK / notebook
    path.mkdir(parents=True, exist_ok=True)
    return path


def fresh_dir(path: pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def show_figure(fig) -> None:
    """Display `fig` as a PNG after checking that every axes holds data.

    An axes without lines, points, bars or images is an error: a plot that
    silently lost its data must fail the notebook, not render blank.
    """
    axes = [ax for ax in fig.get_axes() if ax.get_label() != "<colorbar>"]
    if not axes:
        raise AssertionError("figure has no axes")
    for ax in axes:
        points = sum(len(line.get_xdata()) for line in ax.get_lines())
        points += sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets"))
        points += len(ax.patches) + len(ax.images)
        if points == 0:
            raise AssertionError(f"axes {ax.get_title()!r} has no data")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue(), format="png"))


def show_table(rows: list[dict], columns: list[str], expected_rows: int, title: str = "") -> None:
    """Display rows as an HTML table; `expected_rows` is asserted here and
    recorded in the table so `run.py` can check the executed output too."""
    if len(rows) != expected_rows:
        raise AssertionError(f"table {title!r}: {len(rows)} rows, expected {expected_rows}")

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return html.escape("—" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    caption = f"<caption>{html.escape(title)}</caption>" if title else ""
    display(
        HTML(
            f'<table class="oqt-table" data-expected-rows="{expected_rows}">{caption}'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )
    )


def tensorboard_scalars(logdir: pathlib.Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar series in a TensorBoard run: tag → [(step, value, wall time)],
    read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


__all__ = [
    "DATA",
    "MODE",
    "NOTEBOOKS",
    "QUICK",
    "ROOT",
    "WORK",
    "cached_json",
    "fresh_dir",
    "json",
    "oqt",
    "oqt_binary",
    "pathlib",
    "plt",
    "rtn_bundle",
    "show_figure",
    "show_table",
    "tensorboard_scalars",
    "workdir",
]
