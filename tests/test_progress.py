"""Progress where output is a log: plain lines with done / total, rate and ETA whenever the
interval has passed without one, also while no work item finishes; short work writes nothing;
bars on a terminal; nothing inside Dagster's runs."""

import io
import re
import time

import pytest

from kun_dagster import progress


@pytest.fixture
def lines():
    out = io.StringIO()
    progress.show(progress.LINES, interval=0.2, out=out)
    yield out
    progress.show(False)


def test_long_work_says_done_total_rate_eta_on_the_way_and_its_total_at_the_end(lines):
    with progress.task("labeled_pairs web/0 generate", total=10, unit="prompts") as bar:
        for _ in range(4):
            bar.update(1)
            time.sleep(0.12)
    text = lines.getvalue().splitlines()
    # elapsed shows whole seconds, rounded: 0.5 s on a busy machine reads 0:01
    on_the_way = r"labeled_pairs web/0 generate: \d+/10 prompts \(\d+%\), [\d.]+ prompts/s, 0:0\d elapsed, ETA 0:\d\d"
    assert text[:-1] and all(re.fullmatch(on_the_way, t) for t in text[:-1]), text  # 0.48 s at a 0.2 s interval
    assert len(text[:-1]) <= 3
    assert re.fullmatch(r"labeled_pairs web/0 generate: 4 prompts in 0:0\d \([\d.]+ prompts/s\)", text[-1])


def test_a_long_silent_step_still_gets_a_line_every_interval(lines):
    """One training step or one batch of prompts can take minutes on a real model: the heartbeat
    writes while nothing updates."""
    with progress.task("chat_model fine-tuning", unit="steps") as bar:
        bar.total = 100  # the Trainer tells it once training starts
        bar.update(3)
        time.sleep(0.7)  # no update for 3.5 intervals
    beats = [t for t in lines.getvalue().splitlines() if t.startswith("chat_model fine-tuning: 3/100 steps (3%)")]
    assert 2 <= len(beats) <= 5, lines.getvalue()
    assert all("ETA" in b for b in beats)


def test_many_short_pieces_of_work_write_one_line_an_interval_not_one_each(lines):
    for i in range(40):
        with progress.task(f"raw_corpus web/{i}", unit="docs") as bar:
            bar.update(5)
            time.sleep(0.02)  # 0.8 s in all: about 4 intervals
    text = lines.getvalue().splitlines()
    assert 2 <= len(text) <= 12, text  # a line (and its piece's total) an interval, not 40 or 80
    assert all(re.match(r"raw_corpus web/\d+: ", t) for t in text)


def test_lines_close_on_failure_and_stop_their_heartbeat(lines):
    with pytest.raises(RuntimeError), progress.task("raw_corpus web/0", unit="docs") as bar:
        bar.update(2)
        time.sleep(0.3)
        raise RuntimeError("boom")
    said = lines.getvalue()
    assert said.splitlines()[-1].startswith("raw_corpus web/0: 2 docs in")
    time.sleep(0.5)
    assert lines.getvalue() == said  # no heartbeat after the end


def test_auto_draws_bars_on_a_terminal_and_lines_in_a_log():
    assert progress.mode("auto", stdout_tty=True, stderr_tty=True) == progress.BARS
    assert progress.mode("auto", stdout_tty=False, stderr_tty=True) == progress.LINES  # kun run > log
    assert progress.mode("auto", stdout_tty=False, stderr_tty=False) == progress.LINES  # CI, a pod
    assert progress.mode("on", False, False) == progress.BARS and progress.mode("off", True, True) == progress.OFF
    with pytest.raises(ValueError):
        progress.show("sometimes")


def test_off_writes_nothing(capsys):
    progress.show(False)
    with progress.task("x", total=3) as bar:
        bar.update(3)
    assert capsys.readouterr() == ("", "")
