"""Classifying a failed save as a full disk (and nothing else), and the partial-save clean-up."""
from __future__ import annotations

import errno
import os

import pytest

from adv_soups import disk_space


def _raised_from(inner: BaseException) -> BaseException:
  try:
    try:
      raise inner
    except BaseException as e:
      raise RuntimeError("orbax: save failed") from e
  except RuntimeError as outer:
    return outer


def test_enospc_anywhere_in_the_chain_is_out_of_space(tmp_path):
  assert disk_space.is_out_of_space(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path))
  assert disk_space.is_out_of_space(_raised_from(OSError(errno.EDQUOT, "quota")), str(tmp_path))


def test_programming_errors_and_other_io_errors_are_not(tmp_path):
  for error in (TypeError("bad argument"), KeyError("params"), ValueError("shape mismatch"),
                OSError(errno.EACCES, "Permission denied"), _raised_from(ZeroDivisionError())):
    assert not disk_space.is_out_of_space(error, str(tmp_path))


def test_resource_exhausted_text_counts_only_when_the_disk_is_short(tmp_path):
  error = ValueError("RESOURCE_EXHAUSTED: Failed writing /x/params/d/abc")
  free = disk_space.free_bytes(str(tmp_path))
  assert disk_space.is_out_of_space(error, str(tmp_path), needed=free + 1)
  assert not disk_space.is_out_of_space(error, str(tmp_path), needed=1)  # room: something else
  assert not disk_space.is_out_of_space(ValueError("RESOURCE_EXHAUSTED: out of memory"),
                                        str(tmp_path), needed=free + 1)


def test_check_room_refuses_a_workdir_smaller_than_one_checkpoint(tmp_path):
  disk_space.check_room(str(tmp_path / "new"), 1)
  free = disk_space.free_bytes(str(tmp_path))
  with pytest.raises(disk_space.DiskFull, match="free but one checkpoint needs"):
    disk_space.check_room(str(tmp_path / "new"), free + (1 << 30))


def test_remove_partial_saves_takes_only_orbax_temporaries(tmp_path):
  (tmp_path / "40").mkdir()
  (tmp_path / "60.orbax-checkpoint-tmp-1765000000").mkdir()
  (tmp_path / "60.orbax-checkpoint-tmp-1765000000" / "params").write_text("half")
  removed = disk_space.remove_partial_saves(str(tmp_path))
  assert [os.path.basename(p) for p in removed] == ["60.orbax-checkpoint-tmp-1765000000"]
  assert sorted(os.listdir(tmp_path)) == ["40"]


def test_message_names_step_last_good_needed_and_free():
  line = disk_space.save_failed_message("/w", 60, 40, needed=3 << 20, free=1 << 20)
  assert "\n" not in line
  for part in ("step 60", "step 40 (kept)", "3.0 MiB", "1.0 MiB free", "resume"):
    assert part in line
