"""``hf-svdq push``: publish a saved hf_svdq checkpoint with a generated model card."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("push", help="upload a saved hf_svdq checkpoint (with a generated model card) or an hf-svdq export folder to the Hub")
    p.add_argument("checkpoint", type=Path, help="folder written by save_pretrained / hf-svdq compress / hf-svdq export")
    p.add_argument("repo_id", help="user/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to commit to (created from main if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message")
    p.add_argument("--base-model", help="Hub id of the uncompressed model (default: known for @smollm2)")
    p.add_argument("--eval", type=Path, help="`hf-svdq eval --json` result to quote in the card")
    p.add_argument("--analysis", type=Path, help="`hf-svdq analyze --out` folder: heatmap and findings in the card")
    p.add_argument("--overwrite-card", action="store_true", help="replace a hand-written README.md with a generated card")
    p.add_argument("--no-card", action="store_true", help="upload the folder as it is")


def cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from ..publishing.hub import push_checkpoint

    for option, path in (("--eval", args.eval), ("--analysis", args.analysis)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{option} {path} does not exist")
    try:
        info = push_checkpoint(
            args.checkpoint, args.repo_id, private=args.private or None, revision=args.revision, create_pr=args.create_pr,
            commit_message=args.commit_message, card=not args.no_card, overwrite_card=args.overwrite_card,
            base_model=args.base_model, evaluation=args.eval, analysis_dir=args.analysis,
        )
    except HfHubHTTPError as err:
        print(f"hf-svdq push: the Hub refused the upload, nothing was committed: {err}", file=sys.stderr)
        return 2
    print(f"pushed {args.checkpoint} to {info.commit_url} (commit {info.oid})")
    return 0

