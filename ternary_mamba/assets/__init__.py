"""Files shipped with the package: the bundled teacher, its tokenizer and a public-domain book excerpt."""
from pathlib import Path

ASSETS = Path(__file__).parent
TEACHER = ASSETS / "teacher"
TRAIN_BOOKS = ASSETS / "books" / "train"
HELDOUT_BOOKS = ASSETS / "books" / "heldout"
