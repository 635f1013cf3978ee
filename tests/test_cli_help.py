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
