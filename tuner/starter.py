"""`tuner init [PATH] [--gpu]`: a starter sweep file with comments, copied from the sweeps that ship inside the
package (`tuner/sweeps/`): the CPU default (SmolLM2 on diamonds, runs anywhere offline) or, with `--gpu`, the
original GPU recipe (Llama 3.1 8B, 4-bit NF4, the course's pricer data).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import TunerError

STARTERS = {False: "default.yaml", True: "pricer-llama31-8b.yaml"}

HEADER = """\
# Written by `tuner init{flag}` (tuner {version}). Every key has a default; an unknown key or a value out of
# range is refused with this file's name, the key and what is expected. Each search or train setting is a fixed
# value, a {{choices: [...]}} list or a {{low, high[, log]}} range. Run it with:
#   tuner run {path}                       (then: tuner status, tuner report, tuner promote)
#   tuner run {path} --set study.trials=8  (any key can be overridden on the command line)
#   tuner data {path}                      (the rows, splits, token lengths and baselines, before training)
"""


def packaged(name: str) -> str:
    """The text of a sweep file shipped in the package."""
    return resources.files("tuner").joinpath("sweeps", name).read_text()


def write_starter(path: str | Path, gpu: bool = False, force: bool = False) -> Path:
    from . import __version__

    dest = Path(path).expanduser()
    if dest.exists() and not force:
        raise TunerError(f"{dest} exists; choose another path or pass --force to overwrite it")
    if not dest.parent.is_dir():
        raise TunerError(f"{dest}: the folder {dest.parent} does not exist")
    text = HEADER.format(flag=" --gpu" if gpu else "", version=__version__, path=dest) + packaged(STARTERS[gpu])
    dest.write_text(text)
    return dest
