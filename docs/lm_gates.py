"""The plateau's mechanism: adaLN gates and the attention ablation every 150 steps (docs/lm_plateau.md).

    python docs/lm_gates.py               # the 1/t weight (Eq. 11), 128-token windows, dropout 0, 600 steps
    python docs/lm_gates.py --loss flat   # masked tokens weighted alike

Prints, per 150 steps: the cross-entropy per masked token at t = 0.1 and 0.5 on 128 held-out
reviews (first 128 tokens), the t = 0.1 value with every attention output zeroed, and the mean
|gate| of the attention and MLP branches of each block. Any other docs/lm_arms.py flag is passed on.
"""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent)); sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np, torch
import lm_arms, diffusion, data, model as dit
from eval import cross_entropy_by_t
args = lm_arms.parse_args(["--name", "diag", "--seq-len", "128", "--dropout", "0"] + sys.argv[1:])
train, val = data.train_val_split(data.load_dataset(None, 'train')[0])
T, V = data.encode([r.text for r in train]), data.encode([r.text for r in val[:128]])
ev = [v[:128] for v in V[:128]]
m = lm_arms.build(args, T).train()
opt = torch.optim.AdamW(m.parameters(), lr=args.lr)
g = torch.Generator().manual_seed(0); rng = np.random.default_rng(0)
def report(step):
    m.eval()
    ce = cross_entropy_by_t(m, ev, (0.1, 0.5), 1, 32, 'cpu')
    orig = dit.attention
    dit.attention = lambda qkv, *a, **k: torch.zeros(*qkv.shape[:2], qkv.shape[3]*qkv.shape[4])
    ce0 = cross_entropy_by_t(m, ev, (0.1,), 1, 32, 'cpu')
    dit.attention = orig
    gates = [b.adaLN_modulation(torch.nn.functional.silu(m.sigma_map(torch.zeros(1))))[0].view(6,-1)[[2,5]].abs().mean(1).tolist() for b in m.blocks]
    print(step, [round(r['nats_per_masked_token'],3) for r in ce], 'no-attn', round(ce0[0]['nats_per_masked_token'],3), 'gates', [[round(x,3) for x in gg] for gg in gates], flush=True)
    m.train()
t0=time.time()
for step in range(1, 601):
    idx = rng.integers(len(T), size=16)
    x0, am = data.collate([data.crop(T[i], args.seq_len, g) for i in idx])
    for gr in opt.param_groups: gr['lr'] = args.lr*min(1,(step)/100)
    loss = lm_arms.mdlm_loss(m, args, x0, am, g)
    loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad()
    if step % 150 == 0: report(step)
print(time.time()-t0)
