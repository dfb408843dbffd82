"""The progress display (dist_xqa.monitor.progress) and its two users, GroupLoop and
predict_logits: a tqdm bar on a terminal, plain lines without carriage returns where the
output is a file (a Slurm log), nothing on ranks that do not draw."""
from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_xqa import monitor
from dist_xqa.config import CheckpointConfig
from dist_xqa.inference import predict_logits
from dist_xqa.roles.loop import GroupLoop, LoopState

LINE = re.compile(r"^(?P<desc>.+): (?P<unit>step|batch) (?P<n>\d+)/(?P<total>\d+), "
                  r"(?P<rate>[\d.]+ (?:steps|batches)/s|\d+ s/(?:step|batch))"
                  r"(?:, ETA (?P<eta>.+)|, done in (?P<done>.+))$")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines_of(text: str) -> list[str]:
    assert "\r" not in text and "\x1b" not in text
    assert text == "" or text.endswith("\n")
    return text.splitlines()


def test_plain_lines_every_n_steps_with_rate_and_eta():
    stream, clock = io.StringIO(), FakeClock()
    with monitor.progress(93, "teacher/en epoch 2/4", stream=stream, every=20, clock=clock) as bar:
        for _ in range(93):
            clock.now += 0.5
            bar.update(1)
    assert lines_of(stream.getvalue()) == [
        "teacher/en epoch 2/4: step 20/93, 2.0 steps/s, ETA 36 s",
        "teacher/en epoch 2/4: step 40/93, 2.0 steps/s, ETA 26 s",
        "teacher/en epoch 2/4: step 60/93, 2.0 steps/s, ETA 16 s",
        "teacher/en epoch 2/4: step 80/93, 2.0 steps/s, ETA 6 s",
        "teacher/en epoch 2/4: step 93/93, 2.0 steps/s, done in 46 s",
    ]


def test_plain_lines_every_interval_when_steps_are_slow():
    stream, clock = io.StringIO(), FakeClock()
    bar = monitor.progress(1000, "student epoch 1/3", stream=stream, every=500, interval_s=30.0, clock=clock)
    for _ in range(7):
        clock.now += 12.0  # a line at 36 s (step 3) and 72 s (step 6), none in between
        bar.update(1)
    lines = lines_of(stream.getvalue())
    assert [LINE.match(line)["n"] for line in lines] == ["3", "6"]
    assert lines[0] == "student epoch 1/3: step 3/1000, 12 s/step, ETA 3 h 19 min"
    bar.close()
    assert lines_of(stream.getvalue())[-1] == "student epoch 1/3: step 7/1000, 12 s/step, ETA 3 h 18 min"


def test_default_plain_cadence_is_about_a_tenth_of_the_run():
    stream, clock = io.StringIO(), FakeClock()
    with monitor.progress(200, "x", stream=stream, clock=clock) as bar:
        for _ in range(200):
            clock.now += 0.01
            bar.update(1)
    assert [int(LINE.match(line)["n"]) for line in lines_of(stream.getvalue())] == list(range(20, 201, 20))


def test_a_resumed_epoch_counts_its_rate_from_the_resume():
    stream, clock = io.StringIO(), FakeClock()
    with monitor.progress(60, "student epoch 2/2", stream=stream, initial=40, every=10, clock=clock) as bar:
        for _ in range(20):
            clock.now += 2.0
            bar.update(1)
    assert lines_of(stream.getvalue()) == [
        "student epoch 2/2: step 50/60, 0.5 steps/s, ETA 20 s",
        "student epoch 2/2: step 60/60, 0.5 steps/s, done in 40 s",
    ]


def test_close_does_not_repeat_the_last_line():
    stream, clock = io.StringIO(), FakeClock()
    with monitor.progress(4, "x", stream=stream, every=2, clock=clock) as bar:
        bar.update(2)
        bar.update(2)
    assert len(lines_of(stream.getvalue())) == 2


def test_a_rank_that_does_not_draw_writes_nothing():
    for stream in (io.StringIO(), Terminal()):
        with monitor.progress(5, "x", enabled=False, stream=stream, every=1) as bar:
            for _ in range(5):
                bar.update(1)
        assert stream.getvalue() == ""


