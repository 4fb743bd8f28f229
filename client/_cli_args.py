"""The `mhr generate` command line's options -> the client's keyword arguments; UsageError for a bad one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """A problem with the command line or its files (exit status 2)."""


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
            "ignore_eos": args.ignore_eos or None, "do_sample": args.do_sample, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "num_beams": args.num_beams,
            "stop": args.stop}


def _guided(args: argparse.Namespace) -> dict[str, Any] | None:
    """--json-schema FILE or --regex RE -> /generate's `guided`."""
    if args.json_schema and args.regex:
        raise UsageError("give --json-schema or --regex, not both")
    if args.regex:
        return {"regex": args.regex}
    if not args.json_schema:
        return None
    try:
        return {"json_schema": json.loads(Path(args.json_schema).read_text())}
    except (OSError, ValueError) as exc:
        raise UsageError(f"--json-schema {args.json_schema}: {exc}") from None
