"""`--help` on every program: its flags with their help on stdout, exit 0, nothing run."""
import pytest

from adv_soups import evaluate, export, sweep, train


@pytest.mark.parametrize("main, flags", [
    (train.main, ("--config", "--workdir")),
    (evaluate.main, ("--workdir", "--attack", "--alpha")),
    (sweep.main, ("--workdir", "--alphas")),
    (export.main, ("--workdir",)),
])
@pytest.mark.parametrize("arg", ["--help", "-h"])
def test_help_lists_the_flags_and_exits_0(main, flags, arg, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    main(["program", arg])
  out = capsys.readouterr().out
  assert exit_info.value.code == 0
  assert out.startswith("usage: ")
  for flag in flags:
    assert flag + ":" in out, (flag, out[:500])
  assert not list(tmp_path.iterdir())


def test_help_into_a_closed_pipe_exits_0_without_a_traceback(monkeypatch):
  """`python -m adv_soups.evaluate --help | head -1`: the reader leaves early, the write fails
  with BrokenPipeError; the program still exits 0 and stdout is pointed at /dev/null (so the
  interpreter's flush at exit prints no traceback)."""
  import os
  import sys
  read_end, write_end = os.pipe()
  os.close(read_end)  # the reader has gone
  stdout = open(write_end, "w")
  monkeypatch.setattr(sys, "stdout", stdout)
  try:
    with pytest.raises(SystemExit) as exit_info:
      evaluate.main(["program", "--help"])
    assert exit_info.value.code == 0
    os.write(stdout.fileno(), b"x")  # the descriptor now leads to /dev/null: no EPIPE
  finally:
    monkeypatch.undo()
    try:
      stdout.close()
    except BrokenPipeError:
      pass
