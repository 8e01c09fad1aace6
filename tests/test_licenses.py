"""Licence names: every common spelling maps to exactly one name."""

import pytest

from natvision.transforms import licenses


@pytest.mark.parametrize("value,name", [
    ("http://creativecommons.org/licenses/by-nc/4.0/", "cc-by-nc"),
    ("https://creativecommons.org/licenses/by-nc/3.0", "cc-by-nc"),
    ("http://creativecommons.org/licenses/by-nc/4.0/legalcode", "cc-by-nc"),
    ("https://creativecommons.org/licenses/by/4.0/", "cc-by"),
    ("http://creativecommons.org/licenses/by-sa/2.0/", "cc-by-sa"),
    ("http://creativecommons.org/publicdomain/zero/1.0/", "cc0"),
    ("https://creativecommons.org/publicdomain/mark/1.0/", "pdm"),
    ("CC-BY-NC", "cc-by-nc"), ("CC BY-NC 4.0", "cc-by-nc"),
    ("cc_by_nc", "cc-by-nc"), ("CC_BY_NC_4_0", "cc-by-nc"),
    ("CC-BY-NC-SA", "cc-by-nc-sa"), ("CC BY-NC-ND 3.0 Unported",
                                     "cc-by-nc-nd"),
    ("CC0", "cc0"), ("CC0 1.0", "cc0"), ("cc-by", "cc-by"),
    ("© all rights reserved", "all-rights-reserved"),
    ("All Rights Reserved", "all-rights-reserved"),
    ("", "none"), (None, "none"), ("   ", "none"),
    ("photo by me, ask first", "none"), ("see website", "none"),
    ("http://creativecommons.org/licenses/sampling+/1.0/", "none"),
])
def test_normalise(value, name):
  assert licenses.normalise(value) == name


def test_each_name_means_exactly_that_licence():
  keep = licenses.LicenseFilter(frozenset({"cc-by"}))
  assert keep.allows("CC BY 4.0")
  assert not keep.allows("CC BY-SA 4.0") and not keep.allows("cc-by-nc")
  assert not keep.allows("") and not keep.allows("cc0")
  assert licenses.LicenseFilter().allows("anything")


def test_unknown_names_refused_and_column_found():
  with pytest.raises(ValueError, match="unknown licence name.*cc-by-4.0"):
    licenses.LicenseFilter(frozenset({"cc-by-4.0"}))
  assert licenses.license_column(["uri", "LICENSE"]) == "LICENSE"
  assert licenses.license_column(["uri", "creator"]) is None
