"""What an assistant answers, made storable: the property a streamed turn relies on."""
from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from chat_blueprint.services.storable import storable_text

# Text as a model server's JSON can carry it: any code point, lone surrogates and NUL included,
# with the halves of a surrogate pair drawn often enough to meet each other.
ANY_TEXT = st.text(alphabet=st.one_of(
    st.sampled_from(["\ud83d", "\ude00", "\x00"]),
    st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()),
))


@given(pieces=st.lists(ANY_TEXT, max_size=8))
@example(pieces=["a pair split \ud83d", "\ude00 across two"])
def test_pieces_made_storable_add_up_to_the_whole_made_storable(pieces):
    """A streamed reply's deltas are made storable one by one as they are sent, and the
    whole reply once when it is stored: both must be the same text, wherever the cuts fell
    (a surrogate pair split across two deltas included)."""
    assert "".join(map(storable_text, pieces)) == storable_text("".join(pieces))


@given(text=ANY_TEXT)
def test_storable_text_holds_no_nul_and_encodes_as_utf8(text):
    stored = storable_text(text)
    assert "\x00" not in stored and len(stored) == len(text)
    stored.encode("utf-8")
