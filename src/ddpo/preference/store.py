"""The label store: people's choices between two images for one prompt, in one SQLite file.

    images    (hash, png)                                   content-addressed PNG bytes (sha256 of the bytes)
    pairs     (id, prompt, image_a, image_b, source, ...)   what is shown: a prompt and two images
    labellers (name, token_hash)                            who may label; tokens are stored as sha256 only
    labels    (id, pair, labeller, choice, created, image_a, image_b, undone)
    queue     (pair, rank, selection)                       the order a pair selection chose (`ddpo label select`)

A choice is "1" (the first image is better), "2" (the second), "tie" or "skip". Every label is written in its
own transaction before the caller hears back (WAL journal, synchronous=FULL), so a server killed at any moment
keeps every label it acknowledged. Undo marks a label as undone rather than deleting it. Label ids are random
UUIDs: exporting to JSONL and importing into another store merges without duplicates.

Only the standard library and Pillow: the label app, the online reward and the preference trainer all read
and write the same file, from different processes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

CHOICES = ("1", "2", "tie", "skip")
"""A label's choice: the first image, the second, a tie, or skipped (no opinion)."""
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    hash TEXT PRIMARY KEY,
    png BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS pairs (
    id TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,
    image_a TEXT NOT NULL REFERENCES images(hash),
    image_b TEXT NOT NULL REFERENCES images(hash),
    source TEXT NOT NULL,
    batch TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    metadata TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS pairs_by_batch ON pairs(batch);
CREATE TABLE IF NOT EXISTS labellers (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    id TEXT PRIMARY KEY,
    pair TEXT NOT NULL REFERENCES pairs(id),
    labeller TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('1', '2', 'tie', 'skip')),
    created REAL NOT NULL,
    image_a TEXT NOT NULL,
    image_b TEXT NOT NULL,
    undone REAL
);
CREATE INDEX IF NOT EXISTS labels_by_pair ON labels(pair);
CREATE INDEX IF NOT EXISTS labels_by_labeller ON labels(labeller, created);
CREATE TABLE IF NOT EXISTS queue (
    pair TEXT PRIMARY KEY REFERENCES pairs(id),
    rank INTEGER NOT NULL,
    selection TEXT NOT NULL
);
"""


class LabelStoreError(ValueError):
    """Bad input to the label store (unknown pair, choice or labeller, a malformed import line); the message
    names it."""


@dataclass(frozen=True)
class Pair:
    """A prompt and two images to choose between."""

    id: str
    prompt: str
    image_a: str
    """sha256 of the first image's PNG bytes."""
    image_b: str
    source: str
    batch: str | None = None
    priority: int = 0
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Label:
    """One choice of one labeller on one pair."""

    id: str
    pair: str
    labeller: str
    choice: str
    created: float
    image_a: str
    image_b: str
    undone: float | None = None


@dataclass(frozen=True)
class Comparison:
    """A labelled pair with its images, for training a preference model: `choice` is "1", "2" or "tie"."""

    pair: str
    prompt: str
    png_a: bytes
    png_b: bytes
    choice: str
    labeller: str


def png_bytes(image: Image.Image | bytes) -> bytes:
    """An image as PNG bytes (bytes are taken to be PNG already and checked)."""
    if isinstance(image, bytes):
        if not image.startswith(b"\x89PNG\r\n\x1a\n"):
            raise LabelStoreError("image bytes are not a PNG file")
        return image
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def image_hash(png: bytes) -> str:
    return hashlib.sha256(png).hexdigest()


