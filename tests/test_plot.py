"""plot.py: the numbers each figure draws, against values worked out by hand from small synthetic
inputs; the PNGs (valid, written atomically); one-line errors. The figures are read back from
matplotlib's artists, so a figure that drops or mislabels what the extraction got right fails too."""
import json
import sys

import numpy as np
import pytest

import plot
from conftest import run_script

PNG = b"\x89PNG\r\n\x1a\n"  # the 8 bytes every PNG file starts with


@pytest.fixture(scope="module")
def plt():
    return plot.pyplot()


def write_run(folder, rows):
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# step 0: validation only; step 3: training and validation in one row (as train.py writes them)
RUN = [{"step": 0, "val_nats_per_token": 9.0, "val_ppl_bound": 8103.1},
       {"step": 1, "loss": 10.0, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 100.0},
       {"step": 2, "loss": 8.0, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 100.0},
       {"step": 3, "loss": 6.0, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 100.0,
        "val_nats_per_token": 7.0, "val_ppl_bound": 1096.6},
       {"step": 4, "loss": 4.0, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 100.0}]

CURVE = {"checkpoints": ["a", "b"], "n_texts": 100, "estimator": "time", "z": 2.0, "rows": [
    {"setting": "fixed K=4", "k": 4, "max_draws": 4, "mean_draws": 4.0, "accuracy": 0.8, "accuracy_ci95": [0.7, 0.85]},
    {"setting": "fixed K=1", "k": 1, "max_draws": 1, "mean_draws": 1.0, "accuracy": 0.6, "accuracy_ci95": [0.5, 0.7]},
    {"setting": "sequential K=2..8 z=2", "k": 2, "max_draws": 8, "mean_draws": 3.0, "accuracy": 0.82,
     "accuracy_ci95": [0.74, 0.88]}]}


def classify_json(labels_as_names: bool) -> dict:
    """Overconfident at 0.91 (10 texts, half right: accuracy 0.5), underconfident at 0.71 (10 texts, all
    right: accuracy 1), and 2 unlabeled texts at 0.99 that must not count."""
    rows = [([0.91, 0.09], i % 2) for i in range(10)] + [([0.29, 0.71], 1)] * 10
    names = ["neg", "pos"]
    texts = [{"label": names[y] if labels_as_names else y, "pred": 0, "posterior": p} for p, y in rows]
    texts += [{"label": None, "pred": "neg", "posterior": [0.99, 0.01]}, {"pred": "neg", "posterior": [0.99, 0.01]}]
    return {"classes": names, "accuracy": 0.75, "temperature": 2.0, "texts": texts}


def test_training_series_and_figure(tmp_path, plt):
    series = plot.training_series(write_run(tmp_path / "A0", RUN) / "log.jsonl")
    assert series["train"][0].tolist() == [1, 2, 3, 4] and series["train"][1].tolist() == [10, 8, 6, 4]
    assert series["val"][0].tolist() == [0, 3] and series["val"][1].tolist() == [9, 7]
    assert plot.running_mean(np.array([10.0, 8, 6, 4]), window=2).tolist() == [10, 9, 7, 5]
    assert plot.running_mean(np.array([10.0, 8, 6, 4])).tolist() == [10, 9, 8, 7]  # window 25 > 4 steps

    other = {"train": (np.array([1.0, 2]), np.array([5.0, 5])), "val": (np.array([2.0]), np.array([4.5]))}
    ax = plot.training_figure(plt, [("A0", series), ("B1", other)]).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["A0: validation NELBO"].get_xdata().tolist() == [0, 3]
    assert lines["A0: validation NELBO"].get_ydata().tolist() == [9, 7]
    assert lines["B1: validation NELBO"].get_ydata().tolist() == [4.5]
    assert lines["A0: training loss (25-step mean)"].get_ydata().tolist() == [10, 9, 8, 7]
    assert lines["B1: training loss (25-step mean)"].get_ydata().tolist() == [5, 5]
    assert lines["A0: validation NELBO"].get_color() != lines["B1: validation NELBO"].get_color()
    assert "nats/token" in ax.get_ylabel()


