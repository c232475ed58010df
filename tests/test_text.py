"""Counts and names as the dashboard shows them."""

from app.text import count_text


def test_a_metric_tile_shows_a_count_whole_or_compact_never_cut():
    assert count_text(272_186) == "272,186" and count_text(9_999_999) == "9,999,999"
    assert count_text(1_813_562_368) == "1.81 G" and count_text(11_689_512) == "11.7 M"
    assert all(len(count_text(n)) <= 10 for n in (10**7, 10**9 - 1, 10**13))