def pair_id(prompt: str, hash_a: str, hash_b: str) -> str:
    """A pair is its prompt and its two images in order: adding it twice adds it once."""
    return hashlib.sha256(f"{prompt}\0{hash_a}\0{hash_b}".encode()).hexdigest()[:32]


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LabelStore:
    """The SQLite label store at `path` (created with its tables if missing). Thread-safe; several processes
    may open the same file (SQLite's locking, a 30 s busy timeout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise LabelStoreError(f"label store {self.path} is a directory; give a file path such as labels.db")
        if not self.path.parent.is_dir():
            raise LabelStoreError(f"label store {self.path}: directory {self.path.parent} does not exist")
        try:
            self._connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a label acknowledged to the labeller survives a power cut too, not only a killed process.
            self._connection.execute("PRAGMA synchronous=FULL")
            self._connection.execute("PRAGMA foreign_keys=ON")
            version = self._connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LabelStoreError(f"label store {self.path} has schema version {version}; this ddpo reads up to {SCHEMA_VERSION}: upgrade ddpo")
            self._connection.executescript(_SCHEMA)
            self._connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as error:
            raise LabelStoreError(f"label store {self.path} is not a usable SQLite file: {error}") from error
        self._lock = threading.Lock()

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "LabelStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _transaction(self):
        return _Transaction(self._connection, self._lock)

    def _query(self, sql: str, parameters: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._connection.execute(sql, parameters).fetchall()

    # ---- labellers ----------------------------------------------------------------------------------------
    def add_labeller(self, name: str, *, replace: bool = False) -> str:
        """Create labeller `name` and return a new token (shown once; only its hash is kept). `replace` gives an
        existing labeller a new token, which invalidates the old one."""
        name = name.strip()
        if not name or len(name) > 64 or any(c.isspace() for c in name):
            raise LabelStoreError(f"labeller name {name!r} must be 1-64 characters without spaces")
        token = secrets.token_urlsafe(24)
        with self._transaction() as connection:
            exists = connection.execute("SELECT 1 FROM labellers WHERE name = ?", (name,)).fetchone()
            if exists and not replace:
                raise LabelStoreError(f"labeller {name!r} already exists; give them a new token with --replace")
            connection.execute(
                "INSERT INTO labellers(name, token_hash, created) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET token_hash = excluded.token_hash",
                (name, _token_hash(token), time.time()),
            )
        return token

    def labeller_for_token(self, token: str | None) -> str | None:
        """The labeller whose token this is, or None."""
        if not token:
            return None
        rows = self._query("SELECT name FROM labellers WHERE token_hash = ?", (_token_hash(token),))
        return rows[0][0] if rows else None

    def labellers(self) -> list[str]:
        return [row[0] for row in self._query("SELECT name FROM labellers ORDER BY name")]

    # ---- pairs --------------------------------------------------------------------------------------------
    def add_pairs(
        self,
        pairs: Sequence[tuple[str, Image.Image | bytes, Image.Image | bytes]],
        *,
        source: str,
        batch: str | None = None,
        priority: int = 0,
        metadata: Sequence[dict] | None = None,
    ) -> list[str]:
        """Add (prompt, image_a, image_b) pairs in one transaction; returns their ids. A pair already in the store
        keeps its labels (its priority rises to `priority` if that is higher)."""
        prepared = []
        for index, (prompt, image_a, image_b) in enumerate(pairs):
            if not isinstance(prompt, str):
                raise LabelStoreError(f"pair {index}: the prompt must be text, got {type(prompt).__name__}")
            png_a, png_b = png_bytes(image_a), png_bytes(image_b)
            extra = json.dumps(metadata[index] if metadata else {}, default=str)
            prepared.append((prompt, png_a, png_b, image_hash(png_a), image_hash(png_b), extra))
        ids = []
        now = time.time()
        with self._transaction() as connection:
            sequence = connection.execute("SELECT COALESCE(MAX(seq), 0) FROM pairs").fetchone()[0]
            for prompt, png_a, png_b, hash_a, hash_b, extra in prepared:
                connection.executemany("INSERT OR IGNORE INTO images(hash, png) VALUES (?, ?)", [(hash_a, png_a), (hash_b, png_b)])
                identifier = pair_id(prompt, hash_a, hash_b)
                sequence += 1
                connection.execute(
                    "INSERT INTO pairs(id, prompt, image_a, image_b, source, batch, priority, metadata, created, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET priority = MAX(priority, excluded.priority)",
                    (identifier, prompt, hash_a, hash_b, source, batch, priority, extra, now, sequence),
                )
                ids.append(identifier)
        return ids

    def set_priority(self, pairs: Sequence[str], priority: int) -> None:
        """Move pairs up or down the queue (the online trainer lowers the pairs it stopped waiting for, so that
        its next batch is shown before them)."""
        with self._transaction() as connection:
            connection.executemany("UPDATE pairs SET priority = ? WHERE id = ?", [(priority, identifier) for identifier in pairs])

    def pair(self, identifier: str) -> Pair:
        rows = self._query("SELECT id, prompt, image_a, image_b, source, batch, priority, metadata FROM pairs WHERE id = ?", (identifier,))
        if not rows:
            raise LabelStoreError(f"no pair {identifier!r} in {self.path}")
        return _pair(rows[0])

    def image(self, hash_: str) -> bytes:
        rows = self._query("SELECT png FROM images WHERE hash = ?", (hash_,))
        if not rows:
            raise LabelStoreError(f"no image {hash_!r} in {self.path}")
        return rows[0][0]

    def num_pairs(self) -> int:
        return self._query("SELECT COUNT(*) FROM pairs")[0][0]

    def next_pair(self, labeller: str) -> Pair | None:
        """The pair to show `labeller` next: one they have not labelled, highest priority first (the online
        trainer's pairs), then in the order of the last pair selection (`set_queue`), then those with the fewest
        labels from anyone, then the oldest."""
        rows = self._query(
            "SELECT p.id, p.prompt, p.image_a, p.image_b, p.source, p.batch, p.priority, p.metadata FROM pairs p LEFT JOIN queue q ON q.pair = p.id "
            "WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair = p.id AND l.labeller = ? AND l.undone IS NULL) "
            "ORDER BY p.priority DESC, q.rank IS NULL, q.rank ASC, (SELECT COUNT(*) FROM labels l WHERE l.pair = p.id AND l.undone IS NULL) ASC, p.seq ASC LIMIT 1",
            (labeller,),
        )
        return _pair(rows[0]) if rows else None

    def set_queue(self, ordered: Sequence[tuple[str, str]], *, replace: bool = True) -> None:
        """Queue (pair id, selection) in this order, ahead of unqueued pairs of the same priority; `selection`
        says how it was chosen ("random" or "active", `ddpo.preference.active`). `replace` drops the previous
        order's ranks (its tags stay, so a held-out set of randomly chosen pairs survives reselection)."""
        with self._transaction() as connection:
            known = {row[0] for row in connection.execute("SELECT id FROM pairs")}
            missing = [identifier for identifier, _ in ordered if identifier not in known]
            if missing:
                raise LabelStoreError(f"no pair {missing[0]!r} in {self.path}")
            if replace:
                connection.execute("UPDATE queue SET rank = 1000000000 + rank WHERE rank < 1000000000")
            connection.executemany(
                "INSERT INTO queue(pair, rank, selection) VALUES (?, ?, ?) ON CONFLICT(pair) DO UPDATE SET rank = excluded.rank, "
                "selection = CASE WHEN queue.selection = 'random' THEN 'random' ELSE excluded.selection END",
                [(identifier, rank, selection) for rank, (identifier, selection) in enumerate(ordered)],
            )

    def queue(self) -> list[tuple[str, str]]:
        """The last pair selection's queue, in order: (pair id, "random" or "active")."""
        return [tuple(row) for row in self._query("SELECT pair, selection FROM queue WHERE rank < 1000000000 ORDER BY rank")]

    def selections(self) -> dict[str, str]:
        """How each queued pair was chosen: pair id -> "random" or "active" (a pair once drawn at random stays
        "random": it is part of the unbiased sample held-out accuracy is measured on)."""
        return dict(self._query("SELECT pair, selection FROM queue"))

    def unlabelled_pairs(self) -> list[Pair]:
        """Pairs with no current label from anyone, oldest first."""
        rows = self._query(
            "SELECT p.id, p.prompt, p.image_a, p.image_b, p.source, p.batch, p.priority, p.metadata FROM pairs p "
            "WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair = p.id AND l.undone IS NULL) ORDER BY p.seq"
        )
        return [_pair(row) for row in rows]

    # ---- labels -------------------------------------------------------------------------------------------
    def record(self, labeller: str, pair: str, choice: str) -> Label:
        """Write one label in its own transaction (durable when this returns). A labeller's new label on a pair
        replaces (undoes) their earlier one."""
        if choice not in CHOICES:
            raise LabelStoreError(f"choice {choice!r} is not one of {', '.join(CHOICES)}")
        with self._transaction() as connection:
            if not connection.execute("SELECT 1 FROM labellers WHERE name = ?", (labeller,)).fetchone():
                raise LabelStoreError(f"unknown labeller {labeller!r}")
            row = connection.execute("SELECT image_a, image_b FROM pairs WHERE id = ?", (pair,)).fetchone()
            if row is None:
                raise LabelStoreError(f"no pair {pair!r} in {self.path}")
            now = time.time()
            connection.execute("UPDATE labels SET undone = ? WHERE pair = ? AND labeller = ? AND undone IS NULL", (now, pair, labeller))
            label = Label(uuid.uuid4().hex, pair, labeller, choice, now, row[0], row[1])
            connection.execute(
                "INSERT INTO labels(id, pair, labeller, choice, created, image_a, image_b) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (label.id, label.pair, label.labeller, label.choice, label.created, label.image_a, label.image_b),
            )
        return label

    def undo(self, labeller: str) -> Label | None:
        """Undo `labeller`'s most recent label (kept, marked undone); returns it, or None if there is none."""
        with self._transaction() as connection:
            row = connection.execute(
                "SELECT id, pair, labeller, choice, created, image_a, image_b, undone FROM labels "
                "WHERE labeller = ? AND undone IS NULL ORDER BY created DESC, rowid DESC LIMIT 1",
                (labeller,),
            ).fetchone()
            if row is None:
                return None
            connection.execute("UPDATE labels SET undone = ? WHERE id = ?", (time.time(), row[0]))
        return Label(*row)

    def labels(self, *, include_undone: bool = False, labeller: str | None = None) -> list[Label]:
        """Labels in the order they were made."""
        where, parameters = [], []
        if not include_undone:
            where.append("undone IS NULL")
        if labeller is not None:
            where.append("labeller = ?")
            parameters.append(labeller)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._query(f"SELECT id, pair, labeller, choice, created, image_a, image_b, undone FROM labels {clause} ORDER BY created, rowid", parameters)
        return [Label(*row) for row in rows]

    def label_latencies(self, since: float) -> list[float]:
        """Seconds from a pair entering the store to each current label on it made after time `since`, in the
        order the labels were made (the online reward's label latency)."""
        rows = self._query("SELECT l.created - p.created FROM labels l JOIN pairs p ON p.id = l.pair WHERE l.undone IS NULL AND l.created > ? ORDER BY l.created", (since,))
        return [row[0] for row in rows]

    def choices(self, pairs: Sequence[str]) -> dict[str, list[str]]:
        """The current (not undone) choices on each of `pairs`, from every labeller."""
        found: dict[str, list[str]] = {identifier: [] for identifier in pairs}
        for start in range(0, len(pairs), 500):
            chunk = list(pairs[start : start + 500])
            marks = ",".join("?" * len(chunk))
            for pair, choice in self._query(f"SELECT pair, choice FROM labels WHERE undone IS NULL AND pair IN ({marks}) ORDER BY created", chunk):
                found[pair].append(choice)
        return found

    def progress(self, labeller: str | None = None) -> dict:
        """Counts for the page: pairs in the store, labels per labeller, and what is left for `labeller`."""
        per_labeller = dict(self._query("SELECT labeller, COUNT(*) FROM labels WHERE undone IS NULL GROUP BY labeller ORDER BY labeller"))
        total = self.num_pairs()
        result = {"pairs": total, "labelled_pairs": self._query("SELECT COUNT(DISTINCT pair) FROM labels WHERE undone IS NULL")[0][0], "labels_per_labeller": per_labeller}
        if labeller is not None:
            result["labeller"] = labeller
            result["yours"] = per_labeller.get(labeller, 0)
            result["remaining"] = total - result["yours"]
        return result

    def comparisons(self) -> list[Comparison]:
        """Every current label that states a preference or a tie (skips left out), with its pair's images."""
        rows = self._query(
            "SELECT l.pair, p.prompt, a.png, b.png, l.choice, l.labeller FROM labels l JOIN pairs p ON p.id = l.pair "
            "JOIN images a ON a.hash = p.image_a JOIN images b ON b.hash = p.image_b "
            "WHERE l.undone IS NULL AND l.choice != 'skip' ORDER BY l.created, l.rowid"
        )
        return [Comparison(*row) for row in rows]

    # ---- export and import ---------------------------------------------------------------------------------
    def export_jsonl(self, path: str | Path, *, images: bool = True, include_undone: bool = True) -> int:
        """Write one JSON object per label (with its pair's prompt and, unless `images` is false, both PNGs as
        base64); returns the number of lines."""
        lines = []
        for label in self.labels(include_undone=include_undone):
            pair = self.pair(label.pair)
            record = {
                "id": label.id, "labeller": label.labeller, "choice": label.choice, "created": label.created, "undone": label.undone,
                "pair": label.pair, "prompt": pair.prompt, "image_a": label.image_a, "image_b": label.image_b,
                "source": pair.source, "metadata": pair.metadata,
            }  # fmt: skip
            if images:
                record["png_a"] = base64.b64encode(self.image(label.image_a)).decode()
                record["png_b"] = base64.b64encode(self.image(label.image_b)).decode()
            lines.append(json.dumps(record))
        destination = Path(path)
        temporary = destination.with_name(destination.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in lines))
        temporary.replace(destination)
        return len(lines)

    def import_jsonl(self, path: str | Path) -> dict[str, int]:
        """Merge the labels of a JSONL export: labels already here (same id) are skipped, a label undone in the
        file is undone here too. Labellers are created without a usable token. All or nothing: one transaction."""
        records = list(_read_export(Path(path)))
        added = skipped = 0
        with self._transaction() as connection:
            for line_number, record in records:
                where = f"{path}:{line_number}"
                for hash_, key in ((record["image_a"], "png_a"), (record["image_b"], "png_b")):
                    if key in record:
                        png = base64.b64decode(record[key])
                        if image_hash(png) != hash_:
                            raise LabelStoreError(f"{where}: {key} does not match its hash {hash_}")
                        connection.execute("INSERT OR IGNORE INTO images(hash, png) VALUES (?, ?)", (hash_, png))
                    elif not connection.execute("SELECT 1 FROM images WHERE hash = ?", (hash_,)).fetchone():
                        raise LabelStoreError(f"{where}: image {hash_} is neither in the file (exported with --no-images?) nor in {self.path}")
                identifier = pair_id(record["prompt"], record["image_a"], record["image_b"])
                if identifier != record["pair"]:
                    raise LabelStoreError(f"{where}: pair id {record['pair']} does not match its prompt and images")
                sequence = connection.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM pairs").fetchone()[0]
                connection.execute(
                    "INSERT OR IGNORE INTO pairs(id, prompt, image_a, image_b, source, metadata, created, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (identifier, record["prompt"], record["image_a"], record["image_b"], record.get("source", "import"), json.dumps(record.get("metadata", {})), record["created"], sequence),
                )
                connection.execute(
                    "INSERT OR IGNORE INTO labellers(name, token_hash, created) VALUES (?, ?, ?)",
                    (record["labeller"], "imported:" + secrets.token_hex(16), time.time()),
                )
                cursor = connection.execute(
                    "INSERT OR IGNORE INTO labels(id, pair, labeller, choice, created, image_a, image_b, undone) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (record["id"], identifier, record["labeller"], record["choice"], record["created"], record["image_a"], record["image_b"], record.get("undone")),
                )
                if cursor.rowcount:
                    added += 1
                else:
                    skipped += 1
                    if record.get("undone") is not None:
                        connection.execute("UPDATE labels SET undone = ? WHERE id = ? AND undone IS NULL", (record["undone"], record["id"]))
        return {"added": added, "already_present": skipped}


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error), holding the store's thread lock."""

    def __init__(self, connection: sqlite3.Connection, lock: threading.Lock) -> None:
        self.connection, self.lock = connection, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.connection.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.connection

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            self.connection.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()


def _pair(row: tuple) -> Pair:
    return Pair(id=row[0], prompt=row[1], image_a=row[2], image_b=row[3], source=row[4], batch=row[5], priority=row[6], metadata=json.loads(row[7]))


_EXPORT_KEYS = ("id", "labeller", "choice", "created", "pair", "prompt", "image_a", "image_b")


def _read_export(path: Path) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise LabelStoreError(f"no file {path}")
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise LabelStoreError(f"{path}:{line_number}: not JSON ({error.msg})") from error
        missing = [key for key in _EXPORT_KEYS if key not in record] if isinstance(record, dict) else list(_EXPORT_KEYS)
        if missing:
            raise LabelStoreError(f"{path}:{line_number}: a label needs {', '.join(missing)}")
        if record["choice"] not in CHOICES:
            raise LabelStoreError(f"{path}:{line_number}: choice {record['choice']!r} is not one of {', '.join(CHOICES)}")
        yield line_number, record


def decode_png(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")
