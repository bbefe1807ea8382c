"""``cxr``: one entry point, with subcommands for the model, the service and its clients.

Subcommand modules are imported only when used: ``cxr submit`` must not pay for TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import requests

from cli.client import ClientError
from shared.logs import configure_logging
from shared.settings import SettingsError, get_settings

#: The data given to the project (outside the repository), and where trained models go.
GIVEN_DATA = Path("../shared/data")
CLASSIFIER = Path("models/cxr-cnn.npz")
SEGMENTER = Path("models/cxr-lungs.npz")
SCOPE_NET = Path("models/cxr-scope.npz")  # beside the segmenter: shared.lungs.SCOPE_NET_FILE


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a screening model from labelled films (a folder with manifest.csv)"
    )
    p.add_argument("--data", type=Path, default=GIVEN_DATA / "cxr")
    p.add_argument("--out", type=Path, default=CLASSIFIER)
    p.add_argument(
        "--recipe",
        default="lungs-adult",
        help="a recipe of ml.train.RECIPES: lungs-adult (lung crop, adult films only), "
        "small-adult and its levers, lungs, lungs-clahe, paper",
    )
    p.add_argument(
        "--segmenter",
        type=Path,
        default=SEGMENTER,
        help="lung segmenter for the lungs recipes (cxr train-lungs writes it)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "cxr-screen" / "arrays",
        help="preprocessed films, keyed by file bytes, preprocessing and segmenter",
    )
    p.add_argument("--no-cache", action="store_true")
    p.add_argument(
        "--hold-out-source",
        default="",
        help="train without this source and validate on all of its films (an unseen site)",
    )
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--patience", type=int, help="default: the recipe's")
    p.add_argument("--warmup-epochs", type=int, help="early stopping ignores these")
    p.add_argument(
        "--monitor",
        choices=("loss", "adult_auc"),
        help="early stopping watches the weighted loss or the adult AUC of its split "
        "(default: the recipe's)",
    )
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
    p.add_argument("--bootstrap", type=int, default=1000, help="patient resamples per interval")
    p.add_argument(
        "--cv-dir",
        type=Path,
        help="`cxr cv --out` of this recipe: fit calibration and threshold on its out-of-fold "
        "predictions (default: on the early-stopping split)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "cv",
        help="cross-validate recipes by patient: out-of-fold ship rule with intervals and spread",
    )
    p.add_argument("--data", type=Path, default=GIVEN_DATA / "cxr")
    p.add_argument("--recipe", action="append", help="repeat for several (default: lungs-adult)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--only-fold", type=int, action="append", default=[], help="quick runs")
    p.add_argument("--hold-out-only", action="store_true", help="only the leave-one-source-out run")
    p.add_argument("--out", type=Path, default=Path("cv-out"), help="reports and OOF tables")
    p.add_argument(
        "--hold-out-source",
        default="actualmed",
        help="also train without this source and score all of it ('' for none)",
    )
    p.add_argument("--segmenter", type=Path, default=SEGMENTER)
    p.add_argument(
        "--cache-dir", type=Path, default=Path.home() / ".cache" / "cxr-screen" / "arrays"
    )
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--patience", type=int, help="default: the recipe's")
    p.add_argument("--warmup-epochs", type=int, help="early stopping ignores these")
    p.add_argument("--monitor", choices=("loss", "adult_auc"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-images", type=int, default=0, help="patient-level subset (quick runs)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_cv)

    p = sub.add_parser(
        "cv-compare",
        help="paired difference of two recipes' out-of-fold tables (other - base), with intervals",
    )
    p.add_argument("base", type=Path, help="RECIPE.oof.csv written by cxr cv")
    p.add_argument("other", type=Path)
    p.add_argument("--data", type=Path, default=GIVEN_DATA / "cxr")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.set_defaults(func=_cmd_cv_compare)

    p = sub.add_parser(
        "train-lungs", help="train the lung finder that crops films and rejects non-chest images"
    )
    p.add_argument("--data", type=Path, default=GIVEN_DATA / "cxr")
    p.add_argument("--masks", type=Path, default=GIVEN_DATA / "cxr-lungs")
    p.add_argument(
        "--scope",
        type=Path,
        default=GIVEN_DATA / "cxr-scope",
        help="out-of-scope films (lateral, CT); half of their patients teach 'no lungs here'",
    )
    p.add_argument("--out", type=Path, default=SEGMENTER)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train_lungs)

    p = sub.add_parser(
        "train-scope",
        help="train the scope net (frontal chest film? a child's?) that backs the lung rule",
    )
    p.add_argument("--data", type=Path, default=GIVEN_DATA / "cxr")
    p.add_argument(
        "--scope",
        type=Path,
        default=GIVEN_DATA / "cxr-scope",
        help="out-of-scope films (lateral, CT): frontal 0",
    )
    p.add_argument("--segmenter", type=Path, default=SEGMENTER, help="whose masks it reads")
    p.add_argument(
        "--out",
        type=Path,
        default=SCOPE_NET,
        help="where to write it; the segmenter loads it only as cxr-scope.npz beside itself",
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train_scope)

    p = sub.add_parser(
        "audit-scope",
        help="measure how often frontal films are wrongly skipped and other images scored",
    )
    p.add_argument("--images", type=Path, default=GIVEN_DATA / "cxr")
    p.add_argument("--scope", type=Path, default=GIVEN_DATA / "cxr-scope")
    p.add_argument("--segmenter", type=Path, default=SEGMENTER)
    p.add_argument("--generated-per-kind", type=int, default=20)
    p.add_argument(
        "--folds",
        type=int,
        default=0,
        help="out of fold: train a scope net per fold of patients (5 is the audit of record) "
        "and decide each film with the one that never saw it; 0: grade the bundled nets",
    )
    p.add_argument("--epochs", type=int, default=30, help="per fold's scope net (--folds)")
    p.add_argument("--seed", type=int, default=42, help="folds and nets (--folds)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.set_defaults(func=_cmd_audit_scope)

    p = sub.add_parser(
        "evaluate",
        help="measure a model on labelled films: accuracy, sensitivity, specificity, AUC",
    )
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


def _schedule(args: argparse.Namespace) -> Any:
    """The recipe's schedule with whatever the command line overrides; None: the recipe's."""
    from ml.train import RECIPES, Schedule

    given = {
        "epochs": args.epochs,
        "patience": args.patience,
        "warmup_epochs": args.warmup_epochs,
        "monitor": args.monitor,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    base = RECIPES[args.recipe].schedule if args.recipe in RECIPES else Schedule()
    return dataclasses.replace(base, **given)


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
            schedule=_schedule(args),
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            val_fraction=args.val_fraction,
            stop_fraction=args.stop_fraction,
            seed=args.seed,
            max_images=args.max_images,
            segmenter=args.segmenter,
            cache_dir=None if args.no_cache else args.cache_dir,
            hold_out_source=args.hold_out_source,
            n_boot=args.bootstrap,
            progress=not args.quiet,
            cv_dir=args.cv_dir,
        )
    )
    print("\n".join(summary_lines(meta)))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


def _cmd_cv(args: argparse.Namespace) -> int:
    from ml.cv import CVOptions, run_cv

    if not (args.data / "manifest.csv").is_file():
        print(f"error: {args.data / 'manifest.csv'} not found", file=sys.stderr)
        return 2
    recipes = args.recipe or ["lungs-adult"]
    args.recipe = recipes[0]  # _schedule overrides start from the first recipe's schedule
    run_cv(
        CVOptions(
            data=args.data,
            out=args.out,
            recipes=recipes,
            folds=args.folds,
            seed=args.seed,
            hold_out_source=args.hold_out_source,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            schedule=_schedule(args),
            max_images=args.max_images,
            segmenter=args.segmenter,
            cache_dir=None if args.no_cache else args.cache_dir,
            n_boot=args.bootstrap,
            progress=not args.quiet,
            only_folds=args.only_fold,
            hold_out_only=args.hold_out_only,
        )
    )
    print(f"wrote {args.out}/cv-report.json and one out-of-fold table per recipe")
    return 0


def _cmd_cv_compare(args: argparse.Namespace) -> int:
    from ml.cv import compare
    from ml.metrics import fmt

    out = compare(args.data, args.base, args.other, args.bootstrap)
    print(f"{args.other.name} - {args.base.name}, paired over {out.pop('n')} films:")
    for key, block in out.items():
        ci = block["ci95"]
        tail = f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""
        print(f"  {key:18s} {fmt(block['value'])}{tail}")
    return 0


def _cmd_train_lungs(args: argparse.Namespace) -> int:
    from ml.segment import SegmentOptions, train_segmenter

    meta = train_segmenter(
        SegmentOptions(
            data=args.data,
            masks=args.masks,
            out=args.out,
            scope=args.scope if (args.scope / "manifest.csv").is_file() else None,
            epochs=args.epochs,
            seed=args.seed,
            progress=not args.quiet,
        )
    )
    print(f"segmenter {meta['version']}  held-out Dice {meta['validation']}")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


def _scope_options(args: argparse.Namespace, out: Path) -> Any:
    from ml.scope_net import ScopeOptions

    data = getattr(args, "data", None) or args.images
    return ScopeOptions(
        data=data,
        scope=args.scope if (args.scope / "manifest.csv").is_file() else None,
        segmenter=args.segmenter,
        out=out,
        epochs=args.epochs,
        seed=args.seed,
        progress=not getattr(args, "quiet", True),
    )


def _cmd_train_scope(args: argparse.Namespace) -> int:
    from ml.scope_net import train_scope

    if not (args.data / "manifest.csv").is_file():
        print(f"error: {args.data / 'manifest.csv'} not found", file=sys.stderr)
        return 2
    meta = train_scope(_scope_options(args, args.out))
    d = meta["decision"]
    print(
        f"scope net {meta['version']}: {d['combine']}, frontal >= {d['frontal_threshold']}, "
        f"child >= {d['child_threshold']}, {meta['training']['seconds']} s"
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


def _cmd_audit_scope(args: argparse.Namespace) -> int:
    import json

    from ml.scope import audit_scope, scope_lines
    from shared.lungs import LungSegmenter

    if args.folds:
        from ml.scope_net import audit_folds, report_lines

        if not (args.images / "manifest.csv").is_file():
            print(f"error: {args.images / 'manifest.csv'} not found", file=sys.stderr)
            return 2
        report = audit_folds(_scope_options(args, Path("/dev/null")), args.folds)
        print("\n".join(report_lines(report)))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    report = audit_scope(
        LungSegmenter(args.segmenter),
        args.images if (args.images / "manifest.csv").is_file() else None,
        args.scope if (args.scope / "manifest.csv").is_file() else None,
        args.generated_per_kind,
    )
    print("\n".join(scope_lines(report)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
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


DESCRIPTION = """\
Screen chest X-rays for COVID-19: send films, get a probability and a label per film.
A screening aid, not a diagnosis; MODEL_CARD.md says how well it does, and on which films."""

EPILOG = """\
getting started (one machine):
  cxr serve                  start the service (leave it running)
  cxr submit FOLDER          send the films in FOLDER; prints a job id
  cxr wait JOB_ID            watch progress, then print each film's result
  cxr results JOB_ID --csv   the results again, as CSV

`cxr COMMAND --help` tells more about a command.  Settings come from CXR_* variables
(README.md lists them)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from cli import client, keys, service, status

    service.add_commands(sub)
    client.add_commands(sub)
    keys.add_commands(sub)
    status.add_commands(sub)
    _add_model_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        configure_logging(get_settings())
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # start-up noise
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
