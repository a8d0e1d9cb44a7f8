"""What the subcommands share: the printed summary of a dataset job."""

from __future__ import annotations

import sys


def print_summary(command: str, result) -> int:
    """Print a ``JobResult``'s counts and first skipped items (rank 0 only); returns its exit
    status."""
    manifest = result.manifest
    if manifest is None:   # not rank 0: the manifest and the summary are rank 0's
        return 0
    counts = manifest["counts"]
    print(f"wsss-fast {command}: {counts.get('done', 0)} done, "
          f"{counts.get('already_done', 0)} already done, {counts.get('skipped', 0)} skipped",
          file=sys.stderr)
    for item in manifest["skipped"][:20]:
        print(f"  skipped {item['id']}: {item['reason']}", file=sys.stderr)
    if len(manifest["skipped"]) > 20:
        print(f"  ... {len(manifest['skipped']) - 20} more in the manifest", file=sys.stderr)
    return result.exit_status