def test_curve_points_and_figure(plt):
    fixed, sequential = plot.curve_points(CURVE)
    assert fixed == [("fixed K=1", 1.0, 0.6, 0.5, 0.7), ("fixed K=4", 4.0, 0.8, 0.7, 0.85)]  # sorted by draws
    assert sequential == [("sequential K=2..8 z=2", 3.0, 0.82, 0.74, 0.88)]

    ax = plot.curve_figure(plt, CURVE, "curve").axes[0]
    bars = {c.get_label(): c for c in ax.containers}  # errorbar containers: (data line, caps, bar segments)
    line, _, (segments,) = bars["fixed K = 1, 4"]
    assert line.get_xdata().tolist() == [1, 4] and line.get_ydata().tolist() == [0.6, 0.8]
    np.testing.assert_allclose([s[:, 1] for s in segments.get_segments()], [[0.5, 0.7], [0.7, 0.85]])
    line, _, (segments,) = bars["sequential K=2..8 z=2"]
    assert line.get_xdata().tolist() == [3] and line.get_linestyle() == "None"  # a marker, not joined
    np.testing.assert_allclose(segments.get_segments()[0][:, 1], [0.74, 0.88])


@pytest.mark.parametrize("labels_as_names", [False, True])
def test_reliability_bins_and_figure(plt, labels_as_names):
    doc = classify_json(labels_as_names)
    probs, labels = plot.labeled_posteriors(doc, "x.json")
    assert len(labels) == 20 and labels[:4].tolist() == [0, 1, 0, 1] and labels[10:].tolist() == [1] * 10
    r = plot.reliability(probs, labels)
    # 15 bins of [0.5, 1], width 1/30: 0.71 in bin 6 = (0.7, 0.7333], 0.91 in bin 12 = (0.9, 0.9333]
    np.testing.assert_allclose(r["edges"], np.linspace(0.5, 1, 16))
    assert r["count"].tolist() == [0] * 6 + [10] + [0] * 5 + [10] + [0] * 2
    np.testing.assert_allclose(r["accuracy"][[6, 12]], [1.0, 0.5])
    np.testing.assert_allclose(r["confidence"][[6, 12]], [0.71, 0.91])
    assert np.isnan(np.delete(r["accuracy"], [6, 12])).all()
    # ECE over these bins: half the texts 0.29 under, half 0.41 over
    assert r["ece"] == pytest.approx(0.5 * abs(1.0 - 0.71) + 0.5 * abs(0.5 - 0.91))

    top, bottom = plot.reliability_figure(plt, doc, "x", "x.json").axes
    heights = np.array([bar.get_height() for bar in top.patches])
    np.testing.assert_allclose(heights[[6, 12]], [1.0, 0.5])
    assert [bar.get_height() for bar in bottom.patches] == r["count"].tolist()
    assert "ECE 0.3500 (the 15 bins of [0.5, 1] below)" in top.get_title() and "20 labeled texts" in top.get_title()
    assert bottom.get_xlabel() == "confidence = max posterior (15 bins of [0.5, 1])"  # the title's bins


def test_reliability_three_classes():
    """C = 3: the bins cover [1/3, 1]. 0.5 -> (0.5 - 1/3) / (2/3) * 15 = 3.75: bin 3; 0.95 -> 13.875: bin 13."""
    r = plot.reliability(np.array([[0.5, 0.3, 0.2], [0.95, 0.03, 0.02]]), np.array([0, 2]))
    assert r["edges"][0] == pytest.approx(1 / 3)
    assert r["count"].tolist() == [0, 0, 0, 1] + [0] * 9 + [1, 0]
    assert r["accuracy"][3] == 1 and r["accuracy"][13] == 0
    assert r["ece"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.95)


def test_ece_is_over_the_bins_drawn():
    """The ECE is over the diagram's bins of [1/C, 1], which the title names: 0.88 (right) and 0.92
    (wrong) fall in bins 11 and 12, so 0.5 * 0.12 + 0.5 * 0.92 = 0.52; over calibration.ece's bins of
    (0, 1] they would share (0.8667, 0.9333], |0.5 - 0.9| = 0.4."""
    r = plot.reliability(np.array([[0.88, 0.12], [0.92, 0.08]]), np.array([0, 1]))
    assert r["count"][[11, 12]].tolist() == [1, 1]
    assert r["ece"] == pytest.approx(0.52)