def test_a_terminal_gets_a_redrawn_bar_on_the_ranks_own_line(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    first = Terminal()
    with monitor.progress(5, "teacher/en epoch 1/1", stream=first) as bar:
        bar.update(5)
    assert "\r" in first.getvalue() and "teacher/en epoch 1/1" in first.getvalue()
    assert "\x1b[A" not in first.getvalue()  # line 0: no cursor movement
    # another drawing rank of the node keeps its bar two lines down and moves back up
    monkeypatch.setenv("LOCAL_RANK", "2")
    third = Terminal()
    with monitor.progress(5, "teacher/es epoch 1/1", stream=third) as bar:
        bar.update(5)
    assert "\n\n" in third.getvalue() and "\x1b[A\x1b[A" in third.getvalue()


def test_format_duration_and_rate():
    assert [monitor.format_duration(s) for s in (0, 29.4, 60, 725, 3600, 11220)] == [
        "0 s", "29 s", "1 min 00 s", "12 min 05 s", "1 h 00 min", "3 h 07 min"]
    assert monitor.format_rate(1.84) == "1.8 steps/s" and monitor.format_rate(0.05) == "20 s/step"
    assert monitor.format_rate(3.0, "batch") == "3.0 batches/s" and monitor.format_rate(0.02, "batch") == "50 s/batch"


# --- the users --------------------------------------------------------------------------


def stub_loop(tmp_path: Path, show_progress: bool, resume_at: LoopState) -> GroupLoop:
    """A GroupLoop without DeepSpeed: no checkpoint, no collective (a one-rank group)."""
    loop = GroupLoop(engine=None, group=SimpleNamespace(rank=0), ckpt_dir=tmp_path,
                     checkpoint=CheckpointConfig(every=1000, keep=2), desc="teacher/en", show_progress=show_progress)
    loop.resume = lambda: resume_at
    loop._stop_agreed = lambda: False
    loop.save = lambda state: None
    return loop


@pytest.mark.parametrize("show_progress", [True, False])
def test_group_loop_prints_plain_lines_on_its_drawing_rank_only(tmp_path, capsys, show_progress):
    loop = stub_loop(tmp_path, show_progress, LoopState(epoch=0, step_in_epoch=5, global_step=5))
    steps = []
    state = loop.run(2, lambda epoch: 30, lambda epoch, i, state: steps.append((epoch, i)),
                     lambda epoch, state: None)
    assert state.epoch == 2 and len(steps) == 25 + 30
    err = capsys.readouterr().err  # pytest's capture: not a terminal
    if not show_progress:
        assert err == ""
        return
    lines = [line for line in lines_of(err) if LINE.match(line)]
    assert lines and lines == lines_of(err)
    epoch1 = [LINE.match(line) for line in lines if line.startswith("teacher/en epoch 1/2: ")]
    epoch2 = [LINE.match(line) for line in lines if line.startswith("teacher/en epoch 2/2: ")]
    # epoch 1 resumed at step 5: the display starts there, every 3 steps (a tenth of 30)
    assert [int(m["n"]) for m in epoch1] == [8, 11, 14, 17, 20, 23, 26, 29, 30]
    assert [int(m["n"]) for m in epoch2] == list(range(3, 31, 3))
    assert {m["total"] for m in epoch1 + epoch2} == {"30"} and epoch2[-1]["done"] is not None


class TinyQA(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        x = input_ids.float()
        return SimpleNamespace(start_logits=x, end_logits=-x)


@pytest.mark.parametrize("desc", ["eval student/xquad", None])
def test_predict_logits_reports_batches_as_plain_lines(capsys, desc):
    from datasets import Dataset

    features = Dataset.from_dict({"input_ids": [[i, i + 1, i + 2] for i in range(10)],
                                  "attention_mask": [[1, 1, 1]] * 10})
    start, end = predict_logits(TinyQA(), features, 1, torch.device("cpu"), desc=desc)
    assert start.shape == (10, 3) and (start == -end).all() and start[:, 0].tolist() == list(range(10))
    err = capsys.readouterr().err
    if desc is None:
        assert err == ""
        return
    lines = lines_of(err)
    assert [LINE.match(line)["n"] for line in lines] == [str(n) for n in range(1, 11)]
    assert all(line.startswith("eval student/xquad: batch ") for line in lines)
