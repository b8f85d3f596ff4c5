"""eat-plot: TensorBoard event files (read without tensorboard), fairseq text logs as the fallback, one
panel per kind of scalar (probe_* included whatever its name), and the CLI's exit status."""
from __future__ import annotations

from pathlib import Path

import pytest

from eat_fairseq.cli.plot import main as plot_main
from eat_fairseq.cli.curves import panel_of, panels, read_event_file, read_run, read_text_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# lines as fairseq writes them to hydra_train.log (json format: fine-tuning; simple format: pre-training)
JSON_LOG = """\
[2026-11-29 00:36:16,806][train_inner][INFO] - {"epoch": 1, "update": 0.077, "loss": "2.7115", "wps": "0", "num_updates": "1", "lr": "0.0002505", "gnorm": "6.284"}
[2026-11-29 00:36:16,906][train_inner][INFO] - {"epoch": 1, "update": 0.154, "loss": "2.5", "num_updates": "2", "lr": "0.0005", "probe_acc_linear": "0.25"}
[2026-11-29 00:36:17,066][valid][INFO] - {"epoch": 1, "valid_accuracy": "0.266667", "valid_mAP": "0.330098", "valid_auc": "0.42419", "valid_loss": "2.6455", "valid_n_eval": "15", "valid_num_updates": "2"}
[2026-11-29 00:36:17,095][train][INFO] - {"epoch": 1, "train_loss": "2.6", "train_num_updates": "2", "train_lr": "0.0005"}
[2026-11-29 00:36:17,097][fairseq_cli.train][INFO] - done training in 0.3 seconds
"""
SIMPLE_LOG = """\
[2026-11-29 00:35:49,386][train_inner][INFO] - epoch 002:      3 / 7 loss=133.65, frame_loss=8.2117, utterance_loss=8.0506, target_var=0.9833, pred_var=0.1161, masked_pct=0.8125, num_updates=10, lr=0.00025, gnorm=48.585
[2026-11-29 00:35:50,145][train_inner][INFO] - epoch 003:      6 / 7 loss=132.248, frame_loss=8.0791, utterance_loss=7.8543, target_var=0.9848, pred_var=0.1141, num_updates=20, lr=0.0005, probe_pos_share=0.4
[2026-11-29 00:35:51,000][valid][INFO] - epoch 003 | valid on 'valid' subset | loss 2.6 | accuracy 0.5 | mAP 0.6 | num_updates 20
"""


def test_panels_are_chosen_from_names() -> None:
    assert panel_of("loss") == panel_of("frame_loss") == panel_of("utterance_loss") == "loss"
    assert panel_of("lr") == "learning rate"
    assert panel_of("probe_acc_linear") == panel_of("probe_knn_accuracy") == "probe accuracy"
    assert panel_of("probe_pos_share") == panel_of("probe_feat_spread") == "probe diagnostics"
    assert panel_of("accuracy") == panel_of("mAP") == "validation metrics"
    assert panel_of("wps") is None and panel_of("num_updates") is None and panel_of("something_new") is None


