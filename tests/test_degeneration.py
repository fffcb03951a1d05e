import pytest

from hf_svdq.evaluation.degeneration import (
    degeneration_report,
    detect_loop,
    distinct_n,
    repeated_ngram_rate,
    units,
)


@pytest.mark.parametrize(
    ("text", "period"),
    [
        (",,,,,,", 1),
        ("the meaning of life is the meaning of life is the meaning of life", 5),
        ("I like it. I like it. I like it.", 4),
        ("Once upon a time there was a dragon, a dragon, a dragon, a dragon", 3),
        ("ha ha ha ha ha ha", 1),
    ],
)
def test_loops_are_caught(text, period):
    loop = detect_loop(units(text))
    assert loop is not None and loop.period == period


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "I like it. I like it.",  # two copies are not a loop
        "no no",
        "Roses are red, violets are blue, sugar is sweet, and so are you.",
        "",
    ],
)
def test_normal_text_is_not_a_loop(text):
    assert detect_loop(units(text)) is None


def test_repetition_measures():
    looped = units("a b c a b c a b c")
    fresh = units("one two three four five six")
    assert repeated_ngram_rate(fresh) == 0.0 and distinct_n(fresh, 2) == 1.0
    assert repeated_ngram_rate(looped) > 0.5 and distinct_n(looped, 2) < 0.5
    report = degeneration_report("and then, and then, and then, and then")
    assert report["loop"] and report["loop_unit"] == "and then ,"
