# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Files that are whole or absent: atomic writes
#
# > Every file segbook writes — checkpoints, codecs, configs, metrics, results JSON, tables, figures — goes through one
# > function, so a killed run or two concurrent writers never leave a half-written file behind.

# %%
#| default_exp io

# %% [markdown]
# A reader of a file (a resumed run, `reproduce` merging the claims ledger, a second process reading `results.json`)
# must see either the old content or the new, never a truncated mix. The POSIX recipe: write a temporary file **in
# the same folder** (a rename is atomic only within one file system), flush it to disk, then `os.replace` it over
# the target. Two details decide whether it holds under concurrency and kills:
#
# - the temporary name must be **unique per writer** (`tempfile.mkstemp`): with a fixed `NAME.tmp`, two writers
#   interleave their bytes in one temporary file and one of them renames the mixture into place;
# - a writer killed between creating and renaming its temporary file leaves it behind. The names follow one
#   pattern, `.NAME.<random>.tmp` (hidden, beside NAME), so `remove_stale_temps` can find and delete them when a
#   run resumes.
#
# The standard library has no such function (`tempfile` makes the unique file, `os.replace` renames), and the
# short version below is what every writer in the package calls.

# %%
#| export
import json
import os
import tempfile
from pathlib import Path


def _file_mode() -> int:
    "What `open(path, 'w')` would give a new file: 0o666 less the process umask (read once: setting it is process-wide)."
    umask = os.umask(0o022); os.umask(umask)
    return 0o666 & ~umask

_MODE = _file_mode()

def atomic_write(path, # the file to (over)write
                 write, # write(f): fills the open temporary file
                 mode:str="w", # 'w' (text) or 'wb' (bytes)
                ) -> Path: # `path`
    "Call `write(f)` on a uniquely named temporary file beside `path`, flush it to disk, then rename it over `path`."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _MODE)               # mkstemp makes 0600; the file gets the usual permissions
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush(); os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

def write_text_atomic(text:str, path) -> Path:
    "`path.write_text(text)`, atomically."
    return atomic_write(path, lambda f: f.write(text))

def write_json_atomic(obj, path, indent:int=1) -> Path:
    "`obj` as JSON (non-JSON values through `str`), atomically."
    return atomic_write(path, lambda f: json.dump(obj, f, indent=indent, default=str))

def torch_save_atomic(obj, path) -> Path:
    "`torch.save(obj, path)`, atomically."
    import torch
    return atomic_write(path, lambda f: torch.save(obj, f), "wb")

def remove_stale_temps(path, # a file written by `atomic_write`
                      ) -> int: # how many leftovers were deleted
    "Delete the temporary files that killed writers of `path` left beside it."
    path = Path(path)
    stale = list(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


# %% [markdown]
# The book's tables are Markdown files written the same way: a list of rows (dicts with the same keys) becomes a
# table, floats with three decimals.

# %%
#| export
def write_markdown_table(rows:list, # list of dicts with the same keys
                         path, # output .md file
                         title:str="", # a line above the table
                        ) -> Path:
    "Write `rows` as a Markdown table (temp file + rename)."
    path = Path(path)
    keys = list(rows[0])
    lines = ([title, ""] if title else []) + ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in rows]
    return write_text_atomic("\n".join(lines) + "\n", path)


# %%
with tempfile.TemporaryDirectory() as d:
    md = write_markdown_table([{"codec": "PCA", "l=60": 0.93456}, {"codec": "DCT", "l=60": "–"}], Path(d) / "t.md", "Title").read_text()
assert md == "Title\n\n| codec | l=60 |\n|---|---|\n| PCA | 0.935 |\n| DCT | – |\n", md

# %% [markdown]
# ## Tests
#
# The target is replaced whole; a writer that fails leaves the old content and no temporary file; a temporary file
# left by a killed writer is found and removed.

# %%
import multiprocessing
import shutil

tmp = Path(tempfile.mkdtemp())
target = tmp / "results.json"
write_json_atomic({"ap": 0.5}, target)
assert json.loads(target.read_text()) == {"ap": 0.5}
assert target.stat().st_mode & 0o777 == _MODE              # as a plain open() would make it, not mkstemp's 0600

def boom(f):
    f.write('{"ap": 0.')           # a half-written file...
    raise RuntimeError("killed")   # ...and the writer dies
try:
    atomic_write(target, boom)
except RuntimeError:
    pass
assert json.loads(target.read_text()) == {"ap": 0.5} and list(tmp.iterdir()) == [target]

(tmp / ".results.json.abc123.tmp").write_text('{"ap"')   # what a SIGKILL between write and rename leaves
(tmp / ".other.json.x.tmp").write_text("")                # another file's leftover is not ours to delete
assert remove_stale_temps(target) == 1 and sorted(p.name for p in tmp.iterdir()) == [".other.json.x.tmp", "results.json"]

import torch
torch_save_atomic({"w": torch.arange(3)}, tmp / "last.pt")
assert torch.equal(torch.load(tmp / "last.pt", weights_only=True)["w"], torch.arange(3))
write_text_atomic("| a |\n", tmp / "t.md")
assert (tmp / "t.md").read_text() == "| a |\n"


# %% [markdown]
# Concurrent writers: four processes each write their own complete JSON to the same file 100 times while the main
# process keeps reading it. With unique temporary names every read parses and is one writer's whole document.

# %%
def _writer(args):
    path, k = args
    for i in range(100):
        write_json_atomic({"writer": k, "i": i, "pad": "x" * 4000}, path)
    return k

ctx = multiprocessing.get_context("fork")
target = tmp / "shared.json"
write_json_atomic({"writer": -1, "i": 0, "pad": ""}, target)
with ctx.Pool(4) as pool:
    pending = pool.map_async(_writer, [(target, k) for k in range(4)])
    reads = 0
    while not pending.ready():
        doc = json.loads(target.read_text())   # raises on a torn file
        assert doc["writer"] in (-1, 0, 1, 2, 3) and len(doc["pad"]) in (0, 4000)
        reads += 1
    assert sorted(pending.get()) == [0, 1, 2, 3]
assert reads > 0 and not list(tmp.glob(".shared.json.*.tmp"))
shutil.rmtree(tmp)
