"""Files shipped with the package: the bundled teacher, its tokenizer and a public-domain book excerpt."""
from pathlib import Path

ASSETS = Path(__file__).parent
TEACHER = ASSETS / "teacher"
TRAIN_BOOKS = ASSETS / "books" / "train"
HELDOUT_BOOKS = ASSETS / "books" / "heldout"
# held-out books whose authors and series are absent from every training split (experiment/heldout.py)
CLEAN_HELDOUT_BOOKS = ASSETS / "books" / "heldout-clean"
