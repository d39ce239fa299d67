"""Three scripted labellers on the same rendered Shapes pairs, one of whom answers at random: each labeller's
agreement with the other two's majority and with a preference model fitted on all their labels, as `ddpo label
status --model` reports it, and whether the random one is flagged.

Labellers: "ann" and "bob" prefer fewer objects (`FewerObjects`), flip 15% of their decided answers and call a
tie when the two images have the same count; "coin" answers "1" or "2" by a coin. The store, the model and the
status JSON go to --dir.

    python benchmarks/labeller_agreement.py --pairs 300 --dir /tmp/agreement
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from click.testing import CliRunner

from ddpo.cli import main as ddpo
from ddpo.preference.store import LabelStore
from ddpo.shapes.labeller import FewerObjects, PersonLikeLabeller, rendered_pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    store_path, model_path = args.dir / "labels.db", args.dir / "preference.safetensors"
    for path in (store_path, model_path):
        path.unlink(missing_ok=True)
    store = LabelStore(store_path)
    pairs = rendered_pairs(args.pairs, seed=args.seed)
    ids = store.add_pairs([(p.prompt, p.image_a, p.image_b) for p in pairs], source="rendered")
    labellers = {
        "ann": PersonLikeLabeller(FewerObjects(), flip_rate=0.15, seed=args.seed + 1),
        "bob": PersonLikeLabeller(FewerObjects(), flip_rate=0.15, seed=args.seed + 2),
        "coin": PersonLikeLabeller(FewerObjects(), answers_at_random=True, seed=args.seed + 3),
    }
    for name, labeller in labellers.items():
        store.add_labeller(name)
        for identifier, pair in zip(ids, pairs):
            store.record(name, identifier, labeller.choose_scenes(pair.scene_a, pair.scene_b))
    runner = CliRunner()
    trained = runner.invoke(ddpo, ["preference", "train", str(store_path), "--out", str(model_path)])
    if trained.exit_code != 0:
        raise SystemExit(trained.output)
    status = runner.invoke(ddpo, ["label", "status", str(store_path), "--model", str(model_path)])
    if status.exit_code != 0:
        raise SystemExit(status.output)
    report = json.loads(status.stdout)
    report["preference_model_heldout_accuracy"] = json.loads(trained.output)["heldout_accuracy"]
    (args.dir / "status.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(status.stderr, file=sys.stderr, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
