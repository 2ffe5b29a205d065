"""conf.errors.one_line: an exception as the one short line a message embeds."""
from __future__ import annotations

from conf.errors import one_line


def test_one_line_collapses_whitespace_names_the_type_and_cuts_the_text():
    e = KeyError("dynamic_loss_scale")
    assert one_line(e) == "KeyError: 'dynamic_loss_scale'"
    long = ValueError("first line\n   second\tline " + "x" * 300)
    assert one_line(long, 20) == "ValueError: first line second li"
    assert one_line(long, 10, name=False) == "first line"
    assert "\n" not in one_line(long, None) and one_line(long, None).endswith("x" * 300)
