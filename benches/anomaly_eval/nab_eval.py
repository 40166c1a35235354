#!/usr/bin/env python3
"""Scores Sluice's `anomaly` transform on the Numenta Anomaly Benchmark (NAB) with NAB's own
scoring code (`nab/sweeper.py`, imported from the NAB checkout given on the command line).

Downloads nothing. Needs a NAB checkout (https://github.com/numenta/NAB: data/, labels/,
config/profiles.json, results/null/, nab/sweeper.py) and a built `sluice` binary. Only the
Python standard library is used (NAB's sweeper needs nothing else).

What it does, per detector configuration:
 1. writes the 58 NAB series as one JSON-lines file (one `device_id` tag per series);
 2. runs `sluice run` on a generated pipeline: file source -> anomaly (annotate = true, the
    given detectors, nothing else) -> file sink. One streaming pass: every score is computed
    from the past only;
 3. reads back `anomaly_score` (continuous score) and `anomaly` (the alert flag) per record;
 4. scores them like NAB's `run.py --optimize --score --normalize`: the sweeper picks the best
    threshold over the whole corpus per profile (NAB's standard procedure, the same for every
    detector), then normalises with NAB's null detector (0) and the perfect detector (100).
    The alert flag is also scored as is ("alerts"): what a user gets from the alerts without
    choosing any threshold.

Usage:
    python3 benches/anomaly_eval/nab_eval.py --nab /path/to/NAB --sluice target/release/sluice \
        --name ewma --detectors '[{ type = "ewma" }]'
    # --detectors omitted: the transform's default (whatever `detectors` defaults to)
    # --option 'warmup = 10' adds top-level anomaly options (repeatable)
"""

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile

PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")


def parse_time(s):
    return dt.datetime.fromisoformat(s.strip())


def load_corpus(nab):
    with open(os.path.join(nab, "labels", "combined_windows.json")) as f:
        windows = json.load(f)
    corpus = {}
    for rel in sorted(windows):
        rows = []
        with open(os.path.join(nab, "data", rel)) as f:
            next(f)
            for line in f:
                if not line.strip():
                    continue
                ts, value = line.rstrip("\n").split(",")[:2]
                rows.append((parse_time(ts), float(value)))
        corpus[rel] = {
            "rows": rows,
            "windows": [(parse_time(a), parse_time(b)) for a, b in windows[rel]],
        }
    return corpus


def write_input(corpus, path):
    epoch = dt.datetime(1970, 1, 1)
    with open(path, "w") as f:
        for rel, data in corpus.items():
            for t, v in data["rows"]:
                ms = int((t - epoch).total_seconds() * 1000)
                f.write(json.dumps({"ts": ms, "device_id": rel, "value": v}) + "\n")