def test_cli_writes_pngs(tmp_path, capsys, monkeypatch):
    runs = [write_run(tmp_path / name, RUN) for name in ("A0", "A1")]
    for name, doc in (("curve.json", CURVE), ("c2.json", CURVE), ("out.json", classify_json(True))):
        (tmp_path / name).write_text(json.dumps(doc))
    out = tmp_path / "plots"
    drawn, draw = [], plot.training_figure  # the runs the training figure is given: named by their folders, in order

    def spy(plt, runs):
        drawn.extend(runs)
        return draw(plt, runs)

    monkeypatch.setattr(plot, "training_figure", spy)
    monkeypatch.chdir(runs[0])  # "." is a run folder too, named A0
    plot.main([".", f"{runs[1]}/", str(tmp_path / "curve.json"), str(tmp_path / "out.json"), "--out", str(out)])
    assert [name for name, _ in drawn] == ["A0", "A1"] and drawn[1][1]["val"][1].tolist() == [9, 7]
    names = ["training.png", "accuracy_vs_draws.png", "out_reliability.png"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary file left
    assert all((out / n).read_bytes().startswith(PNG) for n in names)
    # several curve JSONs: one PNG each, named by its file
    plot.main([str(tmp_path / "curve.json"), str(tmp_path / "c2.json"), "--out", str(out)])
    assert (out / "curve_accuracy_vs_draws.png").read_bytes().startswith(PNG)
    assert (out / "c2_accuracy_vs_draws.png").read_bytes().startswith(PNG)


def test_pngs_go_beside_the_first_input_without_out(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "curve.json").write_text(json.dumps(CURVE))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the current directory (a checkout) gets nothing
    plot.main([str(tmp_path / "runs" / "curve.json")])
    assert capsys.readouterr().out.split() == [str(tmp_path / "runs" / "accuracy_vs_draws.png")]
    assert (tmp_path / "runs" / "accuracy_vs_draws.png").read_bytes().startswith(PNG)
    assert not any((tmp_path / "elsewhere").iterdir())


def test_png_written_atomically(tmp_path, plt, monkeypatch):
    """A figure whose writing breaks off leaves no file under the PNG's name."""
    fig = plt.figure()

    def broken(path, **kwargs):
        open(path, "wb").write(PNG)  # half a PNG
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(OSError):
        plot.save(fig, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def error_of(tmp_path, *argv) -> str:
    """plot.main(argv) must fail with a one-line message; returns it."""
    with pytest.raises(SystemExit) as exit_:
        plot.main([str(a) for a in argv] + ["--out", str(tmp_path / "plots")])
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def test_one_line_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run\n")
    assert "notes.txt: not a run folder (log.jsonl), a variance.py --curve JSON" in \
        error_of(tmp_path, tmp_path / "notes.txt")
    assert "nothing: no such file or folder" in error_of(tmp_path, tmp_path / "nothing")
    (tmp_path / "cut.json").write_text('{"rows": [\n{"k": 1,\n')
    assert "cut.json line 3: not JSON" in error_of(tmp_path, tmp_path / "cut.json")
    write_run(tmp_path / "run", RUN[:2])
    (tmp_path / "run" / "log.jsonl").open("a").write('{"step": 2, "loss": \n')
    assert "log.jsonl line 3: not JSON" in error_of(tmp_path, tmp_path / "run")
    unlabeled = classify_json(True)
    unlabeled["texts"] = unlabeled["texts"][-2:]
    (tmp_path / "unlabeled.json").write_text(json.dumps(unlabeled))
    assert "unlabeled.json: no text has a label" in error_of(tmp_path, tmp_path / "unlabeled.json")
    (tmp_path / "short.json").write_text(json.dumps({"rows": [{"setting": "fixed K=1", "k": 1}]}))
    assert "short.json: malformed (KeyError" in error_of(tmp_path, tmp_path / "short.json")
    assert not (tmp_path / "plots").exists() or not any((tmp_path / "plots").iterdir())


def test_cli_errors_without_traceback(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run\n")
    result = run_script("plot.py", tmp_path / "notes.txt", "--out", tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'notes.txt'}: not a run folder (log.jsonl), " \
                                    "a variance.py --curve JSON, a classify.py --json, an eval.py --json or a baselines.py --json file"
    # matplotlib not installed: an import of it fails
    hide = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = run_script("plot.py", tmp_path / "notes.txt", launcher=("-c", hide))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: plot.py needs matplotlib: pip install matplotlib"


def baseline_doc(n, seed, acc):
    return {"n_train": n, "n_test": 1000, "labeled_limit": n, "seed": seed, "models": {"NB-LR": {"accuracy": acc}}}


def test_learning_curve_points_and_figure(tmp_path, plt):
    ours = [{"texts": [], "n_labeled": 500, "n_unlabeled": 74000, "accuracy": 0.8, "accuracy_ci95": [0.77, 0.82]},
            {"texts": [], "n_labeled": 100, "n_unlabeled": 74000, "accuracy": 0.7, "accuracy_ci95": [0.67, 0.73]},
            {"texts": [], "n_labeled": 500, "n_unlabeled": 0, "accuracy": 0.75, "accuracy_ci95": [0.72, 0.78]},
            {"texts": [], "n_labeled": None, "accuracy": 0.5, "accuracy_ci95": [0.4, 0.6]},  # labels unknown: left out
            {"texts": [], "n_labeled": 500, "n_unlabeled": 0, "accuracy": 0.76, "accuracy_ci95": [0.73, 0.79],
             "checkpoints": ["neg", "pos"], "init": "ckpt/base"}]  # per-class models fine-tuned from a base
    base = [baseline_doc(100, 0, 0.70), baseline_doc(100, 1, 0.74), baseline_doc(500, 0, 0.82)]
    series = plot.learning_points(ours, base)
    assert series["MDLM, label token + unlabeled texts"] == [(100, 0.7, 0.67, 0.73), (500, 0.8, 0.77, 0.82)]  # sorted by labels
    assert series["MDLM, label token, no unlabeled texts"] == [(500, 0.75, 0.72, 0.78)]
    assert series["MDLMs, one per class, from a base of p(text)"] == [(500, 0.76, 0.73, 0.79)]
    (n, acc, low, high), second = series["NB-LR"]
    assert (n, acc) == (100, pytest.approx(0.72)) and low < 0.72 < high and second[:2] == (500, 0.82)  # seeds averaged
    fig = plot.learning_figure(plt, series)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.get_legend().get_texts()) == 4
    for path, doc in (("ours.json", ours[0]), ("ours2.json", ours[1]), ("base.json", base[0])):
        (tmp_path / path).write_text(json.dumps(doc))
    result = run_script("plot.py", tmp_path / "ours.json", tmp_path / "ours2.json", tmp_path / "base.json", "--out", tmp_path / "png",
                        env={"MPLBACKEND": "Agg"})
    # classify JSONs without labeled texts cannot give a reliability diagram: the one-line error names the file
    assert result.returncode == 1 and "ours.json" in result.stderr and "Traceback" not in result.stderr
    result = run_script("plot.py", tmp_path / "base.json", "--out", tmp_path / "png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "png" / "learning_curve.png").read_bytes().startswith(PNG)


def test_by_t_figure_and_an_eval_json_without_it(tmp_path, plt):
    by_t = [{"checkpoint": c, "name": c, "t": t, "nats_per_masked_token": v}
            for c, base in (("flat", 7.0), ("reads", 4.0)) for t, v in ((0.5, base + 1), (0.1, base))]
    doc = {"checkpoints": ["flat", "reads"], "results": [{"n_texts": 5}], "texts": [], "by_t": by_t,
           "reference": {"unigram": 7.2, "bigram": 5.4}}
    fig = plot.by_t_figure(plt, doc, "x")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["reads"].get_xdata()) == [0.1, 0.5] and list(lines["reads"].get_ydata()) == [4.0, 5.0]  # sorted by t
    assert list(lines["unigram counts model: 7.200"].get_ydata()) == [7.2, 7.2]
    assert "bigram counts model: 5.400" in lines
    (tmp_path / "by_t.json").write_text(json.dumps(doc))
    (tmp_path / "plain.json").write_text(json.dumps({k: v for k, v in doc.items() if k not in ("by_t", "reference")}))
    result = run_script("plot.py", tmp_path / "by_t.json", tmp_path / "plain.json", "--out", tmp_path / "png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "png" / "by_t_by_t.png").read_bytes().startswith(PNG)
    assert "plain.json: an eval.py JSON without --by-t" in result.stderr and len(list((tmp_path / "png").iterdir())) == 1


def test_by_t_figure_leaves_a_gap_where_no_token_was_masked(plt):
    """eval.py's null (a rate that masked no token of the texts) is no point of the line."""
    by_t = [{"checkpoint": "a", "name": "a", "t": t, "nats_per_masked_token": v} for t, v in ((0.05, None), (0.5, 6.0))]
    doc = {"by_t": by_t, "reference": {"unigram": 7.2, "bigram": 5.4}, "results": [{"n_texts": 2}]}
    line = plot.by_t_figure(plt, doc, "x").axes[0].get_lines()[0]
    assert np.isnan(line.get_ydata(orig=False)[0]) and line.get_ydata(orig=False)[1] == 6.0
