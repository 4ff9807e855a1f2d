"""Drive `make run`'s server the way 3D Slicer does (MONAILabelClient) and print what it answers.

    make run &                      # in another shell, then:
    .venv/bin/python bench/demo_session.py http://127.0.0.1:8000

It runs next sample, infer (Dice against the demo's truth), grows simulated scribbles (the scribbles task), saves
them as a sparse label,
fine-tunes for one epoch and infers again; the demo data set gains a label (use a fresh `make data` after).
"""
import sys
import tempfile
import time

import numpy as np
from crossmodal.config import load_config
from crossmodal.data.sparse import scribbles
from crossmodal.io import load_volume, save_volume
from monailabel.client import MONAILabelClient

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
c = MONAILabelClient(url, tmpdir=tempfile.mkdtemp())
info = c.info()
print("models:", list(info["models"]), "trainers:", list(info["trainers"]), "strategies:", list(info["strategies"]),
      "scoring:", list(info["scoring"]), "datastore:", info["datastore"])
nxt = c.next_sample("crossmodal", {})
print("next sample:", nxt["id"], f"(score {nxt.get('score')}, cold start {nxt.get('cold_start')}, cases scored by this "
      f"request {nxt.get('scored_now')})")
t = time.time()
out, params = c.infer("crossmodal", nxt["id"], {})
dt = time.time() - t
pred = load_volume(out)[0].numpy()
truth = load_volume(f"data/brain/truth/{nxt['id']}.nii.gz")[0].numpy()
d = [2 * ((pred == v) & (truth == v)).sum() / ((pred == v).sum() + (truth == v).sum()) for v in (1, 2, 3)]
print(f"infer {nxt['id']}: {dt:.1f} s round trip, modalities_used={params['modalities_used']}, "
      f"Dice GM/WM/CSF = {d[0]:.3f}/{d[1]:.3f}/{d[2]:.3f}")
cfg = load_config("brain")
img = load_volume(f"data/brain/{nxt['id']}.nii.gz")
s = scribbles(truth.astype(np.int64), cfg.labels, np.random.default_rng(0))
save_volume("/tmp/demo_scribbles.nii.gz", s, img.affine.numpy())
t = time.time()
out, gp = c.infer("grow_scribbles", nxt["id"], {}, label_in="/tmp/demo_scribbles.nii.gz")
g = load_volume(out)[0].numpy()
d = [2 * ((g == v) & (truth == v)).sum() / ((g == v).sum() + (truth == v).sum()) for v in (1, 2, 3)]
print(f"grow scribbles: {time.time() - t:.1f} s round trip, drawn {gp['drawn']:.1%} -> labelled {gp['labelled']:.1%}, "
      f"held-out stroke accuracy {gp['heldout_accuracy']}, Dice GM/WM/CSF = {d[0]:.3f}/{d[1]:.3f}/{d[2]:.3f}")
c.save_label(nxt["id"], "/tmp/demo_scribbles.nii.gz")
li = c.datastore()["objects"][nxt["id"]]["labels"]["final"]["info"]
print("saved label:", {k: li[k] for k in ("label_kind", "annotated_fraction")})
t = time.time()
c.train_start("crossmodal", {"max_epochs": 1, "tracking": "mlflow"})
time.sleep(3)
while c.train_status(check_if_running=True):
    time.sleep(2)
st = c.info()["train_stats"]["crossmodal"]
print(f"train: {time.time() - t:.0f} s, epoch {st['epoch']}/{st['total_epochs']}, best_metric {st['best_metric']:.3f} "
      f"(the committed model validated {st.get('start_metric', float('nan')):.3f} first: published only if beaten)")
out, params = c.infer("crossmodal", nxt["id"], {})
print("infer after training:", params["latencies"]["total"], "s server-side")
