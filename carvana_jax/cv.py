"""K-fold cross-validation by car: K models, the out-of-fold Dice, and the fold ensemble's submission.

    python -m carvana_jax.cv --config CFG --folds K --workdir DIR [--fold I] [--nosubmission]
                             [--config.KEY=VALUE ...]

The training set's cars are shuffled with ``config.seed`` and cut into K shares differing by at most one
car (``assign_folds``), written to DIR/folds.json. Fold I (0..K-1) trains ``train.train_and_evaluate``
in DIR/fold_I with the I-th share held out as its validation cars (``config.val_cars``), so its
validation Dice is measured during training as usual. Once trained, its best checkpoint scores every
photo of its held-out cars at 1918×1280 through eval's ensemble path, with the config's ``tta``,
``threshold`` and ``postprocess``: every training photo is scored once, by the one model that never saw
its car. DIR defaults to workdirs/<config name>_cvK.

When every fold is trained and scored, DIR/oof.csv (img, fold, dice), DIR/cv.json (per-fold and overall
out-of-fold Dice, times) and DIR/submission.csv (the K best checkpoints averaged on the test photos,
written and validated as ``eval --split test`` does) are written and a table is printed.

Rerunning resumes: a fold whose checkpoint at num_train_steps exists is not trained again (nor rescored
while its best checkpoint and those prediction settings stay the same), an interrupted fold resumes
from its latest checkpoint, and a rerun with another --folds or seed is refused (folds.json would no
longer hold).
``--fold I`` trains and scores fold I alone (one fold per machine, the workdir on shared storage); the
run that finds every fold done writes the overall results, and any other says which folds are missing.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np

from carvana_jax import stopping
from carvana_jax.config import validate_config
from carvana_jax.data import kaggle
from carvana_jax.errors import ConfigError

FOLDS_FILE = "folds.json"
FOLD_STATE = "cv_fold.json"  # in each fold's workdir: its held-out cars, training time and OOF scores


# ---------------------------------------------------------------------------------------------- pure parts

def assign_folds(cars: Sequence[str], folds: int, seed: int) -> list[list[str]]:
    """The held-out cars of each fold: every car exactly once, shuffled by ``seed`` and cut into ``folds``
    consecutive shares whose sizes differ by at most one; each share sorted."""
    cars = sorted(set(cars))
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2 (each fold holds out 1/K of the cars), got {folds}")
    if folds > len(cars):
        raise ConfigError(f"--folds {folds} is more than the {len(cars)} cars of the training set: every fold "
                          "must hold out at least one car")
    order = np.random.default_rng(seed).permutation(len(cars))
    return [sorted(cars[i] for i in share) for share in np.array_split(order, folds)]


def aggregate_oof(index: Sequence[tuple[str, str]], folds: Sequence[Sequence[str]],
                  fold_scores: Sequence[Mapping[str, float]]) -> tuple[list[tuple[str, int, float]], dict]:
    """(rows, summary) of the out-of-fold Dice.

    ``index`` is (img, car id) of every training photo in order, ``folds`` the held-out cars of each fold,
    ``fold_scores[i]`` {img: Dice} of fold i's held-out photos. ``rows`` is (img, fold, Dice) of every
    photo of ``index``, in its order, each scored by the fold that held its car out; ``summary`` is
    {'per_fold': [{'fold', 'images', 'dice'}], 'overall': {'images', 'dice'}}, the means over photos (a
    NaN Dice, a photo skipped as unreadable, counts in neither). A photo with no score, or a car in no
    fold, is a DataError naming it."""
    fold_of = {}
    for i, cars in enumerate(folds):
        for car in cars:
            if car in fold_of:
                raise kaggle.DataError(f"car {car} is held out by folds {fold_of[car]} and {i}")
            fold_of[car] = i
    rows = []
    for img, car in index:
        if car not in fold_of:
            raise kaggle.DataError(f"{img}: its car {car} is held out by no fold")
        i = fold_of[car]
        if img not in fold_scores[i]:
            raise kaggle.DataError(f"{img}: no out-of-fold Dice from fold {i}, which holds out its car {car}")
        rows.append((img, i, float(fold_scores[i][img])))

    def mean(values: list[float]) -> dict:
        finite = [v for v in values if math.isfinite(v)]
        return {"images": len(finite), "dice": math.fsum(finite) / len(finite) if finite else float("nan")}

    per_fold = [{"fold": i, **mean([d for _, f, d in rows if f == i])} for i in range(len(folds))]
    return rows, {"per_fold": per_fold, "overall": mean([d for _, _, d in rows])}


def eta_seconds(finished: Sequence[float], remaining: int) -> float | None:
    """Time left for ``remaining`` folds at the mean of the ``finished`` folds' times (None: none finished)."""
    return float(np.mean(finished)) * remaining if finished else None


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_table(summary: dict, folds: Sequence[Sequence[str]], per_fold_info: Sequence[Mapping]) -> str:
    """The printed table: one line per fold (cars, photos, best step, OOF Dice, times) and the overall line."""
    lines = [f"{'fold':>4}  {'cars':>4}  {'photos':>6}  {'step':>6}  {'OOF Dice':>8}  {'train':>7}  {'score':>7}"]
    for row, cars, info in zip(summary["per_fold"], folds, per_fold_info):
        lines.append(f"{row['fold']:>4}  {len(cars):>4}  {row['images']:>6}  {info.get('step', '-'):>6}  "
                     f"{row['dice']:>8.5f}  {format_seconds(info.get('train_seconds')):>7}  "
                     f"{format_seconds(info.get('score_seconds')):>7}")
    overall = summary["overall"]
    lines.append(f"{'all':>4}  {sum(map(len, folds)):>4}  {overall['images']:>6}  {'':>6}  {overall['dice']:>8.5f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- files

def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise kaggle.DataError(f"{path}: unreadable ({e}); delete it to recompute it") from e


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def folds_for(workdir: str, cars: Sequence[str], folds: int, seed: int) -> list[list[str]]:
    """The held-out cars of each fold: those of WORKDIR/folds.json when it exists (checked against this
    run's --folds, seed and cars), else ``assign_folds``' written there."""
    path = os.path.join(workdir, FOLDS_FILE)
    assigned = assign_folds(cars, folds, seed)
    saved = _read_json(path)
    if saved is None:
        os.makedirs(workdir, exist_ok=True)
        _write_json(path, {"folds": folds, "seed": seed, "cars": sum(map(len, assigned)),
                           "held_out": {str(i): share for i, share in enumerate(assigned)}})
        return assigned
    if saved.get("folds") != folds or saved.get("seed") != seed:
        raise ConfigError(f"{path} splits the cars into {saved.get('folds')} folds with seed {saved.get('seed')}, "
                          f"this run asks for {folds} with seed {seed}: use the same --folds and --config.seed, "
                          "or another --workdir")
    held_out = [list(saved["held_out"][str(i)]) for i in range(folds)]
    if sorted(sum(held_out, [])) != sorted(set(cars)):
        raise kaggle.DataError(f"{path} holds out other cars than the {len(set(cars))} of the training set now "
                               "(the data changed?); use another --workdir")
    return held_out


def fold_dir(workdir: str, fold: int) -> str:
    return os.path.join(workdir, f"fold_{fold}")


def read_fold_state(workdir: str, fold: int) -> dict:
    """What FOLD_STATE in a fold's workdir records ({} before the fold started)."""
    return _read_json(os.path.join(fold_dir(workdir, fold), FOLD_STATE)) or {}


def fold_config(config, held_out: Sequence[str]):
    """``config`` for one fold: ``held_out`` as its validation cars."""
    c = config.copy_and_resolve_references()
    c.val_fraction = 0.0
    c.val_cars = tuple(held_out)
    return c


def checkpoint_steps(workdir: str) -> tuple[int | None, int | None]:
    """(latest, best by validation Dice) checkpoint steps of a fold's workdir; (None, None) when it has none."""
    from carvana_jax.checkpoint import Checkpointer
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None, None
    ckpt = Checkpointer(directory, read_only=True)
    try:
        return ckpt.latest_step(), ckpt.best_step()
    finally:
        ckpt.close()


def prediction_options(config) -> dict:
    """How the folds' checkpoints predict, as eval takes it: the config's tta, threshold and postprocess
    (passed explicitly: a fold's checkpoint holds the config it was trained with, which a rerun may change)."""
    return {"tta": config.tta, "threshold": float(config.threshold), "postprocess": config.get("postprocess", "none")}


def write_oof_csv(path: str, rows: Sequence[tuple[str, int, float]]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["img", "fold", "dice"])
        writer.writerows((img, fold, repr(dice)) for img, fold, dice in rows)
    os.replace(tmp, path)


@contextlib.contextmanager
def _exclusive(path: str):
    """True while this process holds the lock file ``path``, False when another process holds it."""
    import fcntl
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- one fold

def score_fold(config, workdir: str, names: Sequence[str], mesh, progress: bool = True) -> dict:
    """Dice at 1918×1280 of every held-out photo of a fold (``names``, as ``train_and_val`` orders its
    validation examples) by the fold's best checkpoint, through eval's ensemble with the config's tta,
    threshold and postprocess: {'step', 'tta', 'threshold', 'postprocess', 'images', 'dice', 'seconds'}."""
    from carvana_jax import predict
    from carvana_jax.data import sources
    start = time.perf_counter()
    _, ensemble, loaded = predict.load_ensemble([workdir], mesh=mesh, **prediction_options(config))
    records = sources.train_and_val(config)[1]
    if len(records) != len(names):
        raise kaggle.DataError(f"{workdir}: {len(records)} held-out photos, expected {len(names)}")
    scores, _ = ensemble.dice(records, config, progress=progress)
    return {"step": int(loaded[0][1]), **prediction_options(config), "images": list(names),
            "dice": [float(d) for d in scores], "seconds": time.perf_counter() - start}


def fold_done(state: dict | None, config, best_step: int | None = None) -> bool:
    """Whether a fold's state (its FOLD_STATE file) says it is trained to num_train_steps and scored with the
    config's prediction options (and by checkpoint ``best_step`` when given)."""
    if not state or state.get("trained_step") is None or state["trained_step"] < config.num_train_steps:
        return False
    score = state.get("score") or {}
    return (bool(score) and all(score.get(k) == v for k, v in prediction_options(config).items())
            and (best_step is None or score.get("step") == best_step))


# ---------------------------------------------------------------------------------------------- the command

def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def cross_validate(config, workdir: str, folds: int, fold: int | None = None, *, submission: bool = True,
                   mesh=None, progress: bool = True, stops=None) -> dict:
    """Train, score and (once every fold is done) summarise a K-fold cross-validation by car in ``workdir``.

    ``fold`` trains and scores that fold alone. Returns {'folds': held-out cars of each fold, 'missing':
    folds not done yet, and once none is: 'per_fold', 'overall', 'oof', 'submission'}; when a stop signal
    (``stops``, as train takes it) ended a fold's training, {'folds', 'stopped': (fold, update, signal)}."""
    from carvana_jax import parallel, train
    from carvana_jax.data import sources
    validate_config(config)
    if config.get("val_cars"):
        raise ConfigError("cv chooses each fold's held-out cars itself; leave val_cars empty")
    if fold is not None and not 0 <= fold < folds:
        raise ConfigError(f"--fold must be one of 0..{folds - 1} (with --folds {folds}), got {fold}")
    run_start = time.perf_counter()
    everything = config.copy_and_resolve_references()
    everything.val_fraction = 0.0
    index = sources.train_index(everything)
    held_out = folds_for(workdir, [car for _, car in index], folds, config.seed)
    mesh = mesh or parallel.make_mesh()
    todo = list(range(folds)) if fold is None else [fold]
    states = {i: read_fold_state(workdir, i) for i in range(folds)}

    for position, i in enumerate(todo):
        directory, cfg = fold_dir(workdir, i), fold_config(config, held_out[i])
        state_path = os.path.join(directory, FOLD_STATE)
        state = states[i]
        state.setdefault("fold", i)
        state["held_out"] = held_out[i]
        names = [f"{name}.jpg" for name, car in index if car in set(held_out[i])]
        step, best = checkpoint_steps(directory)
        left = [j for j in todo[position:] if not fold_done(states[j], config)]
        finished = [s["train_seconds"] + s["score"]["seconds"] for s in states.values()
                    if fold_done(s, config) and s.get("train_seconds") is not None]
        eta = eta_seconds(finished, len(left))
        eta_text = (f"ETA {format_seconds(eta)} for {len(left)} fold{'s' if len(left) != 1 else ''}" if eta is not None
                    else "ETA after the first fold")
        where = f"fold {i} ({position + 1}/{len(todo)})"
        if step is None or step < config.num_train_steps:
            resuming = f", resuming at update {step}" if step else ""
            _say(progress, f"{where}: training in {directory} on {len(index) - len(names)} photos, holding out "
                           f"{len(held_out[i])} cars ({len(names)} photos){resuming}; {eta_text}")
            start = time.perf_counter()
            try:
                trained = train.train_and_evaluate(cfg, directory, mesh=mesh, progress=progress, stops=stops)
            finally:
                state["train_seconds"] = (state.get("train_seconds") or 0.0) + time.perf_counter() - start
                os.makedirs(directory, exist_ok=True)
                _write_json(state_path, state)
            if "stopped_by" in trained:
                return {"folds": held_out, "stopped": (i, trained["step"], trained["stopped_by"])}
            step, best = checkpoint_steps(directory)
        else:
            _say(progress, f"{where}: trained (update {step}), not retrained")
        state["trained_step"] = step
        if not fold_done(state, config, best) or state["score"].get("images") != names:
            options = ", ".join(f"{k}={v}" for k, v in prediction_options(config).items())
            _say(progress, f"{where}: scoring its {len(names)} held-out photos at 1918x1280 ({options})")
            state["score"] = score_fold(cfg, directory, names, mesh, progress)
        _write_json(state_path, state)
        score = state["score"]
        _say(progress, f"fold {i}: out-of-fold Dice {np.nanmean(score['dice']):.5f} over {len(names)} photos "
                       f"(best checkpoint: update {score['step']})")

    states.update({i: read_fold_state(workdir, i) for i in range(folds) if i not in todo})  # other machines'
    missing = [i for i in range(folds) if not fold_done(states[i], config)]
    result = {"folds": held_out, "missing": missing}
    if missing:
        which = f"fold{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {folds}"
        _say(progress, f"{which} not done yet; the out-of-fold Dice and the submission are written once every "
                       "fold is (run this command with --fold I for each, or without --fold)")
        return result
    with _exclusive(os.path.join(workdir, ".cv.lock")) as mine:
        if not mine:
            _say(progress, f"another cv run is writing the out-of-fold Dice and the submission in {workdir}")
            return result
        result.update(_summarise(config, workdir, index, held_out, states, submission, progress))
    result["seconds"] = time.perf_counter() - run_start
    return result


def _summarise(config, workdir, index, held_out, states, submission: bool, progress: bool) -> dict:
    """oof.csv, the fold ensemble's submission.csv and cv.json, once every fold is done."""
    from carvana_jax import evaluation
    fold_scores = [dict(zip(states[i]["score"]["images"], states[i]["score"]["dice"])) for i in range(len(held_out))]
    rows, summary = aggregate_oof([(f"{name}.jpg", car) for name, car in index], held_out, fold_scores)
    oof_path = os.path.join(workdir, "oof.csv")
    write_oof_csv(oof_path, rows)
    cv_path = os.path.join(workdir, "cv.json")
    previous = _read_json(cv_path) or {}
    per_fold = [{**row, "held_out_cars": held_out[row["fold"]], "step": states[row["fold"]]["score"]["step"],
                 "train_seconds": states[row["fold"]].get("train_seconds"),
                 "score_seconds": states[row["fold"]]["score"]["seconds"]} for row in summary["per_fold"]]
    report = {"folds": len(held_out), "seed": config.seed, **prediction_options(config), "per_fold": per_fold,
              "overall": summary["overall"], "oof": oof_path, "submission": None}
    if submission:
        out = os.path.join(workdir, "submission.csv")
        checkpoints = [[os.path.join(os.path.abspath(fold_dir(workdir, i)), "checkpoints"), per_fold[i]["step"]]
                       for i in range(len(held_out))]
        settings = {"checkpoints": checkpoints, **prediction_options(config)}
        done = previous.get("submission") or {}
        if os.path.exists(out) and done.get("settings") == settings:
            _say(progress, f"submission: {out} already written by these {len(held_out)} checkpoints")
            report["submission"] = done
        else:
            _say(progress, f"submission: the {len(held_out)} folds' best checkpoints averaged on the test photos")
            start = time.perf_counter()
            written = evaluation.evaluate([fold_dir(workdir, i) for i in range(len(held_out))], split="test",
                                        out=out, **prediction_options(config), data_dir=config.data_dir,
                                        data_source=config.data_source, tfds_dir=config.tfds_dir,
                                        num_workers=config.num_workers, progress=progress)
            if list(written["steps"]) != [c[1] for c in checkpoints]:
                raise kaggle.DataError(f"the submission was made with checkpoints {written['steps']}, not the scored "
                                       f"{[c[1] for c in checkpoints]}")
            report["submission"] = {"path": out, "settings": settings, "images": written["images"],
                                    "seconds": time.perf_counter() - start}
    _write_json(cv_path, report)
    _say(progress, format_table(summary, held_out, per_fold))
    _say(progress, f"out-of-fold Dice at 1918x1280: {summary['overall']['dice']:.5f} over "
                   f"{summary['overall']['images']} photos ({len(held_out)} folds, "
                   + ", ".join(f"{k}={v}" for k, v in prediction_options(config).items())
                   + f"); {oof_path}, {cv_path}"
                   + (f", {report['submission']['path']}" if report["submission"] else ""))
    return {"per_fold": per_fold, "overall": summary["overall"], "oof": oof_path,
            "submission": report["submission"] and report["submission"]["path"]}


def define_flags() -> None:
    """The command's flags (defined only when it runs, so importing this module adds none)."""
    from absl import flags
    flags.DEFINE_integer("folds", None, "Number of folds K (2 ≤ K ≤ the number of training cars): fold I holds "
                         "out the I-th of K shares of the cars.", required=True)
    flags.DEFINE_integer("fold", None, "Train and score only this fold (0..K-1), e.g. one fold per machine; the "
                         "out-of-fold Dice and the submission are written by the run that finds every fold done.")
    flags.DEFINE_boolean("submission", True, "Once every fold is done, write WORKDIR/submission.csv: the K folds' "
                         "best checkpoints averaged on the test photos (--nosubmission: only the out-of-fold Dice).")


def main(argv) -> None:
    del argv
    from absl import flags

    from carvana_jax import cli
    flags_ = flags.FLAGS
    config = cli.FLAGS.config
    workdir = cli.FLAGS.workdir or cli.workdir_for(config, None) + f"_cv{flags_.folds}"
    with cli.friendly_errors(), stopping.stop_on_signals() as stops:
        result = cross_validate(config, workdir, flags_.folds, flags_.fold, submission=flags_.submission, stops=stops)
    if "stopped" in result:
        fold, update, name = result["stopped"]
        print(f"stopped fold {fold} at update {update} ({name}), saved; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(stops.exit_status)


if __name__ == "__main__":
    from carvana_jax import cli
    define_flags()
    cli.run(main, needs_config=True)
