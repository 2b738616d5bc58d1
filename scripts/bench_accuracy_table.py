"""The accuracy benchmark's table and goal lines, from its ledger (scripts/bench_accuracy.py runs the
arms; this renders what they measured)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from bench_common import mean_std

ARMS = ("random", "ssl", "random_semi", "ssl_semi", "full")
# arm -> its matched baseline: the arm without the one ingredient it adds.
BASELINE = {"ssl": "random", "random_semi": "random", "ssl_semi": "ssl"}
LABELS = {"random": "random init", "ssl": "SSL (SwAV)", "random_semi": "random init + semi",
          "ssl_semi": "SSL + semi", "full": "100% labels (SSL init)"}


def _spread(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(ledger: Mapping[str, Any], dataset: str, seeds: Sequence[int], fraction: float, command: str,
          recipes: Mapping[str, str]) -> str:
    """The dataset's markdown section from the ledger's runs of ``seeds`` (arms not yet run show as -);
    pass it :func:`current`'s ledger, so that every row is the same recipe."""
    runs = ledger["runs"]

    def vals(arm: str, key: str) -> dict[int, float]:
        return {s: runs[f"{arm}/seed{s}"].get(key) for s in seeds if f"{arm}/seed{s}" in runs}

    machines = sorted({e["machine"] for k, e in runs.items() if int(k.split("seed")[1]) in seeds})
    lines = [f"### {dataset}, {100 * fraction:g}% labels", "",
             (f"Split seeds {', '.join(map(str, seeds))}; AP and AP50 (COCO, %) on the validation set as mean +- std "
             "over the seeds; `vs baseline`: the paired AP50 difference to the arm without this arm's ingredient, "
             "over the same seeds. A gain counts when its mean exceeds the larger of the two arms' stds."), "",
             f"    {command}", "",
             "| arm | seeds | AP | AP50 | vs baseline (AP50) | steps | pseudo-labels: precision / recall |",
             "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        ap, ap50 = vals(arm, "AP"), vals(arm, "AP50")
        if not ap:
            lines.append(f"| {LABELS[arm]} | 0 | - | - | - | - | - |")
            continue
        base = BASELINE.get(arm)
        delta = "-"
        if base:
            b50 = vals(base, "AP50")
            diffs = [ap50[s] - b50[s] for s in ap50 if s in b50]
            if diffs:
                delta = f"{'+' if statistics.mean(diffs) >= 0 else ''}{mean_std(diffs)} vs {LABELS[base]}"
        steps = sorted({runs[f"{arm}/seed{s}"]["steps"] for s in ap})
        prec, rec = vals(arm, "pseudo_precision"), vals(arm, "pseudo_recall")
        pseudo = (f"{mean_std([v for v in prec.values() if v is not None])} / "
                  f"{mean_std([v for v in rec.values() if v is not None])}") if arm.endswith("_semi") else "-"
        lines.append(f"| {LABELS[arm]} | {len(ap)} | {mean_std(list(ap.values()))} | {mean_std(list(ap50.values()))} "
                     f"| {delta} | {'/'.join(str(s) for s in steps)} | {pseudo} |")
    for arm in ARMS:
        st, st50 = vals(arm, "student_AP"), vals(arm, "student_AP50")
        st, st50 = {k: v for k, v in st.items() if v is not None}, {k: v for k, v in st50.items() if v is not None}
        if st:
            lines += ["", (f"{LABELS[arm]} deploys the EMA teacher (the row above); its student at the last "
                           f"validation: AP {mean_std(list(st.values()))} / AP50 {mean_std(list(st50.values()))} "
                           f"({len(st)} seeds).")]
    lines += ["", *goals(ledger, seeds), "", ("Recipes (Hydra overrides; the split's JSONs and the backbone are added "
              "per arm):"), ""]
    lines += [f"- {k}: `{v}`" for k, v in recipes.items()]
    lines += ["", f"Measured on: {'; '.join(machines) or '-'}."]
    return "\n".join(lines) + "\n"


def goals(ledger: Mapping[str, Any], seeds: Sequence[int]) -> list[str]:
    """The issue's goals, read off the ledger: met, not met, or not measured yet."""
    runs = ledger["runs"]

    def ap50(arm: str) -> dict[int, float]:
        return {s: runs[f"{arm}/seed{s}"]["AP50"] for s in seeds if f"{arm}/seed{s}" in runs}

    out = []
    best, full = ap50("ssl_semi"), ap50("full")
    both = [s for s in best if s in full]
    if both:
        ratio = statistics.mean(best[s] for s in both) / max(statistics.mean(full[s] for s in both), 1e-9)
        out.append(f"- SSL + semi reaches {100 * ratio:.1f}% of the 100%-label AP50 (goal >= 90%): "
                   f"{'met' if ratio >= 0.9 else 'not met'}.")
    else:
        out.append("- SSL + semi against the 100%-label AP50 (goal >= 90%): not measured yet.")
    for arm in ("ssl", "ssl_semi", "random_semi"):
        base, mine = ap50(BASELINE[arm]), ap50(arm)
        common = [s for s in mine if s in base]
        if len(common) < 2:
            out.append(f"- {LABELS[arm]} against {LABELS[BASELINE[arm]]}: needs 2+ seeds of both.")
            continue
        gain = statistics.mean(mine[s] - base[s] for s in common)
        spread = max(_spread([mine[s] for s in common]), _spread([base[s] for s in common]))
        verdict = "beats it by more than the spread" if gain > spread else "does not beat it by more than the spread"
        wins = sum(mine[s] > base[s] for s in common)
        out.append(f"- {LABELS[arm]} {verdict}: AP50 {round(100 * gain, 1) + 0.0:+.1f} against a spread "
                   f"(larger std of the two) of {100 * spread:.1f}; ahead in {wins} of {len(common)} seeds.")
    return out
