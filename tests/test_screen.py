"""The screen: plain progress lines off a terminal, a tqdm bar on one, absl's log in a file."""
from __future__ import annotations

import io
import re

from adv_soups import screen

ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", re.M)


def test_plain_lines_off_a_terminal_and_never_carriage_returns():
  out = io.StringIO()
  progress = screen.TrainProgress(100, enabled=True, stream=out, min_interval_s=0.0)
  assert not progress.use_bar
  for step in range(1, 101):
    progress.update(step)
    if step % 50 == 0:
      progress.metrics(step, {"loss": 0.5, "clean_train_accuracy": 0.9,
                              "adv_train_accuracy": 0.6, "grad_norm": 1.0})
  progress.write(screen.format_eval(100, {"val/clean/clean_accuracy": 0.983}))
  progress.close()
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue()
  assert lines[0].startswith("step 50/100 (50%)") and "ETA" in lines[0]
  assert "loss 0.500 clean_acc 0.90 adv_acc 0.60" in lines[0] and "grad_norm" not in lines[0]
  assert lines[1].startswith("step 100/100 (100%)")
  assert lines[2] == "eval @ step 100: val/clean clean 98.3%"


def test_plain_lines_are_paced_but_the_last_step_always_prints():
  out = io.StringIO()
  progress = screen.TrainProgress(30, stream=out, bar=False, min_interval_s=3600)
  for step in (10, 20, 30):
    progress.update(step)
    progress.metrics(step, {"loss": 1.0})
  assert [l.split()[1] for l in out.getvalue().splitlines()] == ["10/30", "30/30"]


def test_bar_on_a_terminal_and_silent_when_disabled():
  out = io.StringIO()
  progress = screen.TrainProgress(10, stream=out, bar=True)
  for step in range(1, 11):
    progress.update(step)
  progress.metrics(10, {"loss": 0.25})
  progress.write("eval line")
  progress.close()
  text = out.getvalue()
  assert "\r" in text and "10/10" in text and "loss 0.250" in text and "eval line\n" in text
  quiet = io.StringIO()
  off = screen.TrainProgress(10, enabled=False, stream=quiet, bar=True)
  off.update(10)
  off.metrics(10, {"loss": 1.0})
  off.write("x")
  off.close()
  assert quiet.getvalue() == ""


def test_absl_goes_to_the_log_file_and_warnings_reach_the_screen_as_one_line(tmp_path, capsys):
  from absl import logging
  path = screen.log_to_file(str(tmp_path / "train.log"))
  try:
    logging.info("an info line %d", 7)
    logging.warning("a warning\nover two lines")
    captured = capsys.readouterr()
    assert not ABSL_LINE.search(captured.out + captured.err)
    assert captured.err.strip() == "warning: a warning over two lines"
    text = open(path).read()
    assert "an info line 7" in text and ABSL_LINE.search(text)
  finally:
    screen.log_to_screen()


def test_plain_ticker_off_a_terminal():
  out = io.StringIO()
  bar = screen.progress_bar(4, "sweep", "batch", stream=out)
  assert isinstance(bar, screen.PlainTicker)
  bar.every_s = 3600
  for _ in range(4):
    bar.set_postfix_str("digits")
    bar.update(1)
  bar.close()
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue() and len(lines) == 1
  assert lines[0].startswith("sweep: 4/4 batch (100%), ") and lines[0].endswith(", digits")


def test_preparing_digits_prints_one_line_and_no_tfds_banner(tmp_path, capfd):
  from absl import flags
  from adv_soups.data import digits
  screen.quiet_libraries()
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  digits.prepare_digits(str(tmp_path / "tfds"))
  out, err = capfd.readouterr()
  assert out == ""
  assert err.strip().splitlines() == [
      f"preparing the bundled digits data set (1,797 images, once) in {tmp_path / 'tfds'}"]
