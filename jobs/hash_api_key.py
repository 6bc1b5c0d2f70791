"""python -m jobs.hash_api_key [--new]

Prints the SHA-256 digest of an API key for `auth.tenants.<name>.api_key_sha256` in ray_config.yaml. The key is
read from stdin (one line), never from the command line, so it lands in no shell history or process list:

    python -m jobs.hash_api_key < key.txt            # or type it and press Enter (the terminal echo is off)
    python -m jobs.hash_api_key --new                # make a fresh random key: prints the key, then its digest

See docs/security.md (adding a tenant, rotating a key).
"""
from __future__ import annotations

import argparse
import getpass
import secrets
import sys

from cluster.config import hash_api_key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.hash_api_key", description=__doc__.split("\n\n")[1])
    ap.add_argument("--new", action="store_true", help="generate a random key (32 bytes, URL-safe) and hash it")
    a = ap.parse_args(argv)
    if a.new:
        key = "mec-" + secrets.token_urlsafe(32)
        print(f"key:    {key}\nsha256: {hash_api_key(key)}")
        return 0
    key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline()
    key = key.rstrip("\r\n")
    if not key or key != key.strip():
        print("error: the key is empty or has leading/trailing whitespace", file=sys.stderr)
        return 2
    print(hash_api_key(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
