"""`redi <stage>`: one subcommand per pipeline stage; every Snakemake rule is one call of it.

Each stage takes explicit input/output paths plus the config keys it reads, as flags named after
the keys (pca.rank_max -> --rank-max). Defaults come from --configfile if given, else the schema.
The subcommands come from the stage registry (redi/stages.py): help, path flags, keys, runner.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from .config import add_config_flags, config_from_args
from .errors import ReDiError, WriteFailure
from .stages import STAGES, stage_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="redi", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.help)
        for path in stage.paths:
            p.add_argument(path.flag, required=path.required, help=path.help)
        p.add_argument("--configfile", help="YAML config whose keys replace the schema defaults")
        if stage.neural:
            p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda:N")
        add_config_flags(p, stage.keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args, list(STAGES[args.stage].keys))
        module, function = STAGES[args.stage].runner.split(":")
        getattr(importlib.import_module(module), function)(args, stage_config(config, args.stage))
    except ReDiError as err:
        print(f"redi {args.stage}: error: {err}", file=sys.stderr)
        if isinstance(err, WriteFailure):  # HDF5 would crash closing the failed file at exit
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        print(f"redi {args.stage}: error: {_os_error(err)}", file=sys.stderr)
        return 2
    return 0


# What a full disk, a quota or a read-only / unwritable results folder raise.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _os_error(err: OSError) -> str:
    """One line for a write the system refused: the file, the reason and the fix."""
    where = f"{err.filename}: " if err.filename else ""
    fix = ("free space and rerun" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
           else "make the results folder writable (or choose another) and rerun")
    return f"{where}{err.strerror}; {fix}"


if __name__ == "__main__":
    sys.exit(main())
