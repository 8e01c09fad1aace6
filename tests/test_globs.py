"""Globs at launch: the bounded count and the bounded first matches."""

from natvision.transforms import globs
from natvision.transforms import sources


def test_overlapping_patterns_count_each_file_once(tmp_path):
  for name in ("a1.jpg", "a2.jpg", "b.jpg", "a.txt"):
    (tmp_path / name).write_bytes(b"x")
  patterns = [str(tmp_path / "*.jpg"), str(tmp_path / "a*")]
  assert globs.count_pattern_matches(patterns) == globs.InputCount(4)
  assert globs.count_pattern_matches(
      patterns + patterns[:1]) == globs.InputCount(4)

def test_first_matches_stop_at_their_bound_sorted(tmp_path, monkeypatch):
  for i in range(50):
    (tmp_path / f"p{49 - i:02d}.jpg").write_bytes(b"")
  listed = []
  real = globs._iter_local  # pylint: disable=protected-access

  def counting(pattern):
    for path in real(pattern):
      listed.append(path)
      yield path

  monkeypatch.setattr(globs, "_iter_local", counting)
  first = globs.first_matches([str(tmp_path / "*.jpg")] * 2, 10)
  assert len(first) == 10 and first == sorted(first)
  assert len(listed) == 10  # the listing was not read further
  assert globs.first_matches([str(tmp_path / "*.jpg")], 100) == sorted(
      str(p) for p in tmp_path.glob("*.jpg"))
  assert sources.first_matches is globs.first_matches