def test_text_logs_json_and_simple(tmp_path: Path) -> None:
    (tmp_path / "hydra_train.log").write_text(JSON_LOG)
    run = read_run(str(tmp_path))
    assert run.source == "text log"
    assert run.series[("train_inner", "loss")] == {1: 2.7115, 2: 2.5}
    assert run.series[("valid", "mAP")] == {2: 0.330098}
    assert run.series[("train_inner", "probe_acc_linear")] == {2: 0.25}
    chosen = panels(run)
    assert ("train", "loss") not in chosen["loss"]  # the epoch average repeats train_inner
    assert chosen["loss"] == [("train_inner", "loss"), ("valid", "loss")]
    assert set(chosen) == {"loss", "learning rate", "validation metrics", "probe accuracy"}

    simple = read_text_log(str(_write(tmp_path / "simple.log", SIMPLE_LOG)))
    assert simple.series[("train_inner", "frame_loss")] == {10: 8.2117, 20: 8.0791}
    assert simple.series[("train_inner", "probe_pos_share")] == {20: 0.4}
    assert simple.series[("valid", "accuracy")] == {20: 0.5}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_tensorboard_events_are_preferred_and_plotted(tmp_path: Path) -> None:
    tensorboardX = pytest.importorskip("tensorboardX")
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "checkpoints" / "eat_tiny"
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.proto.tensor_pb2 import TensorProto

    inner = tensorboardX.SummaryWriter(str(run_dir / "tb" / "train_inner"))
    for step in range(1, 6):
        inner.add_scalar("loss", 10.0 / step, step)
        inner.add_scalar("lr", 1e-4 * step, step)
        inner.add_scalar("probe_acc_linear", 0.1 * step, step)
        inner.add_scalar("wps", 1000.0, step)
        # a tensor-valued scalar, as newer writers (torch.utils.tensorboard's new_style) store them
        tensor = Summary(value=[Summary.Value(tag="probe_feat_spread", tensor=TensorProto(dtype=1, float_val=[2.0 + step]))])
        inner._get_file_writer().add_summary(tensor, step)
    inner.close()
    valid = tensorboardX.SummaryWriter(str(run_dir / "tb" / "valid"))
    valid.add_scalar("accuracy", 0.75, 5)
    valid.close()
    (run_dir / "hydra_train.log").write_text(JSON_LOG)  # ignored: event files come first

    events = list(read_event_file(next((run_dir / "tb" / "train_inner").glob("*tfevents*")).as_posix()))
    assert (3, "loss", pytest.approx(10.0 / 3)) in [(s, t, pytest.approx(v)) for s, t, v in events]
    run = read_run(str(run_dir))
    assert run.source == "tensorboard"
    assert run.series[("train_inner", "probe_feat_spread")] == {s: pytest.approx(2.0 + s) for s in range(1, 6)}
    assert run.series[("valid", "accuracy")] == {5: 0.75}

    out = tmp_path / "curves.png"
    assert plot_main([str(run_dir), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert set(panels(run)) == {"loss", "learning rate", "validation metrics", "probe accuracy", "probe diagnostics"}
    assert plot_main([str(run_dir)]) == 0 and (run_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot_main([str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert plot_main([str(tmp_path / "empty")]) == 1
    assert "no training scalars found" in capsys.readouterr().err


# a 6-update pre-training run with the online probe (json lines as fairseq-hydra-train writes them)
LOGMEL = ', "probe_logmel_logreg": "0.6"'
SHORT_RUN = "".join(
    f'[2026-12-04 10:00:0{n},000][train_inner][INFO] - {{"epoch": 1, "loss": "{80 + n}", "frame_loss": "{6 + n}", '
    f'"utterance_loss": "5", "utterance_term": "{74}", "num_updates": "{n}", "lr": "{lr}"{probe}}}\n'
    for n, lr, probe in [
        (1, "1e-4", ""), (2, "2e-4", ""), (3, "1.5e-4", ', "probe_student_logreg": "0.5"' + LOGMEL),
        (4, "8e-5", ', "probe_student_logreg": "0.5"' + LOGMEL), (5, "6e-7", ', "probe_student_logreg": "0.5"' + LOGMEL),
        (6, "5e-5", ', "probe_student_logreg": "0.75"' + LOGMEL),
    ]
) + '[2026-12-04 10:00:09,000][valid][INFO] - {"epoch": 1, "valid_loss": "81", "valid_num_updates": "6"}\n'


def test_curves_a_user_reads_without_explanation(tmp_path: Path) -> None:
    """Issue 23: loss parts that add up, no phantom lr point at the end, one point per probe."""
    from eat_fairseq.cli.curves import drawn_series

    run = read_text_log(str(_write(tmp_path / "hydra_train.log", SHORT_RUN)))
    drawn = drawn_series(run)
    # lr logged at update N is the one update N + 1 uses; the value logged at the last update (the
    # cosine restarting, 6e-7 -> 5e-5) trains nothing and is not drawn
    assert drawn[("train_inner", "lr")] == {2: 1e-4, 3: 2e-4, 4: 1.5e-4, 5: 8e-5, 6: 6e-7}
    chosen = panels(run)
    loss_names = [name for _, name in chosen["loss"]]
    assert "utterance_term" in loss_names and "utterance_loss" not in loss_names
    for step in range(1, 7):  # the drawn parts add up to the drawn total
        parts = drawn[("train_inner", "frame_loss")][step] + drawn[("train_inner", "utterance_term")][step]
        assert parts == pytest.approx(drawn[("train_inner", "loss")][step])
    # the probe's score repeats on every line until the next probe: drawn once per probe
    assert chosen["probe accuracy"] == [("train_inner", "probe_logmel_logreg"), ("train_inner", "probe_student_logreg")]
    assert drawn[("train_inner", "probe_student_logreg")] == {3: 0.5, 6: 0.75}
    assert drawn[("train_inner", "probe_logmel_logreg")] == {3: 0.6, 6: 0.6}  # a line over the run
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    assert plot_main([str(tmp_path / "hydra_train.log"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_a_weighted_frame_term_replaces_frame_loss_in_the_loss_panel(tmp_path: Path) -> None:
    """With model.frame_loss_weight != 1 the criterion logs frame_term; the drawn parts still add up."""
    from eat_fairseq.cli.curves import drawn_series

    text = SHORT_RUN.replace('"utterance_term"', '"frame_term": "3", "utterance_term"')
    run = read_text_log(str(_write(tmp_path / "hydra_train.log", text)))
    names = [name for _, name in panels(run)["loss"]]
    assert "frame_term" in names and "frame_loss" not in names and "utterance_term" in names
    assert ("train_inner", "frame_loss") not in drawn_series(run)


def test_baseline_crossing_is_the_first_probe_above_log_mel(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Minutes to pass log-mel (issue 21): the first probe above the baseline, its update and wall clock;
    a score that never passes says so with its best; the first probe is flagged (only "at or before")."""
    from eat_fairseq.cli.curves import baseline_crossings

    text = SHORT_RUN.replace('"num_updates": "6"', '"num_updates": "6", "wall": "90"').replace(
        '"probe_student_logreg": "0.5"', '"probe_student_logreg": "0.5", "probe_student_knn": "0.9", '
        '"probe_logmel_knn": "0.8"')
    log = _write(tmp_path / "hydra_train.log", text)
    found = {c.probe: c for c in baseline_crossings(read_text_log(str(log)))}
    assert set(found) == {"probe_student_logreg", "probe_student_knn"}  # no baseline for others, none for itself
    logreg = found["probe_student_logreg"]
    # 0.5 at updates 3-5 (not above 0.6), 0.75 at update 6, logged at wall 90 s
    assert (logreg.update, logreg.first_probe, logreg.minutes, logreg.value) == (6, 3, 1.5, 0.75)
    assert "at update 6, 1.5 min: 0.7500" in logreg.describe()
    knn = found["probe_student_knn"]  # 0.9 > 0.8 at the first probe; no wall logged there
    assert (knn.update, knn.minutes) == (3, None) and "the first probe: at or before it" in knn.describe()
    hover = text.replace('"num_updates": "4", "lr": "8e-5", "probe_student_logreg": "0.5"',
                              '"num_updates": "4", "lr": "8e-5", "probe_student_logreg": "0.65"')
    hovering = {c.probe: c for c in baseline_crossings(read_text_log(str(_write(tmp_path / "hover.log", hover))))}[
        "probe_student_logreg"]
    # above at 4 (0.65), below at 5 (0.5), above again at 6: first above 4, above for good from 6
    assert (hovering.update, hovering.settled) == (4, 6)
    assert hovering.describe().endswith("; above at every probe from update 6, 1.5 min")
    assert (logreg.settled, knn.settled) == (6, 3)  # above from their first crossing on
    fallen = {c.probe: c for c in baseline_crossings(read_text_log(str(_write(
        tmp_path / "fallen.log", hover.replace('"0.75"', '"0.55"')))))}["probe_student_logreg"]
    assert fallen.settled is None and fallen.describe().endswith("; not above at the last probe")
    never = baseline_crossings(read_text_log(str(_write(tmp_path / "never.log", SHORT_RUN.replace('"0.75"', '"0.55"')))))
    assert never[0].update is None and never[0].describe() == (
        "probe_student_logreg never above log-mel 0.6000 (best 0.5500)")
    pytest.importorskip("matplotlib")
    assert plot_main([str(log), "--out", str(tmp_path / "c.png")]) == 0
    assert "online probe: probe_student_logreg above log-mel 0.6000 at update 6, 1.5 min" in capsys.readouterr().out
