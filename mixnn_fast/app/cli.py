"""The ``mixnn`` command: train, evaluate, audit, demo, bench, info.

    mixnn train --config run.yaml --epochs 40 --method mixnn      # flags override the YAML
    mixnn train --out-dir runs/x --resume [--epochs 80]            # continue runs/x with its own settings
    mixnn evaluate runs/x                                          # test accuracy of a saved run
    mixnn audit runs/x [runs/y ...]                                # which given labels are wrong, beside cleanlab
    mixnn demo [--quick]                                           # CE, MixNN, MixNN+ on Fashion-MNIST
    mixnn table [--seeds 0 1 2] [--methods gce mixnn_plus]         # the results table (methods x noise)
    mixnn bench mixer [--quick]                                    # bench/<name>.py of a source checkout
    mixnn info                                                     # what the native extension was built with
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import runpy
import sys
from pathlib import Path


BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
#: bench/<name>.py of a source checkout that ``mixnn bench NAME`` runs (nothing else is run)
BENCHMARKS = ("mixer", "loader", "eval_loader", "epoch", "refresh", "refresh_gmm", "refresh_neighbours", "scale")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field, typed from its annotation; None means 'not given'."""
    from mixnn_fast.train.config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif kind.startswith("list[int]"):
            parser.add_argument(flag, dest=f.name, type=int, nargs="+", default=None)
        elif kind.startswith("int"):
            parser.add_argument(flag, dest=f.name, type=int, default=None)
        elif kind.startswith("float"):
            parser.add_argument(flag, dest=f.name, type=float, default=None)
        else:
            parser.add_argument(flag, dest=f.name, type=str, default=None)


def _given_settings(args: argparse.Namespace) -> dict:
    """The TrainConfig fields set in --config's YAML or on the command line (flags win)."""
    from mixnn_fast.train.config import TrainConfig, read_yaml_settings

    given = read_yaml_settings(args.config) if args.config else {}
    given.update({name: getattr(args, name) for name in TrainConfig.field_names()
                  if getattr(args, name, None) is not None})
    return given


def _config_from_args(args: argparse.Namespace):
    from mixnn_fast.train.config import TrainConfig

    if args.resume or args.resume_from_previous:
        return _resume_config(args)
    source = f"{args.config} (with the command line's flags)" if args.config else "command line"
    return TrainConfig.from_dict(_given_settings(args), source=source)


def _resume_config(args: argparse.Namespace):
    """The settings of the run being resumed, with the flags that may change applied; a flag
    that would change the experiment is an error naming it."""
    import yaml

    from mixnn_fast.train.checkpoint import CHECKPOINT, PREVIOUS, load_checkpoint
    from mixnn_fast.train.config import RESUMABLE_FIELDS, TrainConfig

    given = _given_settings(args)
    if "out_dir" not in given:
        raise ValueError("--resume: say which run with --out-dir (the folder the run writes to)")
    out = Path(given["out_dir"])
    if (out / CHECKPOINT).exists() or (out / PREVIOUS).exists():
        saved = load_checkpoint(out, previous=args.resume_from_previous)["config"]
        source = f"{out / (PREVIOUS if args.resume_from_previous else CHECKPOINT)}"
    elif (out / "config.yaml").exists():  # stopped before its first checkpoint: starts again from epoch 0
        saved = yaml.safe_load((out / "config.yaml").read_text())
        source = str(out / "config.yaml")
    else:
        raise FileNotFoundError(f"--resume: {out} holds no run (no {CHECKPOINT}, no config.yaml); "
                                "train it first without --resume")
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {source} does not hold a mapping of settings")
    saved_cfg = TrainConfig.from_saved(saved, source=source)
    changed = sorted(k for k, v in given.items() if k not in RESUMABLE_FIELDS and v != getattr(saved_cfg, k))
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {given[k]!r} (the run has {getattr(saved_cfg, k)!r})"
                           for k in changed)
        raise ValueError(f"--resume: these settings would change the experiment of {out}: {detail}. "
                         f"A resumed run keeps its settings; only {', '.join(RESUMABLE_FIELDS[:-1])} may change. "
                         "Train other settings into another --out-dir")
    values = saved_cfg.to_dict()
    values.update({k: v for k, v in given.items() if k in RESUMABLE_FIELDS})
    values["out_dir"] = str(out)
    return TrainConfig.from_dict(values, source="command line")


