"""Which held-out books are clean: the leakage of the bundled corpus's held-out split, by author and series.

The Gutenberg corpus (see its manifest.tsv) splits by whole book, but six of its
eight held-out books have their author — and three their series — among the 122 training books the bundled
teacher saw.  Only two do not; they are bundled in `assets/books/heldout-clean` and are the claims
experiment's primary held-out set.  No re-split was needed: the teacher never saw either book or any other
book by their authors, so re-training it (103 min) would have bought nothing.
"""
from __future__ import annotations

# PG id -> (title, author, training books by the same author / in the same series)
HELDOUT_BOOKS = {
    55: ("The Wonderful Wizard of Oz", "L. Frank Baum",
         "10 Oz sequels (54, 419, 420, 485, 486, 517, 955, 956, 957, 959) and American Fairy Tales (4357)"),
    84: ("Frankenstein", "Mary Shelley", ""),
    98: ("A Tale of Two Cities", "Charles Dickens", "A Christmas Carol, Oliver Twist, David Copperfield, "
         "Great Expectations (46, 730, 766, 1400)"),
    1661: ("The Adventures of Sherlock Holmes", "Arthur Conan Doyle", "the Sherlock Holmes series: The Return, "
           "The Memoirs, A Study in Scarlet (108, 834, 244); The Lost World (139)"),
    1874: ("The Railway Children", "E. Nesbit", "The Treasure Seekers, The Wouldbegoods, Five Children and It, "
           "The Phoenix and the Carpet (770, 794, 778, 836)"),
    2781: ("Just So Stories", "Rudyard Kipling", "The Jungle Book, The Second Jungle Book (236, 1937)"),
    11757: ("The Velveteen Rabbit", "Margery Williams", ""),
    21015: ("The Adventures of Jimmy Skunk", "Thornton W. Burgess", "11 Burgess books, the Mother West Wind / "
            "Green Meadows series among them (1825, 2441, 2557, 3074, 5844, 14375, 14958, 15168, 17250, "
            "20877, 21286)"),
}
CLEAN = tuple(pg for pg, (_t, _a, leak) in HELDOUT_BOOKS.items() if not leak)


def leakage_table() -> list[str]:
    """Markdown rows: book, author, what of it the training split holds."""
    rows = ["| held-out book | author | in the training books | clean |", "|---|---|---|---|"]
    for pg, (title, author, leak) in HELDOUT_BOOKS.items():
        rows.append(f"| {title} ({pg}) | {author} | {leak or '-'} | {'yes' if not leak else 'no'} |")
    return rows
