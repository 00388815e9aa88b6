"""Accuracy (posterior readout, subset C) against the text's validation NELBO (label unknown) over λ.

    python docs/label_token_tradeoff.py docs/label_token_tradeoff.png RUNS/

RUNS/ holds, per arm NAME, NAME.post_C.json (classify.py --json on subset C) and NAME.log.jsonl (its log)."""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
R = sys.argv[2].rstrip("/") + "/"
arms = [("b: λ=0, +unlabeled", "b_l0"), ("c: λ=1, +unlabeled", "c_l1"), ("c: λ=10, +unlabeled", "c_l10"),
        ("d: λ=10, labeled only", "d_l10_nounlab_arm"), ("d continued (final)", "d_l10_nounlab")]
fig, ax = plt.subplots(figsize=(6.4, 4.2))
for label, name in arms:
    try:
        post = json.load(open(R + name + ".post_C.json"))
        log = [json.loads(l) for l in open(R + name + ".log.jsonl")]
    except FileNotFoundError:
        continue
    val = [r for r in log if "val_nats_per_token_no_class" in r][-1]
    acc, (lo, hi) = post["accuracy"], post["accuracy_ci95"]
    ax.errorbar(val["val_nats_per_token_no_class"], 100 * acc, yerr=[[100 * (acc - lo)], [100 * (hi - acc)]], fmt="o", capsize=3, label=f"{label} (step {val['step']})")
ax.axhline(87.2, color="gray", ls="--", lw=1); ax.text(0.02, 0.86, "NB-LR, BPE unigrams, subset C (87.2 %)", transform=ax.transAxes, fontsize=8, color="gray")
ax.set_xlabel("validation NELBO of the text, label unknown (nats/token)"); ax.set_ylabel("accuracy on subset C, posterior readout (%)")
ax.set_title("The generative-discriminative trade-off (tiny preset, this CPU)", fontsize=10)
ax.legend(fontsize=7, loc="center right"); fig.tight_layout(); fig.savefig(sys.argv[1], dpi=120)
