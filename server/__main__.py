"""`python -m server`: serve with settings from the environment (MHR_*); none -> the demo bundle."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from .app import create_app
from .settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mhr-serve", description=__doc__)
    parser.add_argument("--host", help="overrides MHR_HOST")
    parser.add_argument("--port", type=int, help="overrides MHR_PORT")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=30, timeout_keep_alive=settings.keep_alive_s)


if __name__ == "__main__":
    main()