def cmd_train(args: argparse.Namespace) -> int:
    from mixnn_fast.app.report import write_run_report
    from mixnn_fast.train.trainer import Trainer

    cfg = _config_from_args(args)
    trainer = Trainer(cfg, resume=args.resume, resume_from_previous=args.resume_from_previous,
                      overwrite=args.overwrite)
    main = trainer.dist.is_main  # under torchrun, rank 0 alone writes and prints
    if trainer.data.note and main:
        print(f"NOTE: {trainer.data.note}")
    summary = trainer.fit(keep_lock=True)  # released by close(), after the report
    record = trainer.label_record()  # every process takes part in its pass
    if main:
        summary = write_run_report(trainer.out_dir, record, summary)
        print(json.dumps(summary, indent=2))
    # only after success: a rank that failed exits at once (torchrun stops the others), where
    # leaving the group would wait in a barrier for peers stuck in a collective
    trainer.close()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mixnn_fast.train.checkpoint import load_checkpoint
    from mixnn_fast.train.config import TrainConfig
    from mixnn_fast.train.trainer import Trainer

    run = Path(args.run)
    if not run.is_dir():
        raise FileNotFoundError(f"evaluate: {run} is not a folder (give a run's --out-dir)")
    saved = load_checkpoint(run, previous=args.previous)["config"]
    # what a run reports (progress bars, TensorBoard) never changes what it computes
    cfg = TrainConfig.from_saved({**saved, "progress": not args.no_progress, "out_dir": str(run)},
                                source=f"{run}'s checkpoint")
    trainer = Trainer(cfg, resume=not args.previous, resume_from_previous=args.previous)
    print(json.dumps({"run": str(run), "epochs_trained": trainer.start_epoch,
                      "test_accuracy": trainer.test_accuracy()}, indent=2))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from mixnn_fast.app.report import audit_runs
    from mixnn_fast.audit.run_folder import format_audit

    if args.folds < 2:
        raise ValueError(f"--folds: expected at least 2, got {args.folds}")
    try:
        results = audit_runs(args.runs, reference=not args.no_reference, folds=args.folds, seed=args.seed,
                             rule=args.rule, log=lambda message: print(message, file=sys.stderr, flush=True))
    except ImportError as exc:  # cleanlab, an optional dependency: say how to install it or skip it
        print(f"mixnn audit: error: {exc}; or run with --no-reference", file=sys.stderr)
        return 2
    for result in results:
        print(format_audit(result) + "\n")
    print("audit.json, label_issues.csv and report.html rewritten in " +
          ", ".join(sorted({r["run"] for r in results})))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mixnn_fast.app.demo import run_demo

    run_demo(quick=args.quick, epochs=args.epochs, subset=args.subset, out_dir=args.out_dir, seed=args.seed,
             progress=not args.no_progress)
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from mixnn_fast.app.experiments import TABLE_NOISE, mid_cycle_note, run_table, table_cells

    noises = [n for n in TABLE_NOISE if args.noise is None or n[2] in args.noise]
    if args.noise is not None and len(noises) != len(args.noise):
        known = ", ".join(n[2] for n in TABLE_NOISE)
        raise ValueError(f"--noise: unknown setting(s) {', '.join(sorted(set(args.noise) - {n[2] for n in noises}))}"
                         f"; known: {known}")
    cells = table_cells(out_dir=args.out_dir, subset=args.subset, epochs=args.epochs, seeds=args.seeds,
                        methods=args.methods, noises=noises, num_threads=args.num_threads,
                        augment=args.augment, plan_pair=args.ablations, ablations=args.ablations)
    if args.shard and args.report_only:
        raise ValueError("--report-only: writes the whole table from the finished runs; give it without --shard")
    if args.shard:
        try:
            index, count = (int(v) for v in args.shard.split("/"))
            if not 1 <= index <= count:
                raise ValueError
        except ValueError:
            raise ValueError(f"--shard: expected K/N with 1 <= K <= N, got {args.shard!r}") from None
        cells = cells[index - 1::count]
        print(f"shard {index}/{count}: {len(cells)} runs; run again without --shard once every shard is done "
              "to write the whole table")
    note = mid_cycle_note(args.epochs)
    if note:
        print(f"[table] note: {note}", flush=True)
    print(run_table(cells, args.out_dir, train=not args.report_only))
    print(f"\nresults.md, results.json and accuracy_<noise>.png in {args.out_dir}")
    return 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.name not in BENCHMARKS:
        raise ValueError(f"bench: no benchmark {args.name!r}; the benchmarks are {', '.join(BENCHMARKS)}")
    script = BENCH_DIR / f"{args.name}.py"
    if not script.exists():
        raise FileNotFoundError(f"bench: {script} is missing (the benchmarks live in a source checkout's bench/; "
                                "an installed package has none)")
    sys.argv = [str(script), *rest]
    # scripts import their harness as `bench.common` or `common`
    sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def cmd_info(_: argparse.Namespace) -> int:
    import mixnn_fast

    print(json.dumps({"version": mixnn_fast.__version__, **mixnn_fast.build_info()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mixnn_fast.app.experiments import TABLE_METHODS
    from mixnn_fast.train.config import METHODS

    parser = argparse.ArgumentParser(prog="mixnn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one configuration (YAML and/or flags)")
    train.add_argument("--config", help="YAML file of TrainConfig settings")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out-dir with its own settings (only epochs, progress, "
                            "tensorboard, eval/checkpoint frequency and threads may be changed)")
    train.add_argument("--resume-from-previous", action="store_true",
                       help="like --resume, from the checkpoint kept before the last one (when that one is corrupt)")
    train.add_argument("--overwrite", action="store_true",
                       help="start again in an --out-dir that already holds a run (its files are replaced)")
    _add_config_flags(train)

    evaluate = sub.add_parser("evaluate", help="test accuracy of a saved run")
    evaluate.add_argument("run", help="the run's folder (its --out-dir)")
    evaluate.add_argument("--previous", action="store_true", help="evaluate the checkpoint kept before the last one")
    evaluate.add_argument("--no-progress", action="store_true")

    audit = sub.add_parser("audit", help="which given labels of finished runs are wrong: ours beside cleanlab "
                                         "(precision, recall, F1, AUROC where true labels are known)")
    audit.add_argument("runs", nargs="+", help="run folders (or a folder of runs, e.g. runs/demo)")
    audit.add_argument("--no-reference", action="store_true",
                       help="skip cleanlab's side (cross-validated logistic regression on the pixels)")
    audit.add_argument("--folds", type=int, default=5, help="cross-validation folds of cleanlab's model")
    audit.add_argument("--seed", type=int, default=0, help="seed of the folds")
    audit.add_argument("--rule", choices=("class_threshold", "argmax"),
                       help="which labels to flag (default class_threshold: another class is more likely and the "
                            "given label gets less than its class's average; argmax: another class is more likely)")

    demo = sub.add_parser("demo", help="CE, MixNN and MixNN+ on Fashion-MNIST with 40%% symmetric noise")
    demo.add_argument("--quick", action="store_true", help="a one-minute version (1,000 images, 6 epochs)")
    demo.add_argument("--epochs", type=int)
    demo.add_argument("--subset", type=int, help="training images (class-stratified)")
    demo.add_argument("--out-dir", help="default: runs/demo (runs/demo_quick with --quick)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")

    table = sub.add_parser("table", help="the results table: CE/mixup/GCE/SCE/MixNN/MixNN+ x label-noise settings")
    table.add_argument("--out-dir", default="runs/table")
    table.add_argument("--subset", type=int, default=2000, help="training images (class-stratified)")
    table.add_argument("--epochs", type=int, default=60)
    table.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                       help="random pad-and-crop + flip (default: none, the budget where CE memorises)")
    table.add_argument("--seeds", type=int, nargs="+", default=[0])
    table.add_argument("--methods", nargs="+", default=list(TABLE_METHODS), choices=METHODS)
    table.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True,
                       help="the extra rows: MixNN's naive-plan pair and ablations, MixNN+'s ablations")
    table.add_argument("--noise", nargs="+", help="a subset of sym-20 sym-40 sym-60 sym-80 asym-40")
    table.add_argument("--num-threads", type=int)
    table.add_argument("--shard", help="K/N: run every N-th cell from the K-th (several processes, one folder)")
    table.add_argument("--report-only", action="store_true",
                       help="train nothing: write the table from the finished runs (reporting again, from its "
                            "checkpoint, one saved with other report-only settings) and list the others")

    bench = sub.add_parser("bench", help="run bench/<name>.py (extra arguments go to the script)")
    bench.add_argument("name", help=", ".join(BENCHMARKS))

    sub.add_parser("info", help="what the native extension was built with")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "bench":
            return cmd_bench(args, rest)
        return {"train": cmd_train, "evaluate": cmd_evaluate, "audit": cmd_audit, "demo": cmd_demo,
                "table": cmd_table, "info": cmd_info}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # a user's mistake: the message, no traceback
        print(f"mixnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        after = {"train": "; the run keeps its last checkpoint: the same command with --resume continues it",
                 "demo": "; each run keeps its last checkpoint: the same command resumes them",
                 "table": "; each run keeps its last checkpoint: the same command resumes them"}
        print(f"mixnn {args.command}: interrupted{after.get(args.command, '')}", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        from mixnn_fast.app.demo import RunProcessEnded
        from mixnn_fast.app.experiments import RunLocked
        from mixnn_fast.train.trainer import TrainingDiverged

        if not isinstance(exc, (TrainingDiverged, RunLocked, RunProcessEnded)):
            raise  # a fault of ours: keep the traceback
        print(f"mixnn {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
