"""Report: one row per run, best cell per column in bold by the column's direction, PNGs written."""

import json

import pytest

from prism.errors import UserError
from prism.evaluation.report import main, write_report

RUNS = {
    "target": {"verbmem_f": 58.3, "knowmem_f": 62.9, "knowmem_r": 54.3, "privleak": -98.7, "auc": 0.006},
    "npo": {"verbmem_f": 0.0, "knowmem_f": 0.0, "knowmem_r": 0.0, "privleak": 12.3, "unlearn_score": 0.0, "auc": 0.53},
    "prism": {"name": "PRISM", "verbmem_f": 18.2, "knowmem_f": 30.1, "knowmem_r": 49.9, "privleak": -4.5,
              "unlearn_score": 0.61, "auc": 0.45, "model": "smollm2", "data": "synthetic"},
}


def _write_runs(root):
    dirs = []
    for name, metrics in RUNS.items():
        d = root / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(metrics))
        dirs.append(d)
    return dirs


def _table(text):
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    body = {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows[1:]}
    return header, body


def test_report_bold_cells_and_plots(tmp_path):
    dirs = _write_runs(tmp_path)
    out = tmp_path / "report"
    path = write_report(dirs, out)
    assert path == out / "report.md"
    text = path.read_text()
    assert "lower is better" in text and "closest to 0" in text
    header, body = _table(text)
    assert [h.split()[0] for h in header] == ["model", "verbmem_f", "knowmem_f", "knowmem_r", "privleak", "unlearn_score", "auc"]
    assert set(body) == {"target", "npo", "PRISM"}  # "name" key overrides the directory name
    col = {h.split()[0]: i for i, h in enumerate(header)}
    bold = {(row, c) for row, cells in body.items() for c, i in col.items() if cells[i].startswith("**")}
    assert bold == {
        ("npo", "verbmem_f"), ("npo", "knowmem_f"),  # lowest
        ("target", "knowmem_r"),  # highest
        ("PRISM", "privleak"),  # closest to 0
        ("PRISM", "unlearn_score"),  # highest
        ("npo", "auc"),  # other numeric keys: highest
    }
    assert body["target"][col["unlearn_score"]] == "–"  # missing value
    for png in ("knowmem.png", "unlearn_score.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not list(out.glob(".*tmp"))  # no temp files left behind


def test_report_main_default_out_and_errors(tmp_path, capsys):
    dirs = _write_runs(tmp_path)
    assert main([str(d) for d in dirs]) == 0
    assert (tmp_path / "report.md").exists()  # default: the runs' common parent
    assert "report written" in capsys.readouterr().out
    with pytest.raises(UserError):
        write_report([tmp_path / "missing"], tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    with pytest.raises(UserError, match="metrics.json"):
        write_report([tmp_path / "bad"], tmp_path)
