"""The claims of MEA's paper (Peng et al., 2026, arXiv 2601.19611), read against a sitting of its protocol
(sweeps/paper_small.yaml names them): MEA tolerates larger LRs and reaches a lower loss; GroupNorm alone carries
part of the gain; DFA without its norm drifts toward standard attention; at half the KV cache MEA's virtual heads
beat grouped-query attention; a compressed cache costs little after continued pretraining. A claim whose arms the
spec lacks is said to be not read."""
from __future__ import annotations

import math

from mea.studies.claims import Evidence
from mea.studies.protocol import NO_NOISE_ESTIMATE, reading, standard_error, verdict, within_noise
from mea.studies.trust import TRAINS_WITHIN, row_of, stable_up_to

GN_CLAIM = "+GroupNorm alone carries part of the gain"
DFA_CLAIM = "DFA without its norm drifts toward standard attention"
HALF_CACHE_CLAIM = "At half the KV cache, MEA's virtual heads beat grouped-query attention"
CLAIM_ARMS = {GN_CLAIM: ("mha_gn",), DFA_CLAIM: ("diff", "diff_nonorm"), HALF_CACHE_CLAIM: ("mea_virtual", "mha_gqa")}  # the claims that need arms besides mha and mea


def claims(evidence: Evidence) -> list[str]:
    p, fit, lrs, rows, compression, grid = evidence.protocol, evidence.fit, evidence.lrs, evidence.rows, evidence.compression, evidence.grid
    out = []
    base = row_of(rows, p.baseline)
    mea, gn = row_of(rows, "mea"), row_of(rows, "mha_gn")
    if "mea" in lrs and p.baseline in lrs:
        ratio = lrs["mea"]["lr"] / lrs[p.baseline]["lr"]
        widths = {arm: [s["sensitivity_decades"] for s in g["cells"] if "sensitivity_decades" in s] for arm, g in fit["groups"].items()}
        mean = {arm: sum(w) / len(w) for arm, w in widths.items() if w}
        width_text = f"; mean LR range within {p.margin:.0%} of the optimum: mea {mean.get('mea', math.nan):.2f} vs {p.baseline} {mean.get(p.baseline, math.nan):.2f} decades"
        stable = {arm: stable_up_to(grid[arm]) for arm in ("mea", p.baseline) if arm in grid}
        signs = [ratio > 1, mean.get("mea", 0) >= mean.get(p.baseline, math.inf), stable.get("mea", 0) > stable.get(p.baseline, math.inf)]
        out.append(f"**MEA tolerates larger learning rates.** At the target size mea's LR is {ratio:.2f}× {p.baseline}'s{width_text}; "
                   f"largest LR that still trains (within {TRAINS_WITHIN:.0%} of the arm's best loss) at the largest swept size: "
                   f"mea {stable.get('mea', math.nan):.3g}, {p.baseline} {stable.get(p.baseline, math.nan):.3g}. "
                   f"{'Agrees' if all(signs) else 'Partly agrees' if any(signs) else 'Disagrees'} at this scale ({sum(signs)} of these 3 point MEA's way).")
    if mea and base:
        delta = mea["final_val_loss"] - base["final_val_loss"]
        out.append(f"**MEA reaches a lower validation loss than the Transformer.** Δ = {delta:+.4f} ({mea['seeds']} vs {base['seeds']} seeds): {reading(mea, base)}.")
    if gn and mea and base:
        d_gn, d_mea = gn["final_val_loss"] - base["final_val_loss"], mea["final_val_loss"] - base["final_val_loss"]
        share = d_gn / d_mea if d_mea else math.nan
        out.append(f"**{GN_CLAIM}.** Δ(mha_gn) = {d_gn:+.4f} against Δ(mea) = {d_mea:+.4f} (share {share:.2f}): "
                   f"{'agrees' if d_mea < 0 and 0 < share < 1 else 'does not show here'} ({reading(gn, base)} for mha_gn alone).")
    diff, nonorm = row_of(rows, "diff"), row_of(rows, "diff_nonorm")
    if diff and nonorm and base:
        gap, gap_nonorm = diff["final_val_loss"] - base["final_val_loss"], nonorm["final_val_loss"] - base["final_val_loss"]
        closer = abs(gap_nonorm) - abs(gap)  # the two arms' distance apart is what the seeds must resolve
        out.append(f"**{DFA_CLAIM}.** Distance to {p.baseline}: diff {gap:+.4f}, diff without norm {gap_nonorm:+.4f}: "
                   f"{verdict(closer, standard_error(diff, nonorm))} (the loss of diff without norm is {'closer to' if closer < 0 else 'further from'} the baseline's).")
    virtual, gqa = row_of(rows, "mea_virtual"), row_of(rows, "mha_gqa")
    if virtual and gqa:
        delta = virtual["final_val_loss"] - gqa["final_val_loss"]
        costs = []
        for half, full in ((virtual, mea), (gqa, base)):
            if full:
                cost = half["final_val_loss"] - full["final_val_loss"]
                se = standard_error(half, full)
                costs.append(f"{half['variant']} {cost:+.4f} against {full['variant']} "
                             f"({NO_NOISE_ESTIMATE if not se > 0 else 'within' if within_noise(cost, se) else 'beyond'}{' 2 standard errors' if se > 0 else ''})")
        said = (f"**{HALF_CACHE_CLAIM} (both trained from scratch).** Δ(mea_virtual − mha_gqa) = {delta:+.4f}: "
                f"{reading(virtual, gqa)}. What halving the cache costs each against its full-cache arm: {'; '.join(costs)}.")
        out.append(said)
    if len(compression) > 1:
        control = compression[0]  # the uncompressed model after the same continued pretraining
        parts = [f"{c['setting']}: {c['val_after_conversion'] - control['val_after_conversion']:+.4f} right after conversion, "
                 f"{c['val_after_recovery'] - control['val_after_recovery']:+.4f} after recovery against the uncompressed model recovered alike, "
                 f"{c['kv_bytes_per_token'] / control['kv_bytes_per_token']:.2f}× the KV bytes" for c in compression[1:]]
        out.append("**A 50% KV cache costs little after continued pretraining.** " + "; ".join(parts) + ". "
                   f"(The control itself moved {control['val_after_recovery'] - control['val_after_conversion']:+.4f} in its {control['recover_steps']} steps.)")
    if unread := [f"{claim} (needs {', '.join(a for a in arms if not row_of(rows, a))})" for claim, arms in CLAIM_ARMS.items() if not all(row_of(rows, a) for a in arms)]:
        out.append("**Not read: this spec lacks their arms.** " + "; ".join(unread) + ".")
    return out
