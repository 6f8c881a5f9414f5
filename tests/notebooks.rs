//! The notebooks in `notebooks/` execute end to end (quick mode) and show
//! what they claim: every figure holds data, every table its rows. A cell
//! that raises, an empty plot or a table with missing rows fails the run.
//! Needs Python with the packages `.ci/run` installs (matplotlib, nbclient,
//! ipykernel, tensorboard).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// `python3 notebooks/run.py ARGS` with this build's `oqt` and a private work directory.
fn run_notebooks(work: &Path, args: &[&str]) -> Output {
    let out = Command::new("python3")
        .arg(root().join("notebooks/run.py"))
        .args(args)
        .env("OQT_BIN", env!("CARGO_BIN_EXE_oqt"))
        .env("OQT_NOTEBOOK_WORK", work.join("work"))
        .env_remove("OQT_LOG")
        .output()
        .expect("python3 runs");
    if out.status.code().is_none() {
        panic!("run.py was killed: {out:?}");
    }
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// PNG figures in an executed notebook, counted independently of run.py's check.
fn figures_in(executed: &Path) -> usize {
    let nb: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(executed).unwrap()).unwrap();
    nb["cells"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["outputs"].as_array().cloned().unwrap_or_default())
        .filter(|o| o["data"]["image/png"].as_str().is_some_and(|s| s.len() > 2000))
        .count()
}

#[test]
fn every_notebook_executes_in_quick_mode_and_each_figure_holds_data() {
    let dir = tempfile::tempdir().unwrap();
    let executed = dir.path().join("executed");
    let out = run_notebooks(dir.path(), &["--mode", "quick", "--out", executed.to_str().unwrap()]);
    let log = text(&out);
    assert!(out.status.success(), "notebooks failed:\n{log}");
    let mut names: Vec<_> = std::fs::read_dir(root().join("notebooks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ipynb"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "notebooks: {names:?}");
    for nb in &names {
        let name = nb.file_name().unwrap();
        assert!(
            log.contains(&format!("{}: ok", name.to_string_lossy())),
            "{name:?} not reported ok:\n{log}"
        );
        assert!(
            figures_in(&executed.join(name)) >= 1,
            "{name:?}: no figure in the executed notebook"
        );
    }
}

/// A notebook of one markdown-free code cell per entry.
fn write_notebook(path: &Path, cells: &[&str]) {
    let cells: Vec<_> = cells
        .iter()
        .enumerate()
        .map(|(i, src)| {
            serde_json::json!({"cell_type": "code", "execution_count": null, "id": format!("c{i}"),
                               "metadata": {}, "outputs": [], "source": src})
        })
        .collect();
    let nb = serde_json::json!({
        "cells": cells, "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}
    });
    std::fs::write(path, serde_json::to_string(&nb).unwrap()).unwrap();
}

#[test]
fn a_raising_cell_an_empty_plot_a_blank_image_or_a_short_table_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let plot = "from oqtnb import *\nfig, ax = plt.subplots()\nax.plot([1, 2, 3], [3, 1, 2])\nshow_figure(fig)";
    let cases = [
        (
            "raises",
            vec![plot, "raise ValueError('a deliberately broken cell')"],
            "ValueError: a deliberately broken cell",
        ),
        (
            "empty_plot",
            vec!["from oqtnb import *\nfig, ax = plt.subplots()\nax.set_title('nothing')\nshow_figure(fig)"],
            "axes 'nothing' has no data",
        ),
        (
            // A PNG displayed without show_figure: run.py itself finds it blank.
            "blank_image",
            vec![
                "import io, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nfrom IPython.display import Image, display\nfig = plt.figure(figsize=(4, 3))\nbuf = io.BytesIO()\nfig.savefig(buf, format='png')\ndisplay(Image(data=buf.getvalue(), format='png'))",
            ],
            "is empty",
        ),
        (
            "short_table",
            vec![
                plot,
                "from IPython.display import HTML, display\ndisplay(HTML('<table class=\"oqt-table\" data-expected-rows=\"3\"><tbody><tr><td>1</td></tr></tbody></table>'))",
            ],
            "table with 1 rows, expected 3",
        ),
        ("no_figure", vec!["print('no plot here')"], "no figure was displayed"),
    ];
    for (name, cells, expected) in cases {
        let nb = dir.path().join(format!("{name}.ipynb"));
        write_notebook(&nb, &cells);
        let out = run_notebooks(
            dir.path(),
            &[nb.to_str().unwrap(), "--out", dir.path().join("out").to_str().unwrap()],
        );
        let log = text(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {log}");
        assert!(
            log.contains(&format!("{name}.ipynb: FAILED")) && log.contains(expected),
            "{name}: expected {expected:?} in:\n{log}"
        );
    }
    // The control: the plot alone passes.
    let nb = dir.path().join("good.ipynb");
    write_notebook(&nb, &[plot]);
    let out = run_notebooks(
        dir.path(),
        &[nb.to_str().unwrap(), "--out", dir.path().join("out").to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
}
