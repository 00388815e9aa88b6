"""What each component brings to the ensemble, from classify.py --json files of the ensemble readout.

    python docs/ensemble_components.py runs/imdb_results.json runs/few100.json ...

Per file: the ensemble's and each component's accuracy, the fitted weights and biases, how often
the components err on the same texts, the correlation of their log-posteriors (two classes: of
the log-odds), and the accuracy of the ensemble without its MDLM term (w_2 log p_NB-LR + b, with the
weights fitted by --calibrate on the held-out texts: nothing here is fitted on the test texts).
"""
import json
import sys

import numpy as np


def report(path: str) -> None:
    doc = json.load(open(path))
    names, rows = doc["classes"], doc["texts"]
    y = np.array([names.index(r["label"]) for r in rows])
    mdlm = np.array([r["mdlm_log_posterior"] for r in rows])
    ngram = np.array([r["ngram_log_posterior"] for r in rows])
    w, b = np.array(doc["ensemble"]["weights"]), np.array(doc["ensemble"]["bias"])
    wrong_m, wrong_n = mdlm.argmax(1) != y, ngram.argmax(1) != y
    centred = [x - x.mean(1, keepdims=True) for x in (mdlm, ngram)]
    corr = np.corrcoef(centred[0].ravel(), centred[1].ravel())[0, 1]
    without_mdlm = np.mean((w[1] * ngram + b).argmax(1) == y)
    print(f"{path}: {len(y)} texts; ensemble {doc['accuracy']:.4f}, MDLM {doc['components']['mdlm']['accuracy']:.4f}, "
          f"NB-LR {doc['components']['ngram']['accuracy']:.4f}; weights {w[0]:.4f} (MDLM), {w[1]:.4f} (NB-LR), "
          f"bias {', '.join(f'{v:.3f}' for v in b)}")
    print(f"  wrong: both {int((wrong_m & wrong_n).sum())}, MDLM only {int((wrong_m & ~wrong_n).sum())}, "
          f"NB-LR only {int((~wrong_m & wrong_n).sum())}; correlation of the centred log-posteriors {corr:.3f}; "
          f"the ensemble without its MDLM term {without_mdlm:.4f}")


if __name__ == "__main__":
    for path in sys.argv[1:]:
        report(path)
