"""``cxr``: one entry point, with subcommands for the model, the service and its clients.

Subcommand modules are imported only when used: ``cxr submit`` must not pay for TensorFlow.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import requests

from cli.client import ClientError
from shared.settings import SettingsError


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the CNN on a folder with a manifest.csv")
    p.add_argument("--data", type=Path, default=Path("../shared/data/cxr"))
    p.add_argument("--out", type=Path, default=Path("models/cxr-cnn.npz"))
    p.add_argument("--recipe", choices=("paper", "robust", "adult"), default="paper")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--warmup-epochs", type=int, default=5, help="early stopping ignores these")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument(
        "--stop-fraction",
        type=float,
        default=0.15,
        help="share of training patients watched by early stopping",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-images", type=int, default=0, help="patient-level subset (quick runs)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a model on a labelled folder of images")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--labels", type=Path, required=True, help="CSV: file,label[,source,patient]")
    p.add_argument("--json", type=Path, help="write the metrics here")
    p.add_argument("--roc", type=Path, help="ROC curve PNG (default: next to --json, or roc.png)")
    p.add_argument("--model", type=Path, help="model weights (.npz; default: the bundled model)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument(
        "--validation-only",
        action="store_true",
        help="keep only the model's validation patients (evaluating on its own training data)",
    )
    p.set_defaults(func=_cmd_evaluate)


def _cmd_train(args: argparse.Namespace) -> int:
    from ml.train import TrainOptions, summary_lines, train

    if not (args.data / "manifest.csv").is_file():
        print(f"error: {args.data / 'manifest.csv'} not found", file=sys.stderr)
        return 2
    meta = train(
        TrainOptions(
            data=args.data,
            out=args.out,
            recipe=args.recipe,
            epochs=args.epochs,
            patience=args.patience,
            warmup_epochs=args.warmup_epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            val_fraction=args.val_fraction,
            stop_fraction=args.stop_fraction,
            seed=args.seed,
            max_images=args.max_images,
            progress=not args.quiet,
        )
    )
    print("\n".join(summary_lines(meta)))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ml.evaluate import EvaluationError, evaluate_folder, report_lines
    from shared.settings import get_settings

    settings = get_settings()
    model_path = args.model or settings.model_path
    roc = args.roc or (args.json.with_suffix(".roc.png") if args.json else Path("roc.png"))
    try:
        report = evaluate_folder(
            args.images,
            args.labels,
            model_path,
            roc_path=roc,
            max_pixels=settings.max_image_pixels,
            n_boot=args.bootstrap,
            validation_only=args.validation_only,
        )
    except (EvaluationError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(report)))
    if args.json:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    print(f"wrote {roc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(sub)
    from cli import client, keys, service

    service.add_commands(sub)
    client.add_commands(sub)
    keys.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=os.environ.get("CXR_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # start-up noise
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except requests.ConnectionError as exc:
        print(
            f"error: cannot reach the server ({exc.request.url if exc.request else ''})",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
