from __future__ import annotations

from baton_sidecar.engine.detokenizer import IncrementalDetokenizer
from tiny import tiny_tokenizer


def feed(detok, words):
    deltas = []
    for word in words:
        detok.add(int(word[1:]))
        deltas.append(detok.take_delta(final=False))
        if detok.stopped:
            break
    deltas.append(detok.take_delta(final=True))
    return deltas


def test_streamed_deltas_add_up_to_the_full_text():
    detok = IncrementalDetokenizer(tiny_tokenizer(), stop=())
    deltas = feed(detok, ["w5", "w6", "w7"])
    assert "".join(deltas) == tiny_tokenizer().decode([5, 6, 7])


def test_stop_string_is_cut_and_never_streamed():
    detok = IncrementalDetokenizer(tiny_tokenizer(), stop=("w7 w8",))
    deltas = feed(detok, ["w5", "w6", "w7", "w8", "w9"])
    assert detok.stopped
    text = "".join(deltas)
    assert text == "w5 w6 " and "w7" not in "".join(deltas[:-1])


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    detok = IncrementalDetokenizer(tiny_tokenizer(), stop=("w7 w8",))
    deltas = feed(detok, ["w5", "w7", "w9"])
    assert not detok.stopped
    assert "".join(deltas) == "w5 w7 w9"
