"""The benchmark's server-code digest names the code measured, not its documentation."""

from __future__ import annotations

from bench.run import code_only, source_digest

CODE = '''"""A module."""

def f(x):
    """Double it."""
    return 2 * x  # twice
'''


def test_docstrings_comments_and_layout_do_not_change_the_digest() -> None:
    edited = CODE.replace("A module.", "The module, documented better.").replace("# twice", "")
    edited = edited.replace("Double it.", "Twice x.").replace("2 * x", "2*x")
    assert code_only(edited) == code_only(CODE)


def test_a_code_change_changes_the_digest() -> None:
    assert code_only(CODE.replace("2 * x", "3 * x")) != code_only(CODE)
    assert code_only(CODE.replace('"""Double it."""', 'print("Double it.")')) != code_only(CODE)


def test_the_digest_of_this_checkout_is_12_hex_digits() -> None:
    digest = source_digest()
    assert len(digest) == 12 and int(digest, 16) >= 0