def run_sluice(sluice, workdir, input_path, detectors, options):
    out_path = os.path.join(workdir, "out.jsonl")
    if os.path.exists(out_path):
        os.remove(out_path)
    lines = [
        "[pipeline]",
        'id = "nab"',
        "[sources.nab]",
        'type = "file"',
        f"path = {json.dumps(input_path)}",
        'decode = { codec = "json", time_key = "ts", time_unit = "ms", tags = ["device_id"] }',
        "[transforms.detect]",
        'type = "anomaly"',
        'inputs = ["nab"]',
        'fields = ["value"]',
        "annotate = true",
        "max_series = 1000",
    ]
    if detectors is not None:
        lines.append(f"detectors = {detectors}")
    lines += options
    lines += [
        "[sinks.out]",
        'type = "file"',
        'inputs = ["detect"]',
        f"path = {json.dumps(out_path)}",
        "fsync = false",
        "[sinks.alerts]",
        'type = "blackhole"',
        'inputs = ["detect.anomalies"]',
    ]
    pipeline = os.path.join(workdir, "pipeline.toml")
    with open(pipeline, "w") as f:
        f.write("\n".join(lines) + "\n")
    # A fresh state directory every run: the stage restores a snapshot taken with the same
    # options, which would carry the end of the previous run into this one (look-ahead).
    data_dir = os.path.join(workdir, "data")
    shutil.rmtree(data_dir, ignore_errors=True)
    env = dict(os.environ, SLUICE_DATA_DIR=data_dir)
    subprocess.run([sluice, "run", pipeline], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    scores, flags = {}, {}
    with open(out_path) as f:
        for line in f:
            r = json.loads(line)
            rel = r["tags"]["device_id"]
            fields = r["fields"]
            scores.setdefault(rel, []).append(float(fields.get("anomaly_score") or 0.0))
            flags.setdefault(rel, []).append(1.0 if fields.get("anomaly") else 0.0)
    return scores, flags


def nab_scores(nab, corpus, scores, threshold=None):
    """NAB normalised score per profile; `threshold=None`: NAB's corpus-wide optimisation."""
    sys.path.insert(0, nab)
    from nab.sweeper import Sweeper  # NAB's own scoring code

    with open(os.path.join(nab, "config", "profiles.json")) as f:
        profiles = json.load(f)
    with open(os.path.join(nab, "labels", "combined_labels.json")) as f:
        tp_count = sum(len(v) for v in json.load(f).values())
    result = {}
    for name in PROFILES:
        cost = profiles[name]["CostMatrix"]
        sweeper = Sweeper(probationPercent=0.15, costMatrix=cost)
        rows = []
        for rel, data in corpus.items():
            ts = [t for t, _ in data["rows"]]
            s = scores[rel]
            if len(s) != len(ts):
                raise SystemExit(f"{rel}: {len(s)} scores for {len(ts)} rows")
            rows.extend(sweeper.calcSweepScore(ts, s, list(data["windows"]), rel))
        by_threshold = sweeper.calcScoreByThreshold(rows)
        if threshold is None:
            best = max(by_threshold, key=lambda x: x.score)
        else:
            # The score at the lowest swept threshold >= the fixed one (what the alert flag
            # gives).
            above = [x for x in by_threshold if x.threshold >= threshold]
            best = min(above, key=lambda x: x.threshold) if above else by_threshold[-1]
        with open(os.path.join(nab, "results", "null", f"null_{name}_scores.csv")) as f:
            base = float(f.read().strip().splitlines()[-1].split(",")[4])
        perfect = tp_count * cost["tpWeight"]
        result[name] = (100 * (best.score - base) / (perfect - base), best.threshold,
                        best.tp, best.fp, best.fn)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nab", required=True, help="path of a NAB checkout")
    ap.add_argument("--sluice", required=True, help="path of the sluice binary")
    ap.add_argument("--name", default="sluice", help="label of this run in the output")
    ap.add_argument("--detectors", default=None,
                    help="TOML array for `detectors` (default: the transform's default)")
    ap.add_argument("--option", action="append", default=[],
                    help="extra top-level anomaly option line, e.g. 'warmup = 10'")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()

    corpus = load_corpus(args.nab)
    workdir = args.workdir or tempfile.mkdtemp(prefix="nab-eval-")
    os.makedirs(workdir, exist_ok=True)
    input_path = os.path.join(workdir, "nab.jsonl")
    if not os.path.exists(input_path):
        write_input(corpus, input_path)
    scores, flags = run_sluice(args.sluice, workdir, input_path, args.detectors, args.option)
    missing = [rel for rel in corpus if rel not in scores]
    if missing:
        raise SystemExit(f"no output for {missing[:3]}...")

    for label, s, thr in (("score", scores, None), ("alerts", flags, 0.5)):
        res = nab_scores(args.nab, corpus, s, thr)
        parts = " ".join(
            f"{p}={v[0]:6.1f}" for p, v in res.items())
        std = res["standard"]
        print(f"{args.name:24s} {label:6s} {parts}  (standard: threshold {std[1]:.4f}, "
              f"TP {std[2]} FP {std[3]} FN {std[4]})", flush=True)


if __name__ == "__main__":
    main()
